"""Local stdin sources on real pipes and pseudo-terminals."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from contree_shell.client.runner import initial_stdin
from contree_shell.client.stdin import EOF, NoStdin, PipeStdin, TtyLineStdin, stdin_for_fd


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_fd, write_fd = os.pipe()
    fds = [read_fd, write_fd]
    yield read_fd, write_fd
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def test_immediate_eof_sends_closed_empty_stdin(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    os.close(write_fd)
    source = PipeStdin(read_fd)
    source.start()
    try:
        assert initial_stdin(source, 1.0) == ({"value": "", "encoding": "ascii", "close": True}, False)
    finally:
        source.stop()


def test_all_input_before_spawn_goes_into_the_payload(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    os.write(write_fd, b"abc\n")
    os.close(write_fd)
    source = PipeStdin(read_fd)
    source.start()
    try:
        first = source.get(1.0)
        assert first == b"abc\n"
        assert source.get(1.0) is EOF
        assert source.get(0) is EOF  # stays at EOF
    finally:
        source.stop()


def test_silent_pipe_spawns_with_open_stdin(pipe: tuple[int, int]) -> None:
    read_fd, _ = pipe
    source = PipeStdin(read_fd)
    source.start()
    try:
        assert initial_stdin(source, 0.05) == ({"value": "", "encoding": "ascii", "close": False}, True)
    finally:
        started = time.monotonic()
        source.stop()  # nothing was written and the pipe is open: stop must not hang
        assert time.monotonic() - started < 1.0


def test_binary_first_chunk_is_base64(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    os.write(write_fd, b"\x00\x01")
    source = PipeStdin(read_fd)
    source.start()
    try:
        stdin, more = initial_stdin(source, 1.0)
    finally:
        source.stop()
    assert stdin == {"value": "AAE=", "encoding": "base64", "close": False}
    assert more


def test_large_input_is_read_in_bounded_chunks(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    source = PipeStdin(read_fd, chunk_size=1024)
    source.start()
    try:
        os.write(write_fd, b"x" * 3000)
        os.close(write_fd)
        chunks = []
        while (item := source.get(1.0)) is not EOF:
            assert isinstance(item, bytes)
            chunks.append(item)
    finally:
        source.stop()
    assert all(len(c) <= 1024 for c in chunks)
    assert b"".join(chunks) == b"x" * 3000


def test_tty_lines_are_read_one_at_a_time_and_stop_cleanly() -> None:
    master, slave = os.openpty()
    try:
        source = stdin_for_fd(slave, interactive=True)
        assert isinstance(source, TtyLineStdin)
        source.start()
        os.write(master, b"first line\n")
        assert source.get(2.0) == b"first line\n"
        assert source.get(0.05) is None  # nothing typed: no EOF either
        started = time.monotonic()
        source.stop()
        assert time.monotonic() - started < 1.0
    finally:
        os.close(master)
        os.close(slave)


def test_non_interactive_tty_gets_no_stdin() -> None:
    master, slave = os.openpty()
    try:
        assert isinstance(stdin_for_fd(slave), NoStdin)
    finally:
        os.close(master)
        os.close(slave)


def test_pipe_fd_gets_a_pipe_source(pipe: tuple[int, int]) -> None:
    assert isinstance(stdin_for_fd(pipe[0]), PipeStdin)
    assert NoStdin().get(0) is EOF
