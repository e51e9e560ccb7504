"""Page what does not fit: listings and help go through the pager, streams never do.

Only commands whose whole output exists at once are paged (image and session listings,
`session show`, `history`, `help`, `ls`, `env`); anything that streams (`run`, bare lines,
logs) is written as it comes. Their stdout is collected while the command runs and then
written through `Output.page_if_needed`: the pager starts only when the text is taller or
wider than the terminal, with `LESS=-RXF` unless LESS is set. `pager = false` in
shell.toml or `CONTREE_PAGER=off` turns it off.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from contree_shell.shell.fresh_line import LineTrackingOutput

__all__ = ["PAGED_BUILTINS", "PAGED_COMMANDS", "ShellOutput", "canonical_command", "paged"]

# Canonical command paths (aliases resolved through the parser).
PAGED_COMMANDS = frozenset({
    ("images",), ("images", "list"), ("session", "list"), ("session", "show"),
    ("session", "history"), ("ls",), ("env",), ("operation", "list"), ("op", "list"),
    ("ops",), ("history",), ("log",),
})
PAGED_BUILTINS = frozenset({"history", "help", "ls"})


def canonical_command(argv: list[str], parser: argparse.ArgumentParser | None
                      ) -> tuple[str, ...]:
    """The canonical subcommand path of `contree ARGV…` (flags and values skipped)."""
    from contree_shell.shell.commands import subcommands
    from contree_shell.shell.router import GLOBAL_VALUE_FLAGS

    path: list[str] = []
    current = parser
    skip = False
    for word in argv:
        if current is None:
            break
        if skip:
            skip = False
            continue
        if word.startswith("-"):
            skip = word in GLOBAL_VALUE_FLAGS
            continue
        sub = subcommands(current).get(word)
        if sub is None:
            break
        path.append(sub.prog.split()[-1])
        current = sub
    return tuple(path)


class ShellOutput(LineTrackingOutput):
    """The shell's Output: tracks the cursor column and can hold stdout back for paging."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._held: bytearray | None = None

    def write_stdout(self, data: bytes) -> None:
        if self._held is not None:
            self._held.extend(data)
            return
        super().write_stdout(data)

    @contextmanager
    def paging(self) -> Iterator[None]:
        """Collect stdout inside the block; page it (if needed) when the block ends."""
        if self._held is not None or not self.pager_enabled or not self.stdout_is_tty:
            yield
            return
        self._held = bytearray()
        try:
            yield
        finally:
            text, self._held = bytes(self._held).decode("utf-8", "replace"), None
            if text:
                self.page_if_needed(text)


@contextmanager
def paged(enabled: bool = True) -> Iterator[None]:
    """Page the block's stdout when the process Output is the shell's own."""
    from contree_shell.output import get_output

    out = get_output()
    if enabled and isinstance(out, ShellOutput):
        with out.paging():
            yield
    else:
        yield
