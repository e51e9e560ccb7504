"""Keep lines that carry credentials out of the persistent shell history.

Such a line still works for Up-arrow in the current shell (prompt_toolkit keeps it in
memory); it is just never written to the state DB, where it would outlive the shell.
"""

from __future__ import annotations

import re

__all__ = ["looks_secret"]

_SECRET = re.compile(
    r"""
    --(?:token|password|passwd|secret)(?:[=\s]|$)                        # CLI flags
    | \b[\w-]*(?:token|password|passwd|secret|api[_-]?key)[\w-]*\s*[=:]\s*\S   # KEY=value
    | \bauthorization:\s*\S                                              # HTTP headers
    """,
    re.IGNORECASE | re.VERBOSE,
)


def looks_secret(line: str) -> bool:
    """True when `line` seems to contain a credential (token, password, API key)."""
    return bool(_SECRET.search(line))
