"""What a remote command started from the shell reads on stdin: lines typed while it runs.

Forwarding the terminal lets `read x`, `apt-get install` prompts or `cat > file` work
from the shell. But people type the next command while the current one is finishing
(its output is on screen, its snapshot is not done yet); the official shell feeds such
lines to the finished command and they are lost. The rule that decides who gets a line:

1. **Type-ahead stays with the next prompt.** Whatever is already waiting in the
   terminal when the command starts (FIONREAD > 0: lines typed while the previous
   command ran, or the rest of a paste) was meant for the *next* prompt, as in a local
   shell. This command then does not read the terminal at all; the bytes stay in the
   kernel's buffer and the next prompt picks them up.
2. **A line typed during the run is read at once and forwarded after `HOLD` seconds**
   if the command is still running then. A command that waits for an answer is still
   running 0.3 s later, and 0.3 s is below what a person notices after pressing Enter;
   a command that was merely finishing (the common case: a short command, 0.1 to 0.3 s
   from its last output to completion here) has ended by then.
3. **Nothing read is lost.** When the run ends (or its process exits, for runners that
   stop stdin then), lines read but not yet forwarded are handed back (`leftover()`)
   and the REPL feeds them to the next prompt as type-ahead.

The terminal stays in cooked mode while a command runs, so partial lines (no Enter yet)
are never read: they too remain for the next prompt. Ctrl-D on an empty line sends EOF.
"""

from __future__ import annotations

import fcntl
import queue
import struct
import termios
import threading
import time
from typing import Any

from contree_shell.client.stdin import EOF, TtyLineStdin

__all__ = ["HOLD", "TerminalStdin", "pending_bytes"]

HOLD = 0.3


def pending_bytes(fd: int) -> int:
    """How many bytes the terminal holds that nobody has read (0 when unknown)."""
    try:
        raw = fcntl.ioctl(fd, termios.FIONREAD, struct.pack("i", 0))
        return int(struct.unpack("i", raw)[0])
    except OSError:
        return 0


class TerminalStdin(TtyLineStdin):
    """Forward lines typed on terminal `fd` during a run (see the module docstring)."""

    initial_wait = 0.0  # never hold the spawn back for input

    def __init__(self, fd: int = 0, *, hold: float = HOLD,
                 clock: Any = time.monotonic) -> None:
        super().__init__(fd)
        self.hold = hold
        self.type_ahead = False
        self._clock = clock
        self._read_at: queue.Queue[float] = queue.Queue()
        self._next: tuple[float, Any] | None = None
        self._leftover: list[bytes] = []
        self._ended = threading.Event()
        self._get_lock = threading.Lock()

    def start(self) -> None:
        if pending_bytes(self.fd) > 0:
            self.type_ahead = True  # rule 1: leave it in the terminal for the next prompt
            return
        super().start()

    def _put(self, item: Any) -> bool:
        self._read_at.put(self._clock())
        return super()._put(item)

    def _take(self, timeout: float | None) -> tuple[float, Any] | None:
        """The next item read from the terminal with the time it was read."""
        if self._next is None:
            item = super().get(timeout)
            if item is None:
                return None
            try:
                read_at = self._read_at.get_nowait()  # _put records it before the item
            except queue.Empty:
                read_at = self._clock()
            self._next = (read_at, item)
        return self._next

    def get(self, timeout: float | None) -> Any:  # bytes | EOF | None, as the base class
        if self.type_ahead:
            # stdin stays open and empty; wait like a quiet terminal would (no busy loop)
            self._ended.wait(timeout)
            return None
        with self._get_lock:
            deadline = None if timeout is None else self._clock() + timeout
            taken = self._take(timeout)
            if taken is None:
                return None
            read_at, item = taken
            if item is not EOF:
                due = read_at + self.hold
                wait = due - self._clock()
                if deadline is not None:
                    wait = min(wait, deadline - self._clock())
                if wait > 0 and self._ended.wait(wait):
                    return None  # the run ended while the line was held: rule 3
                if self._clock() < due:
                    return None
            self._next = None
            return item

    def stop(self) -> None:
        self._ended.set()
        super().stop()
        with self._get_lock:
            if self._next is not None and isinstance(self._next[1], bytes):
                self._leftover.append(self._next[1])
            self._next = None
            while True:
                item = super().get(0)
                if not isinstance(item, bytes):
                    break
                self._leftover.append(item)

    def leftover(self) -> bytes:
        """Lines read from the terminal that the command never received."""
        return b"".join(self._leftover)
