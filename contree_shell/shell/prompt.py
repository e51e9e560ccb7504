"""The prompt line: `[STATUS] (branch) cwd $ `.

The plain text `(branch) cwd $ ` is always present (terminal tests and people read it);
a non-zero exit status of the last command is prefixed as `[N] `.
"""

from __future__ import annotations

from prompt_toolkit.formatted_text import FormattedText

from contree_shell.shell.status import Snapshot

__all__ = ["CONTINUATION", "continuation", "prompt_message"]

CONTINUATION = "> "


def prompt_message(snap: Snapshot) -> FormattedText:
    """Prompt fragments for prompt_toolkit (styled by style.py's `prompt.*` classes)."""
    parts: list[tuple[str, str]] = []
    if snap.status != 0:
        parts.append(("class:prompt.status", f"[{snap.status}]"))
        parts.append(("", " "))
    parts += [
        ("class:prompt.branch", f"({snap.branch})"),
        ("", " "),
        ("class:prompt.cwd", snap.cwd),
        ("class:prompt.dollar", " $ "),
    ]
    return FormattedText(parts)


def continuation(width: int, line_number: int, wrap_count: int) -> FormattedText:
    """`> ` for each continued line (blank for soft wraps of a long line)."""
    if wrap_count:
        return FormattedText([("", " " * width)])
    # Flush left like sh's PS2: what the user sees is exactly `> `.
    return FormattedText([("class:continuation", CONTINUATION)])
