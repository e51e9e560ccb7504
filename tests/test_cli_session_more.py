"""`session use`, `session wait`, `run --preserve-env` against the real local server."""

from __future__ import annotations

import json

import pytest

from tests.conftest import LocalServer
from tests.test_cli_commands import contree, err, out, session_json

pytestmark = pytest.mark.root


def test_session_use_takes_an_exact_key_or_a_literal_suffix(server: LocalServer) -> None:
    base = server.session_env()
    donor = dict(base, CONTREE_SESSION="donor_a1b2")
    other = dict(base, CONTREE_SESSION="donorXa1b2")  # `_` must not act as a wildcard
    for env in (donor, other):
        assert contree(server, env, "use", "tag:busybox:latest").returncode == 0
    marked = contree(server, donor, "run", "--", "touch", "/donor-mark")
    assert marked.returncode == 0, err(marked)
    donor_image = session_json(server, donor)["current_image"]
    me = server.session_env()
    assert contree(server, me, "use", "tag:busybox:latest").returncode == 0
    result = contree(server, me, "session", "use", "donor_a1b2")
    assert result.returncode == 0, err(result)
    row = session_json(server, me)
    assert row["current_image"] == donor_image and row["last_kind"] == "session use"
    ambiguous = contree(server, me, "session", "use", "a1b2")
    assert ambiguous.returncode == 1 and "Ambiguous session 'a1b2'" in err(ambiguous)
    # SQL LIKE '%_r_a1b2' would also match donorXa1b2 and call it ambiguous.
    literal = contree(server, me, "-o", "json", "session", "use", "r_a1b2")
    assert literal.returncode == 0, err(literal)
    assert json.loads(literal.stdout)["session_key"] == "donor_a1b2"
    missing = contree(server, me, "session", "use", "zz_nope")
    assert missing.returncode == 1 and "Session 'zz_nope' not found" in err(missing)


def test_session_wait_moves_the_branch_for_finished_detached_runs(
    server: LocalServer, session_env: dict[str, str]
) -> None:
    before = session_json(server, session_env)["current_image"]
    started = contree(server, session_env, "-o", "json", "run", "-d", "--", "sh", "-c",
                      "echo detached > /d.txt")
    op = json.loads(started.stdout)["uuid"]
    assert session_json(server, session_env)["current_image"] == before
    waited = contree(server, session_env, "-o", "json", "session", "wait", "--timeout", "120")
    assert waited.returncode == 0, err(waited)
    row = json.loads(waited.stdout)
    assert row["uuid"] == op and row["advanced"] is True
    state = session_json(server, session_env)
    assert state["current_image"] == row["image"] and state["last_kind"] == "run"
    branches = contree(server, session_env, "-o", "json", "session", "branch")
    assert f"detached-{op}" not in out(branches)
    cat = contree(server, session_env, "cat", "/d.txt")
    assert out(cat) == "detached\n"
    nothing = contree(server, session_env, "session", "wait")
    assert nothing.returncode == 0 and "No detached runs" in err(nothing)


def test_session_wait_leaves_the_session_after_a_failure(
    server: LocalServer, session_env: dict[str, str]
) -> None:
    before = session_json(server, session_env)["current_image"]
    started = contree(server, session_env, "-o", "json", "run", "-d", "--", "sleep", "60")
    op = json.loads(started.stdout)["uuid"]
    assert contree(server, session_env, "kill", op).returncode == 0
    waited = contree(server, session_env, "-o", "json", "session", "wait", op)
    assert waited.returncode == 1
    assert json.loads(waited.stdout)["advanced"] is False
    assert session_json(server, session_env)["current_image"] == before


def test_preserve_env_bakes_the_environment_into_the_image(
    server: LocalServer, session_env: dict[str, str]
) -> None:
    first = contree(server, session_env, "run", "--preserve-env", "-e", "KEEP=yes", "--", "true")
    assert first.returncode == 0, err(first)
    second = contree(server, session_env, "run", "-s", "--", "echo $KEEP")
    assert out(second) == "yes\n"
