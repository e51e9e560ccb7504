"""Terminal output: formatters, pager policy, colour. The only package that
writes to stdout/stderr."""

from __future__ import annotations

from contree_shell.output.color import color_enabled, paint, strip_ansi
from contree_shell.output.formatters import FORMATS, Formatter, UnknownFormat, get_formatter, render
from contree_shell.output.terminal import (
    EXIT_BROKEN_PIPE,
    Output,
    RowStream,
    StdoutClosed,
    emit,
    emit_rows,
    error,
    get_output,
    info,
    line,
    notice,
    page_if_needed,
    set_output,
    warn,
    write_stderr,
    write_stdout,
)
from contree_shell.output.text import display_width, truncate

__all__ = [
    "EXIT_BROKEN_PIPE",
    "FORMATS",
    "Formatter",
    "Output",
    "RowStream",
    "StdoutClosed",
    "UnknownFormat",
    "color_enabled",
    "display_width",
    "emit",
    "emit_rows",
    "error",
    "get_formatter",
    "get_output",
    "info",
    "line",
    "notice",
    "page_if_needed",
    "paint",
    "render",
    "set_output",
    "strip_ansi",
    "truncate",
    "warn",
    "write_stderr",
    "write_stdout",
]
