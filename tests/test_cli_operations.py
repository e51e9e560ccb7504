"""`ps`, `show`, `kill`, `operation wait|events` against the real local server."""

from __future__ import annotations

import json

import pytest

from tests.conftest import LocalServer
from tests.test_cli_commands import contree, err, out

pytestmark = pytest.mark.root


def _run(server: LocalServer, env: dict[str, str], *cmd: str) -> str:
    """Run a command in the session; return its operation uuid."""
    result = contree(server, env, "-o", "json", "run", "--", *cmd)
    assert result.returncode in (0, 3), err(result)
    return str(json.loads(result.stdout.splitlines()[-1])["uuid"])


def test_show_head_prints_the_row_then_the_output(server: LocalServer, session_env: dict[str, str]) -> None:
    op = _run(server, session_env, "sh", "-c", "echo hello; echo oops >&2; exit 3")
    result = contree(server, session_env, "show", "HEAD")
    assert result.returncode == 0, err(result)
    assert op in out(result) and "SUCCESS" in out(result)
    assert out(result).rstrip().endswith("hello")
    assert "oops" in err(result)
    as_json = contree(server, session_env, "-o", "json", "operation", "show", "HEAD")
    row = json.loads(as_json.stdout)
    assert row["uuid"] == op and row["exit_code"] == 3 and row["stdout"] == "hello\n"
    raw = contree(server, session_env, "show", "--raw", op)
    assert json.loads(raw.stdout)["metadata"]["result"]["state"]["exit_code"] == 3


def test_history_refs_name_earlier_runs(server: LocalServer, session_env: dict[str, str]) -> None:
    first = _run(server, session_env, "true")
    second = _run(server, session_env, "true")
    shown = contree(server, session_env, "-o", "json", "show", "@-1", "HEAD")
    assert [json.loads(line)["uuid"] for line in shown.stdout.splitlines()] == [first, second]
    bad = contree(server, session_env, "show", "@-1", "nope", "@999999")
    assert bad.returncode == 1
    assert "Invalid operation references: " in err(bad)
    assert "nope" in err(bad) and "@999999" in err(bad)
    use_entry = contree(server, session_env, "show", "HEAD~2")
    assert "has no operation UUID" in err(use_entry)


def test_ps_lists_only_executing_by_default_and_all_with_a(
    server: LocalServer, session_env: dict[str, str]
) -> None:
    op = _run(server, session_env, "true")
    default = contree(server, session_env, "ps", "-q")
    assert default.returncode == 0, err(default)
    assert op not in out(default)
    every = contree(server, session_env, "ps", "-a", "-q", "--since", "1h")
    assert op in out(every).split()
    succeeded = contree(server, session_env, "-o", "json", "op", "ls", "--status", "S", "-k", "instance")
    uuids = [json.loads(line)["uuid"] for line in succeeded.stdout.splitlines()]
    assert op in uuids
    limited = contree(server, session_env, "ps", "-a", "-q", "-M", "1")
    assert len(out(limited).split()) == 1
    assert "Output truncated at --show-max=1" in err(limited)


def test_ps_rejects_unknown_interval_units(server: LocalServer, session_env: dict[str, str]) -> None:
    result = contree(server, session_env, "ps", "--since", "1x")
    assert result.returncode == 2
    assert "Invalid time '1x'" in err(result)


def test_kill_needs_a_target(server: LocalServer, session_env: dict[str, str]) -> None:
    result = contree(server, session_env, "kill")
    assert result.returncode == 1
    assert "Provide at least one UUID, or use --all" in err(result)


def test_detached_run_can_be_killed_and_waited_for(
    server: LocalServer, session_env: dict[str, str]
) -> None:
    started = contree(server, session_env, "-o", "json", "run", "-d", "--", "sleep", "60")
    op = json.loads(started.stdout)["uuid"]
    listed = contree(server, session_env, "ps", "-a", "-q")
    assert op in out(listed).split()
    killed = contree(server, session_env, "operation", "kill", op)
    assert killed.returncode == 0, err(killed)
    assert f"Cancelled operation {op}" in err(killed)
    waited = contree(server, session_env, "-o", "json", "operation", "wait", "-t", "60", op)
    row = json.loads(waited.stdout)
    assert row["status"] == "CANCELLED"
    assert waited.returncode == 1


def test_operation_wait_returns_the_exit_code(server: LocalServer, session_env: dict[str, str]) -> None:
    started = contree(server, session_env, "-o", "json", "run", "-d", "--", "sh", "-c", "exit 4")
    op = json.loads(started.stdout)["uuid"]
    waited = contree(server, session_env, "-o", "json", "op", "w", op)
    assert waited.returncode == 4, err(waited)
    assert json.loads(waited.stdout)["exit_code"] == 4


def test_operation_wait_times_out(server: LocalServer, session_env: dict[str, str]) -> None:
    started = contree(server, session_env, "-o", "json", "run", "-d", "--", "sleep", "30")
    op = json.loads(started.stdout)["uuid"]
    try:
        waited = contree(server, session_env, "-o", "json", "op", "wait", "-t", "0.2", op)
        assert waited.returncode == 1
        assert json.loads(waited.stdout)["timed_out"] is True
        assert "Timeout: 1 operation(s) did not finish" in err(waited)
    finally:
        contree(server, session_env, "kill", op)


def test_operation_events_lists_the_recorded_events(
    server: LocalServer, session_env: dict[str, str]
) -> None:
    op = _run(server, session_env, "echo", "hi")
    result = contree(server, session_env, "-o", "json", "op", "ev", op)
    assert result.returncode == 0, err(result)
    types = [json.loads(line)["type"] for line in result.stdout.splitlines()]
    assert types[-1] == "completion" and "stdout" in types
