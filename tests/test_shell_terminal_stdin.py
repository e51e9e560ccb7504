"""Which typed lines a remote command started from the shell receives (terminal_stdin.py)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

from contree_shell.shell.terminal_stdin import TerminalStdin, pending_bytes


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


def test_type_ahead_waiting_at_start_is_left_for_the_next_prompt(
        pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.write(w, b"typed ahead\n")
    source = TerminalStdin(r)
    source.start()
    assert source.type_ahead
    assert source.get(0.05) is None
    os.write(w, b"typed during the run\n")
    assert source.get(0.05) is None
    source.stop()
    assert os.read(r, 100) == b"typed ahead\ntyped during the run\n"


def test_a_line_typed_during_the_run_is_forwarded_after_the_hold(
        pipe: tuple[int, int]) -> None:
    r, w = pipe
    source = TerminalStdin(r, hold=0.2)
    source.start()
    try:
        assert not source.type_ahead
        os.write(w, b"answer\n")
        started = time.monotonic()
        assert source.get(5) == b"answer\n"
        assert time.monotonic() - started >= 0.15
    finally:
        source.stop()
    assert source.leftover() == b""


def test_a_line_held_when_the_run_ends_goes_back_to_the_prompt(
        pipe: tuple[int, int]) -> None:
    r, w = pipe
    source = TerminalStdin(r, hold=30)
    source.start()
    os.write(w, b"next command\n")
    got: list[object] = []
    getter = threading.Thread(target=lambda: got.append(source.get(None)))
    getter.start()
    while pending_bytes(r):
        os.sched_yield()
    source.stop()  # the command finished while the line was held
    getter.join(5)
    assert got == [None]
    assert source.leftover() == b"next command\n"


def test_a_line_read_but_never_sent_is_handed_back(pipe: tuple[int, int]) -> None:
    r, w = pipe
    source = TerminalStdin(r)
    source.start()
    os.write(w, b"for the next prompt\n")
    # Wait until the reader has taken it off the terminal (it is no longer pending).
    while pending_bytes(r):
        os.sched_yield()
    source.stop()
    assert source.leftover() == b"for the next prompt\n"


def test_stop_is_idempotent_and_safe_before_start(pipe: tuple[int, int]) -> None:
    source = TerminalStdin(pipe[0])
    source.stop()
    source.stop()
    assert source.leftover() == b""
