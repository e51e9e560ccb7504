"""Exceptions the command layer raises and `main`/`execute` turn into exit codes."""

from __future__ import annotations


class CliError(Exception):
    """A user-facing failure of a command: one line for the user and an exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class NoSession(CliError):
    """The command needs a session and there is none for the current key."""

    def __init__(self) -> None:
        super().__init__("No active session. Run `contree use IMAGE` to start one.")


class CliUsageError(Exception):
    """The shell's parser met bad arguments (instead of argparse exiting with status 2)."""

    def __init__(self, message: str, usage: str) -> None:
        super().__init__(message)
        self.message = message
        self.usage = usage


class CliHelp(Exception):  # a control-flow signal, not an error
    """The shell's parser was asked for `--help`; `text` is the help to show."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text
