"""Display width of text in terminal cells (wide CJK = 2, combining = 0)."""

from __future__ import annotations

# prompt_toolkit measures with wcwidth too; importing it directly skips prompt_toolkit.
from wcwidth import wcwidth as get_cwidth

from contree_shell.output.color import strip_ansi

__all__ = ["ELLIPSIS", "display_width", "pad", "truncate"]

ELLIPSIS = "…"


def display_width(text: str) -> int:
    """Cells ``text`` takes on a terminal, ignoring ANSI escapes."""
    plain = strip_ansi(text)
    if plain.isascii() and plain.isprintable():
        return len(plain)
    return sum(max(get_cwidth(ch), 0) for ch in plain)


def truncate(text: str, width: int) -> str:
    """Cut plain ``text`` to at most ``width`` cells, ending with ``…`` if cut."""
    if width <= 0:
        return ""
    if display_width(text) <= width:
        return text
    out: list[str] = []
    used = 0
    limit = width - 1  # room for the ellipsis
    for ch in text:
        w = max(get_cwidth(ch), 0)
        if used + w > limit:
            break
        out.append(ch)
        used += w
    return "".join(out) + ELLIPSIS


def pad(text: str, width: int, *, right: bool = False) -> str:
    """Pad (possibly coloured) ``text`` with spaces to ``width`` cells."""
    gap = width - display_width(text)
    if gap <= 0:
        return text
    return " " * gap + text if right else text + " " * gap
