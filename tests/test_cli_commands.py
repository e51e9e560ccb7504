"""The real `contree` command against the real local server (busybox image).

Each test runs `python -m contree_shell …` as a subprocess in its own session, exactly
as a person would type it, and checks what they would see: stdout, stderr, exit code.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import LocalServer

pytestmark = pytest.mark.root


def contree(
    server: LocalServer, env: dict[str, str], *args: str, input: bytes | None = None,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[bytes]:
    """Run `contree ARGS…`; no command may ever print a traceback."""
    result = server.contree(*args, env=env, input=input, timeout=timeout)
    assert b"Traceback" not in result.stderr, result.stderr.decode(errors="replace")
    return result


def out(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stdout.decode(errors="replace")


def err(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stderr.decode(errors="replace")


def session_json(server: LocalServer, env: dict[str, str]) -> dict[str, object]:
    result = contree(server, env, "-o", "json", "session")
    assert result.returncode == 0, err(result)
    row: dict[str, object] = json.loads(result.stdout.splitlines()[0])
    return row


def test_use_tag_starts_a_session_on_that_image(server: LocalServer) -> None:
    env = server.session_env()
    result = contree(server, env, "use", "tag:busybox:latest")
    assert result.returncode == 0, err(result)
    assert result.stdout == b""  # the key came from CONTREE_SESSION: nothing to export
    row = session_json(server, env)
    assert row["current_image"] == server.busybox
    assert row["active_branch"] == "main"
    assert row["session_key"] == env["CONTREE_SESSION"]


def test_use_new_prints_the_export_line(server: LocalServer) -> None:
    env = server.session_env()
    result = contree(server, env, "use", "-N", "busybox:latest")
    assert result.returncode == 0, err(result)
    line = out(result).strip()
    assert line.startswith("export CONTREE_SESSION=")
    key = line.split("=", 1)[1]
    assert key != env["CONTREE_SESSION"]
    env["CONTREE_SESSION"] = key
    assert session_json(server, env)["current_image"] == server.busybox


def test_use_of_a_uuid_checks_that_the_image_exists(server: LocalServer) -> None:
    env = server.session_env()
    assert contree(server, env, "use", server.busybox).returncode == 0
    result = contree(server, env, "use", "00000000-0000-4000-8000-000000000000")
    assert result.returncode == 1
    assert err(result).count("\n") == 1 and "not found" in err(result)


def test_unknown_tag_is_one_line_and_exit_1(server: LocalServer) -> None:
    env = server.session_env()
    result = contree(server, env, "use", "tag:no-such-image:1")
    assert result.returncode == 1
    assert err(result).startswith("[ERROR] ")
    assert err(result).count("\n") == 1
    assert "no-such-image:1" in err(result)


def test_no_session_says_how_to_start_one(server: LocalServer) -> None:
    env = server.session_env()
    result = contree(server, env, "run", "--", "true")
    assert result.returncode == 1
    assert "No active session. Run `contree use IMAGE` to start one." in err(result)


def test_run_prints_the_command_output(server: LocalServer, session_env: dict[str, str]) -> None:
    result = contree(server, session_env, "run", "--", "echo", "hi")
    assert result.returncode == 0, err(result)
    assert result.stdout == b"hi\n"


def test_run_shell_mode_expands_in_the_sandbox(server: LocalServer, session_env: dict[str, str]) -> None:
    result = contree(server, session_env, "run", "-s", "echo $HOME")
    assert result.returncode == 0, err(result)
    assert b"$HOME" not in result.stdout
    result = contree(server, session_env, "run", "-e", "GREETING=hello", "-s", "echo $GREETING")
    assert result.stdout == b"hello\n"


def test_run_exit_code_is_the_commands(server: LocalServer, session_env: dict[str, str]) -> None:
    result = contree(server, session_env, "run", "--", "sh", "-c", "exit 3")
    assert result.returncode == 3


def test_missing_command_exits_127_with_the_sandbox_message(
    server: LocalServer, session_env: dict[str, str]
) -> None:
    result = contree(server, session_env, "run", "--", "no-such-command-here")
    assert result.returncode == 127
    assert "no-such-command-here" in err(result)


def test_run_timeout_exits_124_with_a_warning(server: LocalServer, session_env: dict[str, str]) -> None:
    before = session_json(server, session_env)
    result = contree(server, session_env, "run", "-t", "1", "--", "sleep", "30")
    assert result.returncode == 124
    assert "timed out after 1s" in err(result)
    assert session_json(server, session_env)["current_image"] == before["current_image"]


def test_piped_stdin_reaches_the_command(server: LocalServer, session_env: dict[str, str]) -> None:
    result = contree(server, session_env, "run", "--", "cat", input=b"piped text\n")
    assert result.returncode == 0, err(result)
    assert result.stdout == b"piped text\n"


def test_a_write_is_visible_to_cat(server: LocalServer, session_env: dict[str, str]) -> None:
    result = contree(server, session_env, "run", "-s", "echo made > /note")
    assert result.returncode == 0, err(result)
    result = contree(server, session_env, "cat", "/note")
    assert result.returncode == 0, err(result)
    assert result.stdout == b"made\n"
    missing = contree(server, session_env, "cat", "/no-such-file")
    assert missing.returncode == 1
    assert "/no-such-file" in err(missing) and err(missing).count("\n") == 1


def test_ls_lists_the_image_root(server: LocalServer, session_env: dict[str, str]) -> None:
    result = contree(server, session_env, "ls", "/")
    assert result.returncode == 0, err(result)
    assert "bin" in out(result) and "etc" in out(result)
    rows = [json.loads(line) for line in contree(server, session_env, "-o", "json", "ls", "/").stdout.splitlines()]
    names = {row["path"] for row in rows}
    assert {"bin", "etc", "tmp"} <= names
    assert next(row for row in rows if row["path"] == "etc")["type"] == "d"


def test_cd_then_relative_ls_and_cat(server: LocalServer, session_env: dict[str, str]) -> None:
    made = contree(server, session_env, "run", "-s", "mkdir -p /work && echo x > /work/f")
    assert made.returncode == 0, err(made)
    assert contree(server, session_env, "cd", "/work").returncode == 0
    assert contree(server, session_env, "cd").stdout == b"/work\n"
    listing = contree(server, session_env, "ls")
    assert "f" in out(listing).split()
    assert contree(server, session_env, "cat", "f").stdout == b"x\n"
    # Runs start in the session cwd.
    assert contree(server, session_env, "run", "pwd").stdout == b"/work\n"
    assert contree(server, session_env, "cd", "..").returncode == 0
    assert contree(server, session_env, "cd").stdout == b"/\n"


def test_cd_to_a_missing_directory_fails_with_one_line(
    server: LocalServer, session_env: dict[str, str]
) -> None:
    result = contree(server, session_env, "cd", "/nope")
    assert result.returncode == 1
    assert err(result) == "[ERROR] cd: /nope: no such directory\n"


def test_branch_checkout_rollback_round_trip(server: LocalServer, session_env: dict[str, str]) -> None:
    env = session_env
    assert contree(server, env, "run", "-s", "echo kept > /data").returncode == 0
    assert contree(server, env, "session", "branch", "experiment").returncode == 0
    branches = out(contree(server, env, "session", "branch"))
    assert "* main" in branches and "experiment" in branches

    assert contree(server, env, "session", "checkout", "experiment").returncode == 0
    assert session_json(server, env)["active_branch"] == "experiment"
    assert contree(server, env, "run", "--", "rm", "/data").returncode == 0
    assert contree(server, env, "cat", "/data").returncode == 1

    assert contree(server, env, "session", "checkout", "main").returncode == 0
    assert contree(server, env, "cat", "/data").stdout == b"kept\n"

    # Back one step on main: before the write.
    assert contree(server, env, "session", "rollback").returncode == 0
    assert contree(server, env, "cat", "/data").returncode == 1
    # And forward again.
    assert contree(server, env, "session", "rollback", "+1").returncode == 0
    assert contree(server, env, "cat", "/data").stdout == b"kept\n"

    shown = [json.loads(line) for line in contree(server, env, "-o", "json", "session", "show").stdout.splitlines()]
    kinds = [row["kind"] for row in shown]
    assert kinds[0] == "use" and kinds.count("run") == 2
    listed = out(contree(server, env, "session", "list"))
    assert env["CONTREE_SESSION"] in listed


def test_rollback_after_a_failing_run_goes_back_exactly_one_step(
    server: LocalServer, session_env: dict[str, str]
) -> None:
    before = session_json(server, session_env)
    result = contree(server, session_env, "run", "-s", "echo partial > /p; exit 1")
    assert result.returncode == 1
    # The run completed, so its filesystem is recorded even though it failed...
    assert contree(server, session_env, "cat", "/p").stdout == b"partial\n"
    after = session_json(server, session_env)
    assert after["last_kind"] == "run"
    # ...and one rollback undoes exactly that run.
    assert contree(server, session_env, "session", "rollback", "-1").returncode == 0
    assert session_json(server, session_env)["current_image"] == before["current_image"]


def test_unknown_branch_is_one_line(server: LocalServer, session_env: dict[str, str]) -> None:
    result = contree(server, session_env, "session", "checkout", "no-such-branch")
    assert result.returncode == 1
    assert err(result) == "[ERROR] Branch 'no-such-branch' does not exist\n"


def test_structured_run_prints_one_record_in_every_format(
    server: LocalServer, session_env: dict[str, str]
) -> None:
    result = contree(server, session_env, "-o", "json", "run", "--", "echo", "hi")
    assert result.returncode == 0, err(result)
    record = json.loads(result.stdout)
    assert record["exit_code"] == 0 and record["stdout"] == "hi\n" and record["status"] == "SUCCESS"
    assert record["image"]
    for fmt in ("csv", "tsv", "table", "plain", "json-pretty"):
        result = contree(server, session_env, "-o", fmt, "run", "--", "echo", "hi")
        assert result.returncode == 0, (fmt, err(result))
        assert b"hi" in result.stdout


def test_session_show_and_images(server: LocalServer, session_env: dict[str, str]) -> None:
    listed = contree(server, session_env, "images")
    assert listed.returncode == 0, err(listed)
    assert "busybox:latest" in out(listed)
    shown = contree(server, session_env, "session", "show")
    assert shown.returncode == 0 and "use" in out(shown)


def test_use_of_a_missing_known_base_image_imports_it_with_progress(server: LocalServer) -> None:
    env = server.session_env()
    # The fixture tagged `busybox:latest`; the bare tag `busybox` is missing, and the local
    # server knows how to build it.
    result = contree(server, env, "use", "busybox")
    assert result.returncode == 0, err(result)
    assert "importing it from busybox:" in err(result)
    assert "Imported busybox" in err(result)
    image = session_json(server, env)["current_image"]
    assert isinstance(image, str) and image
    # Second use: already there, no import.
    again = contree(server, env, "use", "busybox")
    assert again.returncode == 0 and "importing" not in err(again)
    assert session_json(server, env)["current_image"] == image


def test_detached_run_returns_at_once_on_a_side_branch(
    server: LocalServer, session_env: dict[str, str]
) -> None:
    before = session_json(server, session_env)
    result = contree(server, session_env, "-o", "json", "run", "-d", "--", "sleep", "1")
    assert result.returncode == 0, err(result)
    op = json.loads(result.stdout)["uuid"]
    after = session_json(server, session_env)
    assert after["active_branch"] == "main" and after["current_image"] == before["current_image"]
    assert f"detached-{op}" in out(contree(server, session_env, "session", "branch"))


def test_cat_refuses_binary_content_on_a_terminal(
    server: LocalServer, session_env: dict[str, str]
) -> None:
    import os
    import pty
    import sys

    made = contree(server, session_env, "run", "-s", "printf 'a\\000\\377b' > /blob")
    assert made.returncode == 0, err(made)
    # Redirected: the bytes go through untouched.
    assert contree(server, session_env, "cat", "/blob").stdout == b"a\x00\xffb"
    # On a terminal: refused with the official message.
    master, slave = pty.openpty()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "contree_shell", "cat", "/blob"],
            env=session_env, stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE,
            timeout=60, cwd=str(server.config),
        )
    finally:
        os.close(slave)
        os.close(master)
    assert result.returncode == 1
    assert result.stderr == (
        b"[ERROR] Binary content - refusing to write to terminal. "
        b"Use shell redirection or `contree cp`.\n"
    )
