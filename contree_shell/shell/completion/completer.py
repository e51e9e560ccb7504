"""The prompt_toolkit completer: the engine says what fits, the sources say what exists.

Wrap it in ThreadedCompleter (repl.py does) so a slow listing never blocks typing.

Matching: prefix matches first; only when nothing starts with the typed text, `fuzzy`
falls back to subsequence matches (`ssn` → `session`, `pwd` → `passwd`), so a typo or
a half-remembered name still finds something without cluttering the exact case.
"""

from __future__ import annotations

import argparse
import logging
import re
import shlex
from collections.abc import Callable, Iterable, Iterator

from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document

from contree_shell.shell.completion.engine import (
    Analysis,
    BuiltinNames,
    Choices,
    CommandNames,
    FlagNames,
    HelpTopics,
    HostPath,
    SandboxPath,
    Source,
    Suggestion,
    Word,
    analyze,
)
from contree_shell.shell.completion.sources import Sources, host_entries

__all__ = ["ContreeCompleter", "escape_word"]

log = logging.getLogger(__name__)

# Contree commands that make no sense inside the shell are not offered there.
_HIDDEN_IN_SHELL = {"shell", "sh"}
_HEXISH = re.compile(r"^[0-9a-f]{2,}[0-9a-f-]*$")
_UNSAFE = re.compile(r"([^\w@%+=:,./-])")


def escape_word(text: str) -> str:
    """Backslash-escape what sh would otherwise split or expand."""
    return _UNSAFE.sub(r"\\\1", text)


class ContreeCompleter(Completer):
    """Completion for the contree shell.

    `parser` returns the for-shell argparse tree (None if unavailable); `builtins`
    maps builtin names to their one-line help; `cwd` and `image` read the session.
    """

    def __init__(
        self,
        sources: Sources,
        *,
        parser: Callable[[], argparse.ArgumentParser | None],
        builtins: Callable[[], dict[str, str]],
        cwd: Callable[[], str],
        image: Callable[[], str | None],
        fuzzy: bool = True,
    ) -> None:
        self.sources = sources
        self.fuzzy = fuzzy
        self._parser = parser
        self._builtins = builtins
        self._cwd = cwd
        self._image = image

    def get_completions(self, document: Document, complete_event: CompleteEvent
                        ) -> Iterator[Completion]:
        try:
            builtins = self._builtins()
            parser = self._safe_parser()
            analysis = analyze(document.text_before_cursor, parser, frozenset(builtins))
            found = False
            for suggestion in analysis.suggestions:
                for completion in self._complete(suggestion, analysis, builtins, parser,
                                                 _prefix):
                    found = True
                    yield completion
            if found or not self.fuzzy or not analysis.word.value:
                return
            for suggestion in analysis.suggestions:
                yield from self._complete(suggestion, analysis, builtins, parser, _fuzzy)
        except Exception:  # Tab must never raise into the prompt
            log.debug("completion failed", exc_info=True)

    def _safe_parser(self) -> argparse.ArgumentParser | None:
        try:
            return self._parser()
        except Exception:
            log.debug("no parser for completion", exc_info=True)
            return None

    def _complete(
        self, suggestion: Suggestion, analysis: Analysis, builtins: dict[str, str],
        parser: argparse.ArgumentParser | None, match: Matcher,
    ) -> Iterable[Completion]:
        word = analysis.word
        if isinstance(suggestion, BuiltinNames):
            first = {**builtins, "contree": "run a contree command"}
            return _names(word, first.items(), match)
        if isinstance(suggestion, HelpTopics):
            topics = dict(builtins)
            for name, help_ in _command_help(parser):
                topics.setdefault(name, help_)
            return _names(word, topics.items(), match)
        if isinstance(suggestion, CommandNames):
            sub = _descend(parser, suggestion.path)
            helps = dict(_command_help(sub))
            canonical = set(_canonical_names(sub))
            names = [n for n in suggestion.names
                     if suggestion.path or n not in _HIDDEN_IN_SHELL]
            # Aliases (`s`, `co`, `rb`) only when no full name fits what was typed.
            full = [n for n in names if n in canonical and match(word.value, n)]
            shown = full or names
            return _names(word, ((n, helps.get(n, "")) for n in shown), match)
        if isinstance(suggestion, FlagNames):
            return _names(word, suggestion.flags, match)
        if isinstance(suggestion, Choices):
            return _values(word, ((v, "") for v in suggestion.values), match)
        if isinstance(suggestion, Source):
            values = self._source(suggestion.name)
            if suggestion.name == "image" and not _HEXISH.match(word.value):
                # uuids of tagged images only when the typed text could start one
                values = [(v, m) for v, m in values if not m.startswith("tag:")]
            return _values(word, values, match)
        if isinstance(suggestion, SandboxPath):
            return self._paths(word, suggestion.dirs_only, match)
        if isinstance(suggestion, HostPath):
            return self._paths(word, False, match, host=True)
        return ()

    def _source(self, name: str) -> list[tuple[str, str]]:
        if name == "branch":
            return [(b, "branch") for b in self.sources.branches()]
        if name == "session":
            return [(s, "session") for s in self.sources.sessions()]
        if name == "profile":
            return [(p, "profile") for p in self.sources.profiles()]
        if name == "image":
            return self.sources.images()
        if name == "operation":
            return self.sources.operations()
        if name == "env-key":
            return [(k, "env") for k in self.sources.env_keys()]
        return []

    def _paths(self, word: Word, dirs_only: bool, match: Matcher, *, host: bool = False
               ) -> Iterator[Completion]:
        from contree_shell.cli.paths import resolve_path

        value = word.value
        if value.startswith("~") and not host:
            return  # the sandbox's $HOME is unknown here
        cut = value.rfind("/") + 1
        typed_dir, base = value[:cut], value[cut:]
        if host:
            entries = host_entries(typed_dir or ".")
        else:
            directory = resolve_path(self._cwd(), typed_dir or None)
            entries = self.sources.list_dir(self._image(), directory)
        quoted = word.raw != word.value
        for entry in sorted(entries, key=lambda e: e.name):
            if dirs_only and not (entry.is_dir or entry.is_link):
                continue
            if not match(base, entry.name):
                continue
            if entry.name.startswith(".") and not base.startswith("."):
                continue
            # A symlink offered where only directories fit is taken to point at one.
            suffix = "/" if entry.is_dir or (dirs_only and entry.is_link) else ""
            display = entry.name + suffix
            if quoted:
                # The typed word has quotes: replace all of it with a freshly quoted path.
                text = shlex.quote(typed_dir + entry.name) + suffix
                yield Completion(text, start_position=-len(word.raw), display=display)
            else:
                yield Completion(escape_word(entry.name) + suffix, start_position=-len(base),
                                 display=display)


Matcher = Callable[[str, str], bool]


def _prefix(typed: str, candidate: str) -> bool:
    return candidate.startswith(typed)


def _fuzzy(typed: str, candidate: str) -> bool:
    """`typed` is a subsequence of `candidate` (case-insensitive)."""
    rest = iter(candidate.lower())
    return all(ch in rest for ch in typed.lower())


def _names(word: Word, items: Iterable[tuple[str, str]], match: Matcher = _prefix
           ) -> Iterator[Completion]:
    """Candidates that replace the whole word (command names, flags)."""
    for name, meta in sorted(set(items)):
        if match(word.value, name):
            yield Completion(name, start_position=-len(word.raw), display_meta=meta or None)


def _values(word: Word, items: Iterable[tuple[str, str]], match: Matcher = _prefix
            ) -> Iterator[Completion]:
    """Candidates for a value; an inline `--flag=VALUE` replaces only the part after `=`."""
    prefix, replace = word.value, len(word.raw)
    if word.value.startswith("-") and "=" in word.value:
        prefix = word.value.split("=", 1)[1]
        replace = len(prefix)
    seen: set[str] = set()
    for value, meta in items:
        if value in seen or not match(prefix, value):
            continue
        seen.add(value)
        yield Completion(escape_word(value), start_position=-replace, display=value,
                         display_meta=meta or None)


def _descend(parser: argparse.ArgumentParser | None, path: tuple[str, ...]
             ) -> argparse.ArgumentParser | None:
    from contree_shell.shell.commands import find_command

    if parser is None:
        return None
    return find_command(list(path), parser)


def _canonical_names(parser: argparse.ArgumentParser | None) -> list[str]:
    from contree_shell.shell.commands import command_names

    return command_names(parser) if parser is not None else []


def _command_help(parser: argparse.ArgumentParser | None) -> list[tuple[str, str]]:
    """(subcommand, help) pairs of `parser`, aliases included."""
    if parser is None:
        return []
    out: list[tuple[str, str]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                canonical = sub.prog.split()[-1]
                out.append((name, helps.get(canonical, "")))
    return out
