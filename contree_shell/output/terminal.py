"""The one place that writes to the terminal.

An :class:`Output` wraps stdout/stderr (by default whatever ``sys.stdout`` and
``sys.stderr`` are at call time, so redirection and test capture work). Module
functions use a process-wide default instance (:func:`get_output`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, Any

from contree_shell.output.color import color_enabled, paint
from contree_shell.output.formatters import Formatter, get_formatter
from contree_shell.output.pager import needs_paging, pager_command, run_pager

__all__ = [
    "EXIT_BROKEN_PIPE",
    "Output",
    "RowStream",
    "StdoutClosed",
    "emit",
    "emit_rows",
    "error",
    "get_output",
    "info",
    "line",
    "notice",
    "page_if_needed",
    "set_output",
    "warn",
    "write_stderr",
    "write_stdout",
]

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for `cmd | head`


class StdoutClosed(SystemExit):
    """stdout's reader went away (``| head``): exit quietly with status 141."""

    def __init__(self) -> None:
        super().__init__(EXIT_BROKEN_PIPE)


def _write(stream: IO[Any], data: bytes) -> None:
    """Write bytes to a binary stream, or decoded to a text-only one (StringIO,
    prompt_toolkit's StdoutProxy under patch_stdout)."""
    binary = getattr(stream, "buffer", None)
    if binary is not None:
        binary.write(data)
        binary.flush()
        return
    try:
        stream.write(data)
    except TypeError:
        stream.write(data.decode(getattr(stream, "encoding", None) or "utf-8", "replace"))
    stream.flush()


def _isatty(stream: IO[Any]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class Output:
    """Terminal writer: raw streams, level-tagged messages, formatted rows, pager."""

    def __init__(
        self,
        stdout: IO[Any] | None = None,
        stderr: IO[Any] | None = None,
        *,
        stdout_tty: bool | None = None,
        stderr_tty: bool | None = None,
        env: Mapping[str, str] | None = None,
        size: tuple[int, int] | None = None,
        pager: bool = True,
    ) -> None:
        self._stdout = stdout
        self._stderr = stderr
        self._stdout_tty = stdout_tty
        self._stderr_tty = stderr_tty
        self._env = env
        self._size = size
        self.pager_enabled = pager

    # -- streams

    @property
    def stdout(self) -> IO[Any]:
        return self._stdout if self._stdout is not None else sys.stdout

    @property
    def stderr(self) -> IO[Any]:
        return self._stderr if self._stderr is not None else sys.stderr

    @property
    def env(self) -> Mapping[str, str]:
        return os.environ if self._env is None else self._env

    @property
    def stdout_is_tty(self) -> bool:
        return self._stdout_tty if self._stdout_tty is not None else _isatty(self.stdout)

    @property
    def stderr_is_tty(self) -> bool:
        return self._stderr_tty if self._stderr_tty is not None else _isatty(self.stderr)

    @property
    def stdout_color(self) -> bool:
        return color_enabled(self.stdout_is_tty, self.env)

    @property
    def stderr_color(self) -> bool:
        return color_enabled(self.stderr_is_tty, self.env)

    def terminal_size(self) -> tuple[int, int]:
        """(columns, rows) of the terminal (``COLUMNS``/``LINES`` win; 80x24 fallback)."""
        if self._size is not None:
            return self._size
        size = shutil.get_terminal_size((80, 24))
        return size.columns, size.lines

    def write_stdout(self, data: bytes) -> None:
        """Write bytes to stdout and flush. A closed pipe raises StdoutClosed."""
        stream = self.stdout
        try:
            _write(stream, data)
        except BrokenPipeError:
            self._silence_stdout(stream)
            raise StdoutClosed() from None

    def write_stderr(self, data: bytes) -> None:
        """Write bytes to stderr and flush; a closed stderr is ignored."""
        try:
            _write(self.stderr, data)
        except (BrokenPipeError, ValueError):
            pass

    @staticmethod
    def _silence_stdout(stream: IO[Any]) -> None:
        # Python flushes sys.stdout again at exit and would print a second
        # BrokenPipeError; point the fd at /dev/null (the documented recipe).
        if stream is not sys.stdout and stream is not sys.__stdout__:
            return
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)

    # -- text

    def line(self, text: str = "") -> None:
        """Write one line of text to stdout."""
        self.write_stdout((text + "\n").encode("utf-8", "replace"))

    def text(self, text: str) -> None:
        """Write text to stdout as is."""
        self.write_stdout(text.encode("utf-8", "replace"))

    def _message(self, tag: str | None, style: str | None, msg: str) -> None:
        color = self.stderr_color
        if tag is not None:
            prefix = paint(f"[{tag}]", style or "", "bold", enabled=color) if style else f"[{tag}]"
            text = f"{prefix} {msg}"
        else:
            text = paint(msg, style, enabled=color) if style else msg
        self.write_stderr((text + "\n").encode("utf-8", "replace"))

    def error(self, msg: str) -> None:
        """``[ERROR] msg`` on stderr (red tag when colour is on)."""
        self._message("ERROR", "red", msg)

    def warn(self, msg: str) -> None:
        """``[WARNING] msg`` on stderr (yellow tag when colour is on)."""
        self._message("WARNING", "yellow", msg)

    def info(self, msg: str) -> None:
        """An informational line on stderr (``Set K=V``, ``Pending: …``)."""
        self._message(None, None, msg)

    def notice(self, msg: str) -> None:
        """A side remark on stderr (``Hid a, b to fit terminal…``), dimmed."""
        self._message(None, "gray", msg)

    # -- rows

    def formatter(
        self, fmt: str = "default", *, head: Sequence[str] = (), tail: Sequence[str] = ()
    ) -> Formatter:
        """A formatter set up for this stdout (TTY width and colour)."""
        tty = self.stdout_is_tty
        return get_formatter(
            fmt,
            head=head,
            tail=tail,
            tty=tty,
            width=self.terminal_size()[0] if tty else None,
            color=self.stdout_color,
        )

    def stream(
        self, fmt: str = "default", *, head: Sequence[str] = (), tail: Sequence[str] = ()
    ) -> RowStream:
        """Rows written page by page with one layout (see :class:`RowStream`)."""
        return RowStream(self, self.formatter(fmt, head=head, tail=tail))

    def emit(
        self,
        rows: Iterable[Mapping[str, Any]],
        fmt: str = "default",
        *,
        head: Sequence[str] = (),
        tail: Sequence[str] = (),
        page: bool = False,
    ) -> None:
        """Format rows and write them (through the pager if ``page`` and needed);
        notices such as hidden columns go to stderr afterwards."""
        formatter = self.formatter(fmt, head=head, tail=tail)
        formatter.add(rows)
        text = formatter.close()
        if page:
            self.page_if_needed(text)
        else:
            self.text(text)
        for msg in formatter.take_notices():
            self.notice(msg)

    def page_if_needed(self, text: str, *, enabled: bool | None = None) -> None:
        """Write ``text`` through the pager when stdout is a terminal, paging is
        on, and the text is taller or wider than the terminal; else write it."""
        use = self.pager_enabled if enabled is None else enabled
        if use and self.stdout_is_tty:
            columns, rows = self.terminal_size()
            argv = pager_command(self.env)
            if argv and needs_paging(text, rows, columns) and run_pager(text, argv, self.env):
                return
        self.text(text)


class RowStream:
    """Paginated rows: ``add`` a page, ``flush`` it; ``close`` ends the output
    (closes the json-pretty array). Usable as a context manager."""

    def __init__(self, output: Output, formatter: Formatter) -> None:
        self.output = output
        self.formatter = formatter

    def add(self, rows: Iterable[Mapping[str, Any]]) -> None:
        self.formatter.add(rows)

    def flush(self) -> None:
        self._write(self.formatter.flush())

    def write(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """add + flush."""
        self.add(rows)
        self.flush()

    def close(self) -> None:
        self._write(self.formatter.close())

    def _write(self, text: str) -> None:
        if text:
            self.output.text(text)
        for msg in self.formatter.take_notices():
            self.output.notice(msg)

    def __enter__(self) -> RowStream:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None or exc_type is KeyboardInterrupt:
            self.close()


_default: Output | None = None


def get_output() -> Output:
    """The process-wide Output."""
    global _default
    if _default is None:
        _default = Output()
    return _default


def set_output(output: Output | None) -> Output | None:
    """Replace the process-wide Output (None restores the default); returns the old one."""
    global _default
    old, _default = _default, output
    return old


def write_stdout(data: bytes) -> None:
    """Write bytes to stdout (see :meth:`Output.write_stdout`)."""
    get_output().write_stdout(data)


def write_stderr(data: bytes) -> None:
    """Write bytes to stderr."""
    get_output().write_stderr(data)


def line(text: str = "") -> None:
    """Write a line to stdout."""
    get_output().line(text)


def error(msg: str) -> None:
    """``[ERROR] msg`` on stderr."""
    get_output().error(msg)


def warn(msg: str) -> None:
    """``[WARNING] msg`` on stderr."""
    get_output().warn(msg)


def info(msg: str) -> None:
    """An informational line on stderr."""
    get_output().info(msg)


def notice(msg: str) -> None:
    """A dimmed remark on stderr."""
    get_output().notice(msg)


def emit(
    rows: Iterable[Mapping[str, Any]],
    fmt: str = "default",
    *,
    head: Sequence[str] = (),
    tail: Sequence[str] = (),
    page: bool = False,
) -> None:
    """Format and write rows (see :meth:`Output.emit`)."""
    get_output().emit(rows, fmt, head=head, tail=tail, page=page)


emit_rows = emit  # the name in contracts.md


def page_if_needed(text: str, *, enabled: bool | None = None) -> None:
    """Write text, through the pager if it does not fit the terminal."""
    get_output().page_if_needed(text, enabled=enabled)
