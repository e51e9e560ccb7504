"""What a remote command started from the shell reads on stdin: the terminal, a bit later.

Forwarding the terminal lets `read x`, `apt-get install` prompts or `cat > file` work
from the shell. But lines typed ahead for the *next* prompt must not vanish into a
quick command that never reads them (the official shell loses them). So the terminal
is only read once a command has run for `delay` seconds: until then, anything typed
stays in the terminal's own buffer and the next prompt picks it up, as in a local shell.
"""

from __future__ import annotations

import threading
from typing import Any

from contree_shell.client.stdin import StdinSource, TtyLineStdin

__all__ = ["DEFAULT_DELAY", "DelayedTerminalStdin"]

DEFAULT_DELAY = 1.0

class DelayedTerminalStdin(StdinSource):
    """Forward lines typed on the terminal (fd), starting `delay` seconds into a run."""

    initial_wait = 0.0  # never hold the spawn back for input

    def __init__(self, fd: int = 0, *, delay: float = DEFAULT_DELAY) -> None:
        self._inner = TtyLineStdin(fd)
        self._delay = delay
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._stopped = False

    def start(self) -> None:
        with self._lock:
            if self._timer is not None or self._stopped:
                return
            self._timer = threading.Timer(self._delay, self._begin)
            self._timer.daemon = True
            self._timer.start()

    def _begin(self) -> None:
        with self._lock:
            if not self._stopped:
                self._inner.start()

    def get(self, timeout: float | None) -> Any:  # bytes | EOF | None, as the base class
        # Before reading starts the inner queue is simply empty: "nothing yet".
        return self._inner.get(timeout)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            if self._timer is not None:
                self._timer.cancel()
            self._inner.stop()
