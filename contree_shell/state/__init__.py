"""Local client state: sessions (history DAG, branches, cwd, env, pending files),
shell history and the completion cache, all in one SQLite DB per profile."""

from __future__ import annotations

from contree_shell.state.errors import NoSession, StateError

__all__ = ["NoSession", "StateError"]
