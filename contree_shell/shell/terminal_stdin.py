"""What a remote command started from the shell reads on stdin: lines typed while it runs.

Forwarding the terminal lets `read x`, `apt-get install` prompts or `cat > file` work
from the shell. The rule that decides which typed lines a command gets:

1. **Type-ahead stays with the next prompt.** Whatever is already waiting in the
   terminal when the command starts (FIONREAD > 0: lines typed while the previous
   command ran, or pasted after this one) was meant for the *next* prompt, as in a local
   shell where a command that never reads leaves it there. Then this command does not
   read the terminal at all; the bytes stay in the kernel's buffer and the next prompt
   picks them up. The official shell reads them into the wrong command and loses them.
2. **Otherwise forward at once.** A line typed after the command started (the person
   watched it start and answered it) is read the moment Enter is pressed — no delay, so
   `read x` answers immediately. The runner only sends it while the operation is still
   running (its forwarder starts on the process's first event and stops at completion).
3. **Nothing read is lost.** A line read but not yet sent when the command ends (it
   finished between Enter and the send) is handed back (`leftover()`), and the REPL
   feeds it to the next prompt as type-ahead.

The terminal stays in cooked mode while a command runs, so partial lines (no Enter yet)
are never read: they too remain for the next prompt. Ctrl-D on an empty line sends EOF.
"""

from __future__ import annotations

import fcntl
import struct
import termios
import threading
from typing import Any

from contree_shell.client.stdin import TtyLineStdin

__all__ = ["TerminalStdin", "pending_bytes"]


def pending_bytes(fd: int) -> int:
    """How many bytes the terminal holds that nobody has read (0 when unknown)."""
    try:
        raw = fcntl.ioctl(fd, termios.FIONREAD, struct.pack("i", 0))
        return int(struct.unpack("i", raw)[0])
    except OSError:
        return 0


class TerminalStdin(TtyLineStdin):
    """Forward lines typed on terminal `fd` during a run, unless type-ahead is waiting."""

    initial_wait = 0.0  # never hold the spawn back for input

    def __init__(self, fd: int = 0) -> None:
        super().__init__(fd)
        self.type_ahead = False
        self._leftover: list[bytes] = []
        self._ended = threading.Event()

    def start(self) -> None:
        if pending_bytes(self.fd) > 0:
            self.type_ahead = True  # rule 1: leave it in the terminal for the next prompt
            return
        super().start()

    def get(self, timeout: float | None) -> Any:  # bytes | EOF | None, as the base class
        if self.type_ahead:
            # stdin stays open and empty; wait like a quiet terminal would (no busy loop)
            self._ended.wait(timeout if timeout is not None else None)
            return None
        return super().get(timeout)

    def stop(self) -> None:
        self._ended.set()
        super().stop()
        while True:  # rule 3: collect what was read but never handed to the runner
            item = super().get(0)
            if not isinstance(item, bytes):
                break
            self._leftover.append(item)

    def leftover(self) -> bytes:
        """Lines read from the terminal that the command never received."""
        return b"".join(self._leftover)
