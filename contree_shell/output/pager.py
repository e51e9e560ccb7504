"""Pager policy: page only output taller or wider than the terminal.

The command is ``CONTREE_PAGER`` (``""``, ``0``, ``off``, ``no``, ``false``
disable paging), else ``PAGER`` (empty disables), else ``less``. ``LESS``
defaults to ``-RXF``: keep colours, leave the text on screen, quit at once if it
fits after all.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Mapping

from contree_shell.output.text import display_width

__all__ = ["DEFAULT_LESS", "needs_paging", "pager_command", "pager_env", "run_pager"]

DEFAULT_LESS = "-RXF"
_OFF = {"", "0", "off", "no", "false", "never"}


def needs_paging(text: str, rows: int, columns: int) -> bool:
    """Whether ``text`` is taller (leaving a line for the prompt) or wider than a
    ``columns`` x ``rows`` terminal."""
    lines = text.splitlines()
    if len(lines) > max(rows - 1, 1):
        return True
    return any(display_width(line) > columns for line in lines)


def pager_command(env: Mapping[str, str] | None = None) -> list[str] | None:
    """The pager argv, or None when paging is disabled."""
    environ = os.environ if env is None else env
    if "CONTREE_PAGER" in environ:
        value = environ["CONTREE_PAGER"].strip()
        if value.lower() in _OFF:
            return None
    elif "PAGER" in environ:
        value = environ["PAGER"].strip()
        if not value:
            return None
    else:
        value = "less"
    try:
        argv = shlex.split(value)
    except ValueError:
        return None
    return argv or None


def pager_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for the pager: ours plus ``LESS=-RXF`` unless already set."""
    out = dict(os.environ if env is None else env)
    out.setdefault("LESS", DEFAULT_LESS)
    return out


def run_pager(text: str, argv: list[str], env: Mapping[str, str] | None = None) -> bool:
    """Feed ``text`` to the pager and wait for it; False if it could not start."""
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, env=pager_env(env))
    except OSError:
        return False
    assert proc.stdin is not None
    try:
        proc.stdin.write(text.encode("utf-8", "replace"))
        proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass  # the user quit the pager early
    while True:
        try:
            proc.wait()
            break
        except KeyboardInterrupt:
            continue  # Ctrl-C belongs to the pager while it runs
    return True
