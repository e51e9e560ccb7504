"""Run one classified line and contain whatever goes wrong to a single `[ERROR]` line.

The REPL and the script runner both come through here, so a failing command can never
take the shell down or print a traceback (unless `--debug`).

Also here, because they concern every kind of line alike:
- listings go through the pager when they do not fit (paging.py);
- `$?` in a sandbox line is the previous command's status: each run is a fresh `sh -c`,
  so the line is prefixed with `(exit N);` (only when it mentions `$?`; the prefix sets
  `$?` and has no other effect);
- a command that ran for `LONG_RUN` seconds or more ends with a dim `exit S · 12.3s` line,
  so the outcome of a long build is visible where its output ends (the prompt shows a
  non-zero status and the toolbar always shows the last status and duration).
"""

from __future__ import annotations

import re
import time
import traceback

from contree_shell import output
from contree_shell.shell.builtins import run_builtin
from contree_shell.shell.context import ShellContext
from contree_shell.shell.paging import PAGED_BUILTINS, PAGED_COMMANDS, canonical_command, paged
from contree_shell.shell.router import (
    Builtin,
    ContreeCommand,
    Empty,
    Incomplete,
    ParseError,
    RemoteShell,
    Route,
)

__all__ = ["INTERRUPTED", "LONG_RUN", "dispatch", "run_route", "with_last_status"]

INTERRUPTED = 130
LONG_RUN = 5.0
_LAST_STATUS = re.compile(r"\$(\?|\{\?\})")


def with_last_status(line: str, status: int) -> str:
    """`line` for `sh -c`, made to see `status` as `$?` when it mentions `$?`."""
    if not _LAST_STATUS.search(line):
        return line
    return f"(exit {int(status) & 0xFF}); {line}"


def dispatch(sh: ShellContext, route: Route) -> int:
    """Run a route and return its exit status. May raise (see `run_route`)."""
    if isinstance(route, Empty):
        return sh.last.status
    if isinstance(route, Incomplete):
        output.error("Parse error: unterminated quote or trailing backslash")
        return 2
    if isinstance(route, ParseError):
        output.write_stderr(f"{route.msg}\n".encode())  # already a complete message
        return 2
    if isinstance(route, Builtin):
        with paged(sh.pager and route.name in PAGED_BUILTINS):
            return run_builtin(sh, route)
    if isinstance(route, ContreeCommand):
        with paged(sh.pager and _is_listing(route.argv)):
            return _contree(sh, route.argv)
    if isinstance(route, RemoteShell):
        from contree_shell.cli.run import run_line

        line = with_last_status(route.line, sh.last.status)
        return int(run_line(sh.ctx, line, shell=True, stdin=sh.remote_stdin()))
    raise TypeError(f"unknown route {route!r}")


def _is_listing(argv: list[str]) -> bool:
    from contree_shell.shell.commands import shell_parser

    try:
        return canonical_command(argv, shell_parser()) in PAGED_COMMANDS
    except Exception:
        return False


def _contree(sh: ShellContext, argv: list[str]) -> int:
    """`contree …`: the CLI's own dispatcher (it prints usage errors and --help itself)."""
    from contree_shell.cli.main import execute

    if not argv:
        return run_builtin(sh, Builtin("help"))
    return int(execute(sh.ctx, argv))


def run_route(sh: ShellContext, route: Route) -> int:
    """Run a route; record its status and duration; never raise except EOFError (exit)."""
    if isinstance(route, Empty):
        return sh.last.status
    started = time.monotonic()
    try:
        status = dispatch(sh, route)
    except EOFError:
        raise
    except KeyboardInterrupt:
        # The runner already handled the two-stage Ctrl-C; this is one that escaped a
        # local step. Come back to a fresh line and a prompt.
        output.write_stderr(b"\n")
        status = INTERRUPTED
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception as exc:
        output.error(_describe(exc))
        if getattr(sh.ctx, "debug", False):
            output.write_stderr(traceback.format_exc().encode())
        status = 1
    sh.last.status = status
    sh.last.duration = time.monotonic() - started
    if sh.last.duration >= LONG_RUN and isinstance(route, RemoteShell | ContreeCommand):
        from contree_shell.shell.fresh_line import ensure_fresh_line
        from contree_shell.shell.toolbar import format_duration

        ensure_fresh_line()
        output.notice(f"exit {status} · {format_duration(sh.last.duration)}")
    return status


def _describe(exc: BaseException) -> str:
    """One line for the user: our errors carry `.message`, others their type and text."""
    message = getattr(exc, "message", None)
    if isinstance(message, str) and message:
        return message.splitlines()[0]
    text = str(exc).strip().splitlines()
    return f"Command failed: {type(exc).__name__}" + (f": {text[0]}" if text else "")
