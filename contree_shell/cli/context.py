"""The per-invocation context every command handler receives.

One `Context` lives for one `contree X` call, or for the whole interactive shell (the
shell passes the same object to `execute` for every line, so a `use -N` or a format
change carries over). The API client is created lazily: purely local commands
(`session`, `env`, `cd` without a path) never touch the network or start a server.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contree_shell.cli.errors import NoSession

if TYPE_CHECKING:
    from contree_shell.client.api import ContreeClient
    from contree_shell.config import Profile
    from contree_shell.state.sessions import SessionState, SessionStore

FORMATS = ("default", "table", "json", "json-pretty", "csv", "tsv", "plain")


def session_db_path(profile_name: str) -> Path:
    """Where the client state of one profile lives (`CONTREE_SESSION_DB` overrides)."""
    override = os.environ.get("CONTREE_SESSION_DB")
    if override:
        return Path(override)
    from contree_shell.config import config_dir

    return config_dir() / "cli" / "sessions" / f"{profile_name}.db"


@dataclass
class Context:
    """Profile, session and output settings shared by the handlers of one invocation."""

    profile: Profile
    session_key: str
    output_format: str = "default"
    in_shell: bool = False
    debug: bool = False
    _store: SessionStore | None = field(default=None, repr=False)
    _client: ContreeClient | None = field(default=None, repr=False)

    @property
    def store(self) -> SessionStore:
        """The profile's session store, opened on first use."""
        if self._store is None:
            from contree_shell.state.sessions import SessionStore

            path = session_db_path(self.profile.name)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._store = SessionStore(path)
        return self._store

    @store.setter
    def store(self, value: SessionStore) -> None:
        self._store = value

    @property
    def client(self) -> ContreeClient:
        """The API client; for the built-in `local` profile the server is started first."""
        if self._client is None:
            from contree_shell.client.api import ContreeClient

            self._client = ContreeClient.for_profile(self.profile)
        return self._client

    @client.setter
    def client(self, value: ContreeClient) -> None:
        self._client = value

    @property
    def structured(self) -> bool:
        """True when the user asked for a machine or table format instead of raw output."""
        return self.output_format != "default"

    def state(self) -> SessionState | None:
        """The session's current state, or None when nothing was `use`d yet."""
        return self.store.state(self.session_key)

    def require_state(self) -> SessionState:
        """The session's current state; raises the "No active session" error without one."""
        state = self.state()
        if state is None or state.tip is None:
            raise NoSession()
        return state

    def current_image(self) -> str:
        """The image uuid at the tip of the active branch."""
        tip = self.require_state().tip
        assert tip is not None  # require_state guarantees a tip
        return tip.image

    def cwd(self) -> str:
        """The session cwd ("" = the image default)."""
        return self.store.cwd(self.session_key) if self.state() is not None else ""

    def derive(self, **changes: Any) -> Context:
        """A copy for one command (e.g. `contree -o json X` inside the shell).

        The store and client are shared, so nothing is reopened.
        """
        new = dataclasses.replace(self, **changes)
        if "profile" in changes:
            new._store = None
            new._client = None
        return new
