"""What the shell remembers between lines: the CLI context plus REPL-only state."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LastRun", "ShellContext"]

log = logging.getLogger(__name__)


@dataclass
class LastRun:
    """Outcome of the last command: shown in the prompt (non-zero) and the toolbar."""

    status: int = 0
    duration: float = 0.0


@dataclass
class ShellContext:
    """The REPL's state. `ctx` is the CLI Context shared with `contree …` commands.

    `previous_cwd` is kept in memory only (as `cd -` in a POSIX shell); the cwd itself
    lives in the session store so it follows branches and rollbacks.
    """

    ctx: Any
    previous_cwd: str = "/"
    last: LastRun = field(default_factory=LastRun)
    history: Any = None  # state.history.ShellHistory or None when history is unavailable
    # Interactive shells forward what is typed while a command runs (a fresh source per
    # run); scripts give commands no stdin (the script itself was read up front).
    stdin_source: Callable[[], Any] | None = None
    pager: bool = True  # page listings that do not fit the terminal (settings.pager)
    # Called after a command that may have changed what completion offers (new image,
    # branch switch, new session); the REPL points it at the completion cache.
    on_state_change: Callable[[], None] | None = None

    _connecting: threading.Thread | None = field(default=None, repr=False)
    _connect_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def connect_in_background(self) -> None:
        """Prepare to create the API client (importing httpx, starting the local server if
        needed) on a thread. It starts with `start_connecting` (the REPL calls it once the
        first prompt is on screen, so the prompt never waits for it) or with the first
        `client()`/`wait_connected()`."""

        def connect() -> None:
            try:
                self.ctx.client  # noqa: B018 - the property creates and caches it
            except Exception:
                log.debug("client not available yet", exc_info=True)  # a command says why

        self._connecting = threading.Thread(target=connect, name="connect", daemon=True)

    def start_connecting(self) -> None:
        """Start the prepared background connection (idempotent)."""
        with self._connect_lock:
            thread = self._connecting
            if thread is not None and thread.ident is None:
                thread.start()

    def client(self) -> Any:
        """The API client, once the background connection (if any) has finished."""
        self.wait_connected()
        return self.ctx.client

    def wait_connected(self) -> None:
        """Start and wait for `connect_in_background` (a no-op when it was not used)."""
        self.start_connecting()
        thread = self._connecting
        if thread is not None:
            thread.join()

    def remote_stdin(self) -> Any:
        """The stdin source for one remote command, or None for none."""
        return self.stdin_source() if self.stdin_source is not None else None

    @property
    def key(self) -> str:
        """The session key of this shell."""
        return str(self.ctx.session_key)

    def cwd(self) -> str:
        """The session cwd ("" = the image default)."""
        try:
            return str(self.ctx.store.cwd(self.key) or "")
        except Exception:
            return ""

    def image(self) -> str | None:
        """The image uuid at the tip of the active branch, if any."""
        try:
            state = self.ctx.store.state(self.key)
        except Exception:
            return None
        if state is None or state.tip is None:
            return None
        return str(state.tip.image)
