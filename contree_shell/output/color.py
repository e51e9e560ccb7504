"""ANSI colour: when to use it and how to paint text.

Policy (https://no-color.org and the FORCE_COLOR convention): ``NO_COLOR``
(non-empty) always wins, then ``FORCE_COLOR`` (non-empty, not ``0``), else colour
only on a terminal whose TERM is not ``dumb``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

__all__ = [
    "STATUS_STYLES",
    "color_enabled",
    "paint",
    "strip_ansi",
]

_SGR = {
    "bold": "1",
    "dim": "2",
    "italic": "3",
    "underline": "4",
    "red": "31",
    "green": "32",
    "yellow": "33",
    "blue": "34",
    "magenta": "35",
    "cyan": "36",
    "white": "37",
    "gray": "90",
    "bright_red": "91",
    "bright_green": "92",
    "bright_yellow": "93",
    "bright_blue": "94",
    "bright_magenta": "95",
    "bright_cyan": "96",
}

# Operation statuses as the API reports them.
STATUS_STYLES: dict[str, tuple[str, ...]] = {
    "SUCCESS": ("green",),
    "FAILED": ("red",),
    "CANCELLED": ("yellow",),
    "EXECUTING": ("cyan",),
    "ASSIGNED": ("blue",),
    "PENDING": ("blue",),
}

# CSI sequences (colours, cursor moves) and OSC sequences (titles, hyperlinks).
_ANSI_RE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")


def color_enabled(isatty: bool, env: Mapping[str, str] | None = None) -> bool:
    """Whether to emit colour on a stream whose tty-ness is ``isatty``."""
    environ = os.environ if env is None else env
    if environ.get("NO_COLOR", ""):
        return False
    force = environ.get("FORCE_COLOR", "")
    if force and force != "0":
        return True
    return isatty and environ.get("TERM", "") != "dumb"


def paint(text: str, *styles: str, enabled: bool = True) -> str:
    """Wrap ``text`` in SGR codes for ``styles`` (names from this module)."""
    if not enabled or not styles or not text:
        return text
    codes = ";".join(_SGR[s] for s in styles if s in _SGR)
    if not codes:
        return text
    return f"\x1b[{codes}m{text}\x1b[0m"


def strip_ansi(text: str) -> str:
    """Remove ANSI escape sequences (before measuring or writing to a file)."""
    return _ANSI_RE.sub("", text)
