"""The `contree` command tree as the shell sees it: the CLI's own for-shell parser.

Help topics and completion both walk this one tree, so they can never disagree with
what `contree …` lines actually accept.
"""

from __future__ import annotations

import argparse

__all__ = ["command_names", "find_command", "shell_parser", "subcommands"]


def shell_parser() -> argparse.ArgumentParser:
    """The CLI parser built for the shell (raises instead of exiting). Built once."""
    from contree_shell.cli.main import shell_parser as cli_shell_parser

    return cli_shell_parser()


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Subcommand name (aliases included) → parser; {} for a leaf command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def command_names(parser: argparse.ArgumentParser) -> list[str]:
    """Canonical subcommand names (no aliases), in the order they were registered."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: list[str] = []
            for name, sub in action.choices.items():
                canonical = sub.prog.split()[-1]
                if canonical == name and name not in seen:
                    seen.append(name)
            return seen
    return []


def find_command(
    words: list[str], root: argparse.ArgumentParser | None = None
) -> argparse.ArgumentParser | None:
    """The parser for `contree WORDS…` (e.g. ["session", "branch"]), or None."""
    parser = root if root is not None else shell_parser()
    for word in words:
        parser_or_none = subcommands(parser).get(word)
        if parser_or_none is None:
            return None
        parser = parser_or_none
    return parser
