"""argparse classes: the normal one for `contree X`, and one for the shell that never exits."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from contree_shell.cli.errors import CliHelp, CliUsageError


class CliParser(argparse.ArgumentParser):
    """The parser of `contree X`: argparse's own behaviour (usage + exit 2, help + exit 0)."""


class ShellParser(CliParser):
    """Raises instead of exiting, so a typo or `--help` in the shell never leaves the REPL.

    Subparsers inherit the class (argparse creates them with `type(self)`), so the whole
    tree behaves the same way.
    """

    def error(self, message: str) -> NoReturn:
        raise CliUsageError(message, self.format_usage())

    def print_help(self, file: Any = None) -> None:
        raise CliHelp(self.format_help())

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if status:
            raise CliUsageError((message or "").strip(), self.format_usage())
        raise CliHelp(message or "")

    def _print_message(self, message: str, file: Any = None) -> None:
        # argparse prints only from help/usage/version paths; all of them end in
        # print_help/exit above, so nothing may reach the terminal behind the shell's back.
        return None


def add_subcommands(parser: argparse.ArgumentParser, **kwargs: Any) -> Any:
    """`add_subparsers` with our defaults (a metavar that lists nothing noisy)."""
    kwargs.setdefault("metavar", "COMMAND")
    return parser.add_subparsers(**kwargs)
