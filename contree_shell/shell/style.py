"""The shell's look: a Pygments style for the input plus our own prompt/toolbar classes."""

from __future__ import annotations

from prompt_toolkit.styles import BaseStyle, Style, merge_styles, style_from_pygments_cls
from pygments.styles import get_style_by_name
from pygments.util import ClassNotFound

__all__ = ["PROMPT_CLASSES", "style_factory"]

# Class names used by prompt.py and toolbar.py. The prompt colours follow the official
# shell: branch magenta, cwd bold blue.
PROMPT_CLASSES: dict[str, str] = {
    "prompt.status": "ansired bold",
    "prompt.branch": "ansimagenta",
    "prompt.cwd": "ansiblue bold",
    "prompt.dollar": "",
    "continuation": "ansigray",
    "bottom-toolbar": "noreverse bg:#303030 #d0d0d0",
    "bottom-toolbar.key": "#87afd7",
    "bottom-toolbar.branch": "ansimagenta",
    "bottom-toolbar.image": "ansicyan",
    "bottom-toolbar.cwd": "ansiblue bold",
    "bottom-toolbar.ok": "ansigreen",
    "bottom-toolbar.fail": "ansired bold",
    "bottom-toolbar.dim": "#8a8a8a",
}


def style_factory(pygments_style: str = "native", overrides: dict[str, str] | None = None
                  ) -> BaseStyle:
    """Merge a Pygments style (input highlighting), our classes and user overrides."""
    try:
        base = style_from_pygments_cls(get_style_by_name(pygments_style))
    except ClassNotFound:
        base = style_from_pygments_cls(get_style_by_name("default"))
    ours = Style.from_dict({**PROMPT_CLASSES, **(overrides or {})})
    return merge_styles([base, ours])
