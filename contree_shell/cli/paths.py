"""Sandbox path resolution against the session cwd (one rule for ls, cat, cd and the shell).

The rule itself lives with the session store (`state.sessions.resolve_path`); this
module only adds the "no path means the cwd" convenience the commands want.
"""

from __future__ import annotations

from contree_shell.state.sessions import display_cwd
from contree_shell.state.sessions import resolve_path as _join

__all__ = ["display_cwd", "resolve_path"]


def resolve_path(cwd: str, path: str | None = None) -> str:
    """The absolute, normalised sandbox path for `path` typed in session cwd `cwd`.

    `cwd` "" means the image default (shown as "/"); no `path` means the cwd itself;
    `..` never climbs above "/".
    """
    return _join(cwd, path or ".")
