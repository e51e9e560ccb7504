"""The real `contree shell` in a real terminal (tmux) against the real local server.

Each test types into the shell as a person would and asserts on the rendered screen;
where the outcome lives on the server (a cancelled operation), the raw API is asked.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LocalServer
from tests.terminal import Terminal

PROMPT = re.compile(r"\(main\) / \$ ?$", re.M)


def open_shell(server: LocalServer, env: dict[str, str], *, path: str | None = None
               ) -> Terminal:
    env = dict(env)
    env["TERM"] = "xterm-256color"
    env.setdefault("CONTREE_PAGER", "off")
    # tmux puts its own PATH in front of a session's; `env` sets it for the shell itself.
    prefix = ["env", f"PATH={path}"] if path else []
    return Terminal([*prefix, sys.executable, "-m", "contree_shell", "shell"], env,
                    cwd=str(server.config))


@pytest.fixture
def shell(server: LocalServer, session_env: dict[str, str]) -> Iterator[Terminal]:
    term = open_shell(server, session_env)
    try:
        term.wait_for(PROMPT)
        yield term
    finally:
        term.close()


def executing_operation(server: LocalServer, timeout: float = 20) -> str:
    """The uuid of the (single) running operation, once there is one."""
    deadline = time.monotonic() + timeout
    with server.http() as http:
        while time.monotonic() < deadline:
            running = http.get("/v1/operations", params={"status": "EXECUTING"}).json()
            if running:
                return str(running[0]["uuid"])
            time.sleep(0.02)
    raise AssertionError("no operation reached EXECUTING")


def test_toolbar_shows_session_branch_image_depth_cwd_and_last_status(
    server: LocalServer, session_env: dict[str, str], shell: Terminal
) -> None:
    key = session_env["CONTREE_SESSION"]
    screen = shell.wait_for(re.compile(r"image busybox:latest"))
    assert f"session {key}" in screen
    assert re.search(r"main\s+depth \d+", screen)
    out = shell.command("false", re.compile(r"✗ 1 in \d"))
    assert "│  /" in out


def test_tab_completes_a_sandbox_directory_with_a_slash(shell: Terminal) -> None:
    shell.send("cat /et", enter=False)
    shell.key("Tab")
    shell.wait_for(re.compile(r"\$ cat /etc/$", re.M))


def test_tab_completes_paths_inside_a_bare_command(shell: Terminal) -> None:
    shell.send("echo hi > /tmp/findme-1", enter=True)
    shell.wait_for(re.compile(r"\$ echo hi > /tmp/findme-1\n(.*\n)*\(main\) / \$", re.M))
    shell.send("wc -c /tmp/find", enter=False)
    shell.key("Tab")
    shell.wait_for(re.compile(r"\$ wc -c /tmp/findme-1 ?$", re.M))


def test_ctrl_c_twice_cancels_the_operation(server: LocalServer, shell: Terminal) -> None:
    # The command ignores SIGINT, so only the second Ctrl-C (cancel) can end it.
    shell.send("trap '' INT; sleep 100")
    op = executing_operation(server)
    shell.key("C-c")
    shell.wait_for("Ctrl-C again to cancel it")
    shell.key("C-c")
    shell.wait_for(f"Cancelled operation {op}")
    shell.wait_for(lambda s: PROMPT.search(s[s.rfind("Cancelled operation"):]) is not None)
    with server.http() as http:
        assert http.get(f"/v1/operations/{op}").json()["status"] == "CANCELLED"


def test_history_is_shared_between_two_shells_of_a_session(
    server: LocalServer, session_env: dict[str, str], shell: Terminal
) -> None:
    other = open_shell(server, session_env)
    try:
        other.wait_for(PROMPT)
        shell.command("echo typed-in-shell-a", re.compile(r"^typed-in-shell-a$", re.M))
        out = other.command("history", "echo typed-in-shell-a")
        assert re.search(r"^\s+\d+  echo typed-in-shell-a$", out, re.M)
    finally:
        other.close()


def test_a_pasted_block_runs_in_order_and_stops_at_the_first_failure(
    shell: Terminal,
) -> None:
    block = "echo first-line\nfalse\necho never-printed\n"
    shell._tmux("set-buffer", "-b", "paste", block)
    shell._tmux("paste-buffer", "-p", "-b", "paste", "-t", shell.target)
    screen = shell.wait_for("stopped at line 2: exit status 1")
    assert re.search(r"^first-line$", screen, re.M)
    shell.wait_for(re.compile(r"\[1\] \(main\) / \$ ?$", re.M))
    assert not re.search(r"^never-printed$", shell.screen(), re.M)


def test_last_status_is_dollar_question_mark_in_the_next_line(shell: Terminal) -> None:
    shell.command("sh -c 'exit 7'", re.compile(r"\[7\] \(main\)"))
    shell.command("echo status=$?", re.compile(r"^status=7$", re.M))


def test_output_format_builtin_is_session_wide(shell: Terminal) -> None:
    # Typed with a leading space: tmux would read a leading `-` as its own flag.
    shell.command(" -o", re.compile(r"^default$", re.M))
    shell.command(" -o json", PROMPT)
    shell.command(" --format", re.compile(r"^json$", re.M))
    out = shell.command("contree session show", re.compile(r"^\{.*\}$", re.M))
    assert '"image": "' in out
    shell.command(" -o nope", "Unknown format 'nope'")


def test_vim_edits_locally_and_the_file_is_in_the_next_run(
    server: LocalServer, session_env: dict[str, str], tmp_path: Path
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_vim = bin_dir / "vim"
    fake_vim.write_text("#!/bin/sh\necho edited-locally >> \"$1\"\n")
    fake_vim.chmod(0o755)
    term = open_shell(server, session_env,
                      path=f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    try:
        term.wait_for(PROMPT)
        term.command("vim /tmp/notes.txt", "Pending: /tmp/notes.txt")
        term.command("cat /tmp/notes.txt", re.compile(r"^edited-locally$", re.M))
    finally:
        term.close()


def test_ctrl_r_finds_an_earlier_line_and_enter_runs_it(shell: Terminal) -> None:
    shell.command("echo ctrl-r-target", re.compile(r"^ctrl-r-target$", re.M))
    shell.command("pwd", PROMPT)
    shell.key("C-r")
    shell.send("ctrl-r-t", enter=False)
    shell.wait_for(re.compile(r"reverse-i-search.*echo ctrl-r-target|echo ctrl-r-target.*search",
                              re.I))
    shell.key("Enter")
    shell.wait_for(re.compile(r"\$ echo ctrl-r-target$", re.M))
    shell.key("Enter")
    shell.wait_for(lambda s: len(re.findall(r"^ctrl-r-target$", s, re.M)) == 2)


def test_a_command_reading_stdin_gets_the_line_typed_while_it_runs(
    server: LocalServer, shell: Terminal
) -> None:
    shell.send("read answer; echo got=$answer")
    executing_operation(server)
    shell.send("hello")
    shell.wait_for(re.compile(r"^got=hello$", re.M))
    shell.wait_for(lambda s: PROMPT.search(s[s.rfind("got=hello"):]) is not None)
