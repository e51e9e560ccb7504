"""The README tour, typed into the real `contree shell` in a real terminal.

tmux runs `contree shell` against the real local server; the test types each line of
the tour and asserts on the rendered screen, as a person would read it.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator

import pytest

from tests.conftest import LocalServer
from tests.terminal import Terminal


@pytest.fixture
def shell(server: LocalServer, session_env: dict[str, str]) -> Iterator[Terminal]:
    env = dict(session_env)
    env["TERM"] = "xterm-256color"
    term = Terminal([sys.executable, "-m", "contree_shell", "shell"], env, cwd=str(server.config))
    try:
        yield term
    finally:
        term.close()


def prompt(branch: str, cwd: str) -> re.Pattern[str]:
    """The prompt `(branch) cwd $ `, possibly preceded by an exit-status marker."""
    return re.compile(rf"\({re.escape(branch)}\) {re.escape(cwd)} \$ ?$", re.M)


def run(term: Terminal, line: str, expect: str | re.Pattern[str], timeout: float = 30) -> str:
    """Type a line, wait for `expect` to appear after its echo, return that text."""
    return term.command(line, expect, timeout=timeout)


def wait_executing(server: LocalServer, timeout: float = 10) -> None:
    """Wait until the server reports a running instance."""
    deadline = time.monotonic() + timeout
    with server.http() as http:
        while time.monotonic() < deadline:
            if http.get("/v1/operations", params={"status": "EXECUTING"}).json():
                return
            time.sleep(0.02)
    raise AssertionError("no operation reached EXECUTING")


def test_tour_in_a_real_terminal(server: LocalServer, shell: Terminal) -> None:
    term = shell
    term.wait_for(prompt("main", "/"))

    out = run(term, "echo hello", re.compile(r"^hello$", re.M))
    assert re.search(r"^hello$", out, re.M)

    run(term, "mkdir -p /work", prompt("main", "/"))
    run(term, "cd /work", prompt("main", "/work"))
    run(term, "echo made > note", prompt("main", "/work"))
    out = run(term, "ls", re.compile(r"note"))
    out = run(term, "cat note", re.compile(r"^made$", re.M))

    run(term, "contree session branch experiment", prompt("main", "/work"))
    run(term, "contree session checkout experiment", prompt("experiment", "/work"))
    run(term, "rm note", prompt("experiment", "/work"))
    out = run(term, "cat note", re.compile(r"(No such file|not found|no such)", re.I))

    run(term, "contree session checkout main", prompt("main", "/work"))
    out = run(term, "cat note", re.compile(r"^made$", re.M))

    # Back one step: the checkpoint before `echo made > note`.
    run(term, "contree session rollback", prompt("main", "/work"))
    run(term, "cat note", re.compile(r"(No such file|not found|no such)", re.I))

    # A failing command: its status is visible in the prompt.
    out = run(term, "false", re.compile(r"\b1\b.*\(main\) /work \$", re.S))

    # Ctrl-C interrupts a long command within a second and the shell stays up.
    term.send("sleep 100")
    wait_executing(server)
    started = time.monotonic()
    term.key("C-c")
    term.wait_for(
        lambda s: prompt("main", "/work").search(s[s.rfind("$ sleep 100"):]) is not None,
        timeout=10,
    )
    assert time.monotonic() - started < 2.0

    run(term, "echo still-here", re.compile(r"^still-here$", re.M))
    term.send("exit")
    deadline = time.monotonic() + 10
    while not term.dead() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert term.dead()
