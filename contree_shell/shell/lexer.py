"""Pygments lexer for shell input: contree commands and builtins stand out, the rest is Bash.

Only the first word decides: `contree` and its subcommand words are keywords, a builtin
name is a keyword, and everything else is handed to Pygments' BashLexer, exactly as the
sandbox's `sh -c` will read it.
"""

from __future__ import annotations

from typing import ClassVar

from pygments.lexer import RegexLexer, bygroups, using, words
from pygments.lexers.shell import BashLexer
from pygments.token import Keyword, Name, Whitespace

from contree_shell.shell.router import BUILTIN_NAMES

__all__ = ["ContreeShellLexer"]

_BUILTINS = tuple(sorted(BUILTIN_NAMES))


class ContreeShellLexer(RegexLexer):
    """Highlights one shell line (or a continued multi-line command)."""

    name = "contree shell"
    aliases: ClassVar[list[str]] = ["contree-shell"]
    filenames: ClassVar[list[str]] = []

    tokens: ClassVar[dict] = {
        "root": [
            (r"[ \t]+", Whitespace),
            (r"(\s*)(contree)(?=\s|$)", bygroups(Whitespace, Keyword), "contree"),
            (words(_BUILTINS, prefix=r"(?<!\S)", suffix=r"(?=\s|$)"), Keyword, "args"),
            (r"[\s\S]+", using(BashLexer)),
        ],
        # Subcommand words right after `contree` (up to the first flag or value).
        "contree": [
            (r"[ \t]+", Whitespace),
            (r"[a-z][a-z0-9-]*(?=\s|$)", Name.Function),
            (r"[\s\S]+", using(BashLexer), "#pop"),
        ],
        "args": [
            (r"[\s\S]+", using(BashLexer), "#pop"),
        ],
    }

