"""Local stdin sources for a remote command.

A source is read on its own thread into a queue; the runner takes the first chunk
for the spawn payload and forwards the rest. Reading never puts the descriptor into
non-blocking mode and can always be stopped (select() on a self-pipe), so a run never
hangs on a terminal that does not reach EOF.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import threading

__all__ = ["EOF", "NoStdin", "PipeStdin", "StdinSource", "TtyLineStdin", "stdin_for_fd"]

CHUNK = 512 * 1024


class _Eof:
    def __repr__(self) -> str:
        return "EOF"


EOF = _Eof()
"""Marker returned by `StdinSource.get` once the input has ended."""


class StdinSource:
    """Base source: `start()`, then `get(timeout)` chunks until EOF; `stop()` always."""

    # How long the runner waits for a first chunk to put into the spawn request.
    initial_wait: float = 0.05

    def start(self) -> None:
        """Begin reading (idempotent)."""

    def get(self, timeout: float | None) -> bytes | _Eof | None:
        """The next chunk, `EOF`, or None if nothing arrived within `timeout` seconds."""
        return EOF

    def stop(self) -> None:
        """Stop reading and release the reader thread (idempotent)."""


class NoStdin(StdinSource):
    """Closed stdin: the remote command reads EOF at once."""


class PipeStdin(StdinSource):
    """Read a descriptor (pipe, file, socket) in chunks of up to 512 KiB until EOF."""

    def __init__(self, fd: int, *, chunk_size: int = CHUNK) -> None:
        self.fd = fd
        self.chunk_size = chunk_size
        # Bounded, so a large file is read ahead by a few chunks only.
        self._queue: queue.Queue[bytes | _Eof] = queue.Queue(maxsize=8)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1
        self._done = False
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._wake_r, self._wake_w = os.pipe()
            self._thread = threading.Thread(target=self._read_loop, name="stdin-reader", daemon=True)
            self._thread.start()

    def _read_loop(self) -> None:
        try:
            while True:
                try:
                    ready, _, _ = select.select([self.fd, self._wake_r], [], [])
                except (OSError, ValueError):
                    break
                if self._wake_r in ready:
                    return  # stopped: no EOF marker, the input did not end
                try:
                    chunk = os.read(self.fd, self.chunk_size)
                except BlockingIOError:
                    continue
                except OSError:
                    break
                if not chunk:
                    break
                if not self._put(chunk):
                    return
            self._put(EOF)
        finally:
            os.close(self._wake_r)

    def _put(self, item: bytes | _Eof) -> bool:
        while not self._stopping.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self, timeout: float | None) -> bytes | _Eof | None:
        if self._done:
            return EOF
        try:
            item = self._queue.get(timeout=timeout) if timeout != 0 else self._queue.get_nowait()
        except queue.Empty:
            return None
        if item is EOF:
            self._done = True
        return item

    def stop(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is None:
                return
            self._stopping.set()
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
            thread.join(timeout=2.0)
            os.close(self._wake_w)
            self._wake_w = -1


class TtyLineStdin(PipeStdin):
    """Forward lines typed on an interactive terminal while a command runs.

    The terminal stays in cooked mode, so each read returns one line when Enter is
    pressed and Ctrl-D at the start of a line reads as EOF. `stop()` ends reading when
    the run is over; whatever was typed but not yet entered stays in the terminal.
    """

    # Nobody types ahead of a command: spawning at once keeps interactive runs snappy
    # (anything already entered is still picked up without waiting).
    initial_wait = 0.0

    def __init__(self, fd: int) -> None:
        super().__init__(fd, chunk_size=4096)


def stdin_for_fd(fd: int = 0, *, interactive: bool = False) -> StdinSource:
    """The right source for descriptor `fd`: a pipe/file is forwarded to EOF; a terminal
    is forwarded line by line only when `interactive`, else the command gets no stdin."""
    try:
        is_tty = os.isatty(fd)
    except OSError:
        return NoStdin()
    if is_tty:
        return TtyLineStdin(fd) if interactive else NoStdin()
    try:
        os.fstat(fd)
    except OSError:
        return NoStdin()
    return PipeStdin(fd)
