"""PURE completion analysis: what kind of thing belongs at the cursor?

`analyze(text_before_cursor, parser)` splits the text like a shell would, walks the
`contree` argparse tree for `contree …` lines, and returns the word being completed plus
the kinds of candidates that fit (`Suggestion`s). It does no I/O: the completer maps each
suggestion to a data source. Bare lines are NOT walked as contree commands (they run in
the sandbox, so `session <Tab>` must not offer contree subcommands: a bug of the
official shell).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

__all__ = [
    "Analysis",
    "BuiltinNames",
    "Choices",
    "CommandNames",
    "FlagNames",
    "HelpTopics",
    "HostPath",
    "SandboxPath",
    "Source",
    "Suggestion",
    "Word",
    "analyze",
    "split_words",
]


@dataclass(frozen=True)
class Word:
    """One shell word: `raw` as typed (quotes included), `value` after unquoting."""

    raw: str
    value: str


@dataclass(frozen=True)
class BuiltinNames:
    """The first word of a line: builtin names and `contree`."""


@dataclass(frozen=True)
class HelpTopics:
    """The topic of `help`: builtins and contree command names."""


@dataclass(frozen=True)
class CommandNames:
    """Subcommands of the contree command at `path`."""

    path: tuple[str, ...]
    names: tuple[str, ...]


@dataclass(frozen=True)
class FlagNames:
    """Option strings of the contree command at `path`, with their help."""

    path: tuple[str, ...]
    flags: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Choices:
    """A fixed set of values (argparse `choices`)."""

    values: tuple[str, ...]


@dataclass(frozen=True)
class Source:
    """Values from a named data source, e.g. "branch", "image", "session", "profile"."""

    name: str
    path: tuple[str, ...] = ()
    dest: str = ""


@dataclass(frozen=True)
class SandboxPath:
    """A path inside the sandbox, relative ones resolved against the session cwd."""

    dirs_only: bool = False


@dataclass(frozen=True)
class HostPath:
    """A path on this machine (an argument that names a local file)."""


Suggestion = (BuiltinNames | HelpTopics | CommandNames | FlagNames | Choices | Source
              | SandboxPath | HostPath)


@dataclass(frozen=True)
class Analysis:
    """The word under the cursor and what may complete it."""

    word: Word
    suggestions: tuple[Suggestion, ...] = field(default_factory=tuple)


# Builtins whose arguments are sandbox paths (cd: directories only).
_PATH_BUILTINS = {"cd": True, "ls": False, "cat": False, "vim": False, "vi": False,
                  "nvim": False, "nano": False}
_FORMAT_BUILTINS = {"-o", "--format", "--output"}

# Argument names → data source. Matched on the argparse dest and metavar (lowercased),
# so the CLI's command modules need no completion-specific annotations.
_SOURCE_BY_NAME = {
    "branch": "branch", "from_branch": "branch", "branches": "branch",
    "image": "image", "use": "image",
    "session": "session", "session_key": "session",
    "profile": "profile",
    "operation": "operation", "op": "operation", "operations": "operation",
    "env_key": "env-key",
}
# Arguments that name a file on this machine, by dest/metavar.
_HOST_NAMES = {"local", "local_path", "host_path", "host_file", "output_file", "outfile",
               "context", "dockerfile", "archive"}
_PATH_NAMES = {"path", "paths", "file", "files", "src", "source", "target", "dir", "directory",
               "cwd", "dest", "destination", "instance_path"}
_DIR_NAMES = {"dir", "directory", "cwd"}
# Where the name says nothing, the command path does.
_SOURCE_BY_COMMAND = {
    ("session", "checkout"): "branch",
    ("checkout",): "branch",
    ("session", "show"): "session",
    ("session", "delete"): "session",
    ("session", "use"): "session",
    ("env",): "env-key",
    ("unset",): "env-key",
}
# (command path, dest) of arguments that name a file on this machine.
_HOST_ARGS: set[tuple[tuple[str, ...], str]] = {
    (("cp",), "dest"), (("export",), "out"), (("file", "cp"), "src"),
    (("build",), "context"), (("build",), "file"),
}
# Where the name says nothing, the command path does: `tag [IMAGE] TAG`, `show UUID`.
_SOURCE_BY_ARG: dict[tuple[tuple[str, ...], str], str] = {
    (("tag",), "refs"): "image",
    (("show",), "operations"): "operation",
    (("kill",), "operations"): "operation",
}

# Commands whose path argument must be a directory.
_DIR_COMMANDS = {("cd",)}


def split_words(text: str) -> tuple[list[Word], Word | None]:
    """Split like POSIX sh. Returns (complete words, the word being typed or None).

    An open quote is fine: the partial word runs to the end. A word is complete once
    unquoted whitespace follows it.
    """
    words: list[Word] = []
    raw: list[str] = []
    value: list[str] = []
    quote = ""
    in_word = False
    i = 0
    while i < len(text):
        ch = text[i]
        if quote == "'":
            raw.append(ch)
            if ch == "'":
                quote = ""
            else:
                value.append(ch)
        elif ch == "\\" and quote != "'":
            nxt = text[i + 1] if i + 1 < len(text) else ""
            raw.append(ch + nxt)
            if nxt != "\n":
                value.append(nxt)
            in_word = True
            i += 2
            continue
        elif quote == '"':
            raw.append(ch)
            if ch == '"':
                quote = ""
            else:
                value.append(ch)
        elif ch in " \t\n":
            if in_word:
                words.append(Word("".join(raw), "".join(value)))
                raw, value, in_word = [], [], False
        else:
            in_word = True
            raw.append(ch)
            if ch in "'\"":
                quote = ch
            else:
                value.append(ch)
        i += 1
    current = Word("".join(raw), "".join(value)) if in_word else None
    return words, current


def analyze(
    text: str, parser: argparse.ArgumentParser | None, builtins: frozenset[str] | set[str]
) -> Analysis:
    """What may complete the word at the end of `text` (the text before the cursor)."""
    words, current = split_words(text)
    word = current or Word("", "")
    values = [w.value for w in words]
    if not values:
        found: tuple[Suggestion, ...] = (BuiltinNames(),)
        if _looks_like_path(word.value):
            found = (SandboxPath(),)
        return Analysis(word, found)
    head = values[0]
    if head == "contree":
        if parser is None:
            return Analysis(word)
        return Analysis(word, _walk(parser, values[1:], word.value))
    if head in builtins:
        return Analysis(word, _builtin_args(head, values[1:], word, parser, builtins))
    return Analysis(word, _remote_arg(word))


def _looks_like_path(value: str) -> bool:
    return "/" in value or value.startswith(".") or value.startswith("~")


def _remote_arg(word: Word) -> tuple[Suggestion, ...]:
    """An argument of a command that runs in the sandbox: a sandbox path unless a flag."""
    if word.value.startswith("-"):
        return ()
    return (SandboxPath(),)


def _builtin_args(
    head: str, args: list[str], word: Word, parser: argparse.ArgumentParser | None,
    builtins: frozenset[str] | set[str],
) -> tuple[Suggestion, ...]:
    if head in _PATH_BUILTINS:
        if args or word.value.startswith("-"):
            # `ls -l x`, `cat a b`: the router sends these to the sandbox anyway.
            return () if head == "cd" else _remote_arg(word)
        return (SandboxPath(dirs_only=_PATH_BUILTINS[head]),)
    if head in _FORMAT_BUILTINS:
        from contree_shell.output.formatters import FORMATS

        return (Choices(tuple(FORMATS)),) if not args else ()
    if head == "help":
        if not args:
            return (HelpTopics(),)
        if parser is None:
            return ()
        sub = _descend(parser, [a for a in args if a != "contree"])
        if sub is None:
            return ()
        names = _subcommand_names(sub)
        return (CommandNames(tuple(args), names),) if names else ()
    if head == "timeout":
        if not args:
            return ()
        # `timeout 5m CMD…`: the command after the duration completes like a bare line.
        rest = args[1:]
        if not rest:
            return (BuiltinNames(),) if not _looks_like_path(word.value) else (SandboxPath(),)
        return _remote_arg(word)
    return ()  # pwd, clear, exit, history: nothing worth completing


# -- the argparse walk ---------------------------------------------------------------------


def _subparsers_action(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def _subcommand_names(parser: argparse.ArgumentParser) -> tuple[str, ...]:
    action = _subparsers_action(parser)
    return tuple(action.choices) if action is not None else ()


def _descend(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser | None:
    for word in words:
        action = _subparsers_action(parser)
        if action is None or word not in action.choices:
            return None
        parser = action.choices[word]
    return parser


def _canonical(sub: argparse.ArgumentParser, typed: str) -> str:
    """The canonical name of a subcommand (aliases map to the name in `prog`)."""
    last = sub.prog.split()[-1] if sub.prog else typed
    return last or typed


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0 and not isinstance(
        action,
        argparse._StoreConstAction | argparse._CountAction | argparse._HelpAction
        | argparse._VersionAction | argparse.BooleanOptionalAction,
    )


def _value_count(action: argparse.Action) -> float:
    nargs = action.nargs
    if nargs is None or nargs == argparse.OPTIONAL:
        return 1
    if isinstance(nargs, int):
        return nargs
    return float("inf")


def _find_option(parser: argparse.ArgumentParser, token: str) -> argparse.Action | None:
    return parser._option_string_actions.get(token)


@dataclass
class _Walk:
    parser: argparse.ArgumentParser
    path: list[str] = field(default_factory=list)
    pos_index: int = 0
    pos_consumed: int = 0
    pending: argparse.Action | None = None
    pending_left: float = 0
    remainder: bool = False
    dead: bool = False  # an unknown subcommand: nothing sensible to offer

    def positionals(self) -> list[argparse.Action]:
        return [a for a in self.parser._actions if not a.option_strings]

    def feed_positional(self, token: str) -> None:
        actions = self.positionals()
        while self.pos_index < len(actions):
            action = actions[self.pos_index]
            if isinstance(action, argparse._SubParsersAction):
                sub = action.choices.get(token)
                if sub is None:
                    self.dead = True
                    return
                self.parser = sub
                self.path.append(_canonical(sub, token))
                self.pos_index = 0
                self.pos_consumed = 0
                return
            if action.nargs == argparse.REMAINDER:
                self.remainder = True
                return
            cap = _value_count(action)
            if self.pos_consumed < cap:
                self.pos_consumed += 1
                if self.pos_consumed >= cap:
                    self.pos_index += 1
                    self.pos_consumed = 0
                return
            self.pos_index += 1
            self.pos_consumed = 0
        # More words than positionals: argparse would complain; offer nothing.

    def current_positional(self) -> argparse.Action | None:
        actions = self.positionals()
        return actions[self.pos_index] if self.pos_index < len(actions) else None


def _walk(parser: argparse.ArgumentParser, tokens: list[str], partial: str
          ) -> tuple[Suggestion, ...]:
    state = _Walk(parser)
    dashdash = False
    for token in tokens:
        if state.remainder or state.dead:
            break
        if state.pending is not None:
            state.pending_left -= 1
            if state.pending_left <= 0 or token.startswith("-"):
                state.pending = None
            if state.pending is not None or not token.startswith("-"):
                continue
        if token == "--" and not dashdash:
            dashdash = True
            continue
        if token.startswith("-") and len(token) > 1 and not dashdash:
            if "=" in token:
                continue
            action = _find_option(state.parser, token)
            if action is not None and _takes_value(action):
                state.pending = action
                state.pending_left = _value_count(action)
            continue
        state.feed_positional(token)
    if state.dead:
        return ()
    path = tuple(state.path)
    if state.remainder:
        return (SandboxPath(),)
    if state.pending is not None:
        return _values_for(path, state.pending)
    if partial.startswith("-") and not dashdash:
        if "=" in partial:
            action = _find_option(state.parser, partial.split("=", 1)[0])
            return _values_for(path, action) if action is not None else ()
        return (_flags(state.parser, path),)
    action = state.current_positional()
    if action is None:
        return ()
    if isinstance(action, argparse._SubParsersAction):
        return (CommandNames(path, tuple(action.choices)),)
    if action.nargs == argparse.REMAINDER:
        return (SandboxPath(),)
    return _values_for(path, action)


def _flags(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> FlagNames:
    flags: list[tuple[str, str]] = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:
            continue
        for option in action.option_strings:
            flags.append((option, action.help or ""))
    return FlagNames(path, tuple(flags))


def _values_for(path: tuple[str, ...], action: argparse.Action) -> tuple[Suggestion, ...]:
    """Candidates for one argument's value: its choices, else a source by name."""
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        return (Choices(tuple(str(c) for c in action.choices)),)
    dest = str(action.dest or "")
    if (path, dest) in _HOST_ARGS:
        return (HostPath(),)
    if (path, dest) in _SOURCE_BY_ARG:
        return (Source(_SOURCE_BY_ARG[(path, dest)], path, dest),)
    names = {dest.lower()}
    if isinstance(action.metavar, str):
        names.add(action.metavar.lower())
    for name in sorted(names):
        if name in _SOURCE_BY_NAME:
            return (Source(_SOURCE_BY_NAME[name], path, str(action.dest)),)
    if path in _SOURCE_BY_COMMAND and not action.option_strings:
        return (Source(_SOURCE_BY_COMMAND[path], path, str(action.dest)),)
    if names & _HOST_NAMES:
        return (HostPath(),)
    if names & _PATH_NAMES:
        return (SandboxPath(dirs_only=bool(names & _DIR_NAMES) or path in _DIR_COMMANDS),)
    if action.nargs == argparse.REMAINDER:
        return (SandboxPath(),)
    return ()
