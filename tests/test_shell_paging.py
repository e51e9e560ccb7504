"""Listings go through the pager only when they do not fit; streams never do."""

from __future__ import annotations

import io
from pathlib import Path

from contree_shell.output import get_output, set_output
from contree_shell.shell.commands import shell_parser
from contree_shell.shell.paging import PAGED_COMMANDS, ShellOutput, canonical_command, paged


def shell_output(tmp_path: Path, *, rows: int = 5) -> tuple[ShellOutput, io.StringIO, Path]:
    paged_to = tmp_path / "paged.txt"
    out = io.StringIO()
    env = {"CONTREE_PAGER": f"tee {paged_to}", "PATH": "/usr/bin:/bin"}
    return ShellOutput(out, io.StringIO(), stdout_tty=True, env=env, size=(40, rows)), out, \
        paged_to


def test_output_taller_than_the_terminal_goes_through_the_pager(tmp_path: Path) -> None:
    output, _, paged_to = shell_output(tmp_path)
    previous = set_output(output)
    try:
        with paged():
            for n in range(10):
                get_output().line(f"row {n}")
    finally:
        set_output(previous)
    assert paged_to.read_text().splitlines() == [f"row {n}" for n in range(10)]


def test_output_that_fits_is_written_directly(tmp_path: Path) -> None:
    output, out, paged_to = shell_output(tmp_path, rows=40)
    previous = set_output(output)
    try:
        with paged():
            get_output().line("short")
    finally:
        set_output(previous)
    assert out.getvalue() == "short\n" and not paged_to.exists()


def test_paging_disabled_writes_as_it_comes(tmp_path: Path) -> None:
    output, out, paged_to = shell_output(tmp_path)
    previous = set_output(output)
    try:
        with paged(False):
            get_output().line("x" * 100)
            assert out.getvalue()  # not held back
    finally:
        set_output(previous)
    assert not paged_to.exists()


def test_listings_are_recognised_through_aliases_and_flags() -> None:
    parser = shell_parser()
    assert canonical_command(["s", "show"], parser) == ("session", "show")
    assert canonical_command(["-o", "json", "images"], parser) == ("images",)
    assert canonical_command(["i", "ls"], parser) in PAGED_COMMANDS
    assert canonical_command(["run", "ls"], parser) not in PAGED_COMMANDS
