"""Decide what one shell line is: a builtin, a `contree` command or a remote command.

PURE: strings in, small dataclasses out. No I/O, no prompt_toolkit. The REPL and the
non-interactive runner both call `classify` on the joined line (see `join_continuation`).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

__all__ = [
    "Builtin",
    "ContreeCommand",
    "Empty",
    "Incomplete",
    "ParseError",
    "RemoteShell",
    "Route",
    "classify",
    "is_incomplete",
    "join_continuation",
    "parse_duration",
    "split_commands",
]


@dataclass(frozen=True)
class Builtin:
    """A local builtin. `raw` is the text after the name, verbatim (used by `timeout`)."""

    name: str
    args: list[str] = field(default_factory=list)
    raw: str = ""


@dataclass(frozen=True)
class ContreeCommand:
    """A `contree …` line; argv excludes the leading `contree`."""

    argv: list[str]


@dataclass(frozen=True)
class RemoteShell:
    """A line that runs in the sandbox through `sh -c`, passed through verbatim."""

    line: str


@dataclass(frozen=True)
class Incomplete:
    """An open quote or a trailing backslash: the REPL asks for more on a `> ` prompt."""


@dataclass(frozen=True)
class ParseError:
    """A line that cannot run; `msg` is the whole one-line message to show."""

    msg: str


@dataclass(frozen=True)
class Empty:
    """Nothing to do: a blank line or a comment."""


Route = Builtin | ContreeCommand | RemoteShell | Incomplete | ParseError | Empty

# Names the router hands to the builtin registry. Kept here (not imported from
# builtins.py) so the router stays pure; test_shell_router pins that both agree.
BUILTIN_NAMES = frozenset(
    {"cd", "pwd", "help", "history", "clear", "timeout", "exit", "quit", "ls", "cat",
     "vim", "vi", "nvim", "nano", "-o", "--format", "--output"}
)

SHELL_IN_SHELL = "Error: 'contree shell' cannot be run from within the shell."
CONTREE_OPERATORS = (
    "Error: pipes, redirects and `;` do not apply to `contree …` lines in the shell; "
    "quote them for the sandbox, e.g. contree run -- sh -c 'a | b'"
)

# Anything that makes a line more than "one command with literal words": when `ls`/`cat`
# see one of these, the sandbox's real shell must interpret the line instead.
_SHELL_SPECIAL = re.compile(r"[|&;<>()$`*?\[\]{}~\\!]")

# Global flags of `contree` that take a value, so `contree -o json shell` is still caught.
_GLOBAL_VALUE_FLAGS = frozenset(
    {"-o", "--format", "--output", "-p", "--profile", "-S", "--session", "--url", "--token",
     "--project"}
)

GLOBAL_VALUE_FLAGS = _GLOBAL_VALUE_FLAGS

# Characters that make sh treat a line as more than one simple command.
_OPERATORS = frozenset("|&;<>()`")

_DURATION = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)([smhd]?)$")
_UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float | None:
    """`5`, `2.5`, `30s`, `5m`, `1h`, `1d` → seconds; None when unparsable or not > 0."""
    match = _DURATION.match(text.strip())
    if not match:
        return None
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return seconds if seconds > 0 else None


def join_continuation(text: str) -> str:
    """Remove backslash-newline pairs (outside single quotes); keep newlines in quotes."""
    out: list[str] = []
    quote = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if quote == "'":
            if ch == "'":
                quote = ""
            out.append(ch)
        elif ch == "\\" and i + 1 < len(text):
            if text[i + 1] == "\n":
                i += 2
                continue
            out.append(text[i : i + 2])
            i += 2
            continue
        else:
            if ch in "'\"" and (not quote or quote == ch):
                quote = "" if quote else ch
            out.append(ch)
        i += 1
    return "".join(out)


def split_commands(text: str) -> list[str]:
    """Split (possibly pasted, possibly multi-line) input into commands, in order.

    Backslash-newlines are joined first; then every newline outside quotes ends a
    command, so a pasted block runs line by line (builtins included) and a quoted
    newline stays inside its command. Blank lines are dropped; an unterminated last
    command is returned as is (it classifies as Incomplete).
    """
    joined = join_continuation(text)
    commands: list[str] = []
    current: list[str] = []
    quote = ""
    escaped = False
    for ch in joined:
        if escaped:
            escaped = False
        elif quote:
            if ch == quote:
                quote = ""
            elif ch == "\\" and quote == '"':
                escaped = True
        elif ch == "\\":
            escaped = True
        elif ch in "'\"":
            quote = ch
        elif ch == "\n":
            commands.append("".join(current))
            current = []
            continue
        current.append(ch)
    commands.append("".join(current))
    return [c for c in commands if c.strip()]


def _tokens(line: str) -> list[str] | None:
    """POSIX shlex tokens, or None when a quote or an escape is left open."""
    try:
        return shlex.split(line, comments=False, posix=True)
    except ValueError:
        return None


def is_incomplete(text: str) -> bool:
    """True when `text` needs another line (open quote, trailing backslash)."""
    return bool(text.strip()) and _tokens(text) is None


def _rest_after_first_word(line: str) -> str:
    """The verbatim text after the first word (the first word itself has no quoting)."""
    stripped = line.lstrip()
    parts = stripped.split(None, 1)
    return parts[1] if len(parts) > 1 else ""


def has_unquoted_operator(line: str) -> bool:
    """Whether sh would see a pipe, list, redirect or subshell operator in `line`."""
    quote = ""
    escaped = False
    for ch in line:
        if escaped:
            escaped = False
        elif quote:
            if ch == quote:
                quote = ""
            elif ch == "\\" and quote == '"':
                escaped = True
        elif ch == "\\":
            escaped = True
        elif ch in "'\"":
            quote = ch
        elif ch in _OPERATORS:
            return True
    return False


def _is_contree_shell(argv: list[str]) -> bool:
    """Whether the first command word of a `contree …` argv is `shell`."""
    skip_value = False
    for token in argv:
        if skip_value:
            skip_value = False
            continue
        if token.startswith("-"):
            skip_value = token in _GLOBAL_VALUE_FLAGS
            continue
        return token == "shell"
    return False


def _simple_words(args: list[str]) -> bool:
    """No flags and nothing a shell would expand or redirect."""
    return not any(a.startswith("-") or _SHELL_SPECIAL.search(a) for a in args)


def classify(line: str) -> Route:
    """Classify one (already joined) shell line."""
    if not line.strip():
        return Empty()
    tokens = _tokens(line)
    if tokens is None:
        return Incomplete()
    if not tokens or tokens[0].startswith("#"):
        return Empty()
    head, args = tokens[0], tokens[1:]

    if head == "contree":
        if _is_contree_shell(args):
            return ParseError(SHELL_IN_SHELL)
        if has_unquoted_operator(_rest_after_first_word(line)):
            return ParseError(CONTREE_OPERATORS)
        return ContreeCommand(args)

    if head not in BUILTIN_NAMES:
        return RemoteShell(line.strip())

    raw = _rest_after_first_word(line)
    if head != "timeout" and has_unquoted_operator(raw):
        # `cd /tmp; ls`, `history | grep x`: a shell line for the sandbox's real shell.
        return RemoteShell(line.strip())
    if head == "timeout":
        # Only intercept a well-formed `timeout DURATION CMD…`; anything else is the
        # image's own timeout(1), with its own error message.
        parts = raw.split(None, 1)
        if len(parts) == 2 and parse_duration(parts[0]) is not None:
            return Builtin("timeout", [parts[0]], parts[1].strip())
        return RemoteShell(line.strip())
    if head == "ls" and (len(args) > 1 or not _simple_words(args)):
        return RemoteShell(line.strip())
    if head == "cat" and (len(args) != 1 or not _simple_words(args)):
        return RemoteShell(line.strip())
    return Builtin(head, args, raw)
