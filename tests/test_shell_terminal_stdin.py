"""The shell forwards the terminal to a remote command only after a grace delay."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from contree_shell.shell.terminal_stdin import DelayedTerminalStdin


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        for fd in (r, w):
            try:
                os.close(fd)
            except OSError:
                pass


def test_nothing_is_read_before_the_delay(pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.write(w, b"typed ahead\n")
    source = DelayedTerminalStdin(r, delay=30)
    source.start()
    assert source.get(0.05) is None
    source.stop()
    # Stopped before the delay: the line is still there for the next prompt.
    assert os.read(r, 100) == b"typed ahead\n"


def test_lines_are_forwarded_once_the_delay_has_passed(pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.write(w, b"answer\n")
    source = DelayedTerminalStdin(r, delay=0.05)
    source.start()
    try:
        assert source.get(5) == b"answer\n"
    finally:
        source.stop()


def test_stop_is_idempotent_and_safe_before_start(pipe: tuple[int, int]) -> None:
    source = DelayedTerminalStdin(pipe[0], delay=0.01)
    source.stop()
    source.start()  # after stop: never starts reading
    source.stop()
