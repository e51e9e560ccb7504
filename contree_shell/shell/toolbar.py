"""The bottom toolbar: session, branch, image, depth, cwd, last status and duration.

While completion data is being refreshed in the background it says so ("refreshing
completions…"), and `vi` marks vi editing mode (F4 toggles).
"""

from __future__ import annotations

from prompt_toolkit.formatted_text import FormattedText

from contree_shell.shell.status import Snapshot

__all__ = ["format_duration", "toolbar_tokens", "toolbar_visible"]


def toolbar_visible(mode: str, text: str, completing: bool) -> bool:
    """Whether the toolbar shows: `always`, never (`off`), or while editing (`typing`)."""
    if mode == "typing":
        return bool(text) or completing
    return mode == "always"


def format_duration(seconds: float) -> str:
    """Short human duration: 0.12s, 3.4s, 2m05s, 1h02m."""
    if seconds < 10:
        return f"{seconds:.2f}s" if seconds < 1 else f"{seconds:.1f}s"
    if seconds < 3600:
        minutes, secs = divmod(round(seconds), 60)
        return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m"


def toolbar_tokens(snap: Snapshot, image_label: str, *, refreshing: bool = False,
                   vi: bool = False) -> FormattedText:
    """Toolbar fragments (style classes `bottom-toolbar.*`)."""
    sep = ("class:bottom-toolbar.dim", "  │  ")
    parts: list[tuple[str, str]] = [
        ("class:bottom-toolbar.dim", " session "),
        ("class:bottom-toolbar.key", snap.key),
        sep,
        ("class:bottom-toolbar.branch", snap.branch),
        ("class:bottom-toolbar.dim", f"  depth {snap.depth}"),
        sep,
        ("class:bottom-toolbar.dim", "image "),
        ("class:bottom-toolbar.image", image_label),
        sep,
        ("class:bottom-toolbar.cwd", snap.cwd),
    ]
    if snap.ran:
        parts.append(sep)
        if snap.status == 0:
            parts.append(("class:bottom-toolbar.ok", "✓ 0"))
        else:
            parts.append(("class:bottom-toolbar.fail", f"✗ {snap.status}"))
        parts.append(("class:bottom-toolbar.dim", f" in {format_duration(snap.duration)}"))
    if refreshing:
        parts += [sep, ("class:bottom-toolbar.dim", "refreshing completions…")]
    if vi:
        parts += [sep, ("class:bottom-toolbar.key", "vi")]
    parts.append(("class:bottom-toolbar.dim", "  │  Tab complete · Ctrl-D exit "))
    return FormattedText(parts)
