"""Server-wide run limits: settings → RunSpec.limits → cgroups, with a warning for a
controller the host lacks."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from contree_shell.sandbox import cgroups
from contree_shell.server import daemon
from tests.test_server_support import (  # noqa: F401 - fixtures
    ApiServer,
    api_server,
    import_busybox,
    run,
    spawn,
    start_api_server,
    wait_done,
)


def test_parse_bytes_accepts_suffixes() -> None:
    assert daemon.parse_bytes("512M") == 512 << 20
    assert daemon.parse_bytes("2g") == 2 << 30
    assert daemon.parse_bytes("1GiB") == 1 << 30
    assert daemon.parse_bytes("4096") == 4096
    for bad in ("", "0", "-1M", "lots"):
        with pytest.raises(ValueError):
            daemon.parse_bytes(bad)


def _no_limit_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CONTREE_LIMIT_MEMORY", "CONTREE_LIMIT_PIDS", "CONTREE_LIMIT_CPUS"):
        monkeypatch.delenv(name, raising=False)


def _all_controllers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroups, "detect", lambda: cgroups.Layout(
        v2=Path("/sys/fs/cgroup"), v2_controllers=frozenset({"memory", "pids", "cpu"})))
    monkeypatch.setattr(cgroups, "limits_available", lambda layout=None: True)


def test_no_settings_means_the_default_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_limit_env(monkeypatch)
    _all_controllers(monkeypatch)
    limits = daemon.server_limits()
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert limits == cgroups.Limits(memory_bytes=max(256 << 20, ram // 2),
                                    pids=daemon.DEFAULT_PIDS, cpus=None)


def test_none_lifts_a_default_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_limit_env(monkeypatch)
    _all_controllers(monkeypatch)
    assert daemon.server_limits(memory="none").memory_bytes is None
    monkeypatch.setenv("CONTREE_LIMIT_PIDS", "unlimited")
    assert daemon.server_limits(memory="1G") == cgroups.Limits(memory_bytes=1 << 30)
    assert daemon.server_limits(memory="none") is None


def test_no_limits_when_cgroups_cannot_be_used(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_limit_env(monkeypatch)
    monkeypatch.setattr(cgroups, "limits_available", lambda layout=None: False)
    assert daemon.server_limits() is None
    assert daemon.server_limits(memory="1G", pids="10") is None


def test_settings_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTREE_LIMIT_PIDS", "99")
    _all_controllers(monkeypatch)
    limits = daemon.server_limits(memory="1G", pids="50", cpus="0.5")
    assert limits == cgroups.Limits(memory_bytes=1 << 30, pids=50, cpus=0.5)
    assert daemon.server_limits().pids == 99


def test_a_missing_controller_is_dropped_with_one_warning(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    _no_limit_env(monkeypatch)
    monkeypatch.setattr(cgroups, "detect", lambda: cgroups.Layout(
        v2=Path("/sys/fs/cgroup"), v2_controllers=frozenset({"pids"})))
    monkeypatch.setattr(cgroups, "limits_available", lambda layout=None: True)
    with caplog.at_level(logging.WARNING, logger="contree"):
        limits = daemon.server_limits(memory="1G", pids="50", cpus="1")
    assert limits == cgroups.Limits(pids=50)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "memory, cpu" in warnings[0].getMessage()


def test_bad_settings_fail_the_start() -> None:
    with pytest.raises(daemon.ServerStartError):
        daemon.server_limits(pids="many")
    with pytest.raises(daemon.ServerStartError):
        daemon.server_limits(cpus="-1")


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    import os

    if os.geteuid() != 0:
        pytest.skip("the sandbox engine needs root")
    if "pids" not in set(cgroups.detect().v1) | set(cgroups.detect().v2_controllers):
        pytest.skip("no pids cgroup controller on this host")
    srv = start_api_server(tmp_path_factory.mktemp("limits"), "--pids", "24")
    try:
        with srv.http() as http:
            srv.busybox = import_busybox(http)
        yield srv
    finally:
        srv.stop()


def test_server_pids_limit_applies_to_every_run(limited: ApiServer) -> None:
    storm = "i=0; while [ $i -lt 60 ]; do sleep 5 & i=$((i+1)); done; echo all started"
    with limited.http() as http:
        resp = http.post("/v1/instances", json={
            "image": limited.busybox, "command": storm, "shell": True, "disposable": True,
            "networking": {"enabled": False}})
        assert resp.status_code == 201, resp.text
        body = wait_done(http, resp.json()["uuid"])
    assert body["status"] == "SUCCESS", body
    result = body["metadata"]["result"]
    # The shell gives up at the first refused fork, long before 60 sleepers.
    assert "all started" not in result["stdout"]["value"]
    assert "can't fork" in result["stderr"]["value"]


def _limit_files(cgroup_dir: Path) -> dict[str, str]:
    names = ("pids.max", "memory.limit_in_bytes", "memory.max")
    return {n: (cgroup_dir / n).read_text().strip() for n in names if (cgroup_dir / n).exists()}


def test_a_server_without_settings_runs_everything_under_the_default_limits(
    api_server: ApiServer,  # noqa: F811
) -> None:
    """The module's server was started with no limit settings at all."""
    layout = cgroups.detect()
    have = set(layout.v1) | set(layout.v2_controllers)
    if not {"memory", "pids"} <= have:
        pytest.skip("this host lacks the memory or pids cgroup controller")
    with api_server.http() as http:
        resp = http.post("/v1/instances", json={
            "image": api_server.busybox, "command": "sleep 30", "shell": True,
            "networking": {"enabled": False}})
        assert resp.status_code == 201, resp.text
        op = resp.json()["uuid"]
        try:
            records = []
            deadline = time.monotonic() + 30
            while not records and time.monotonic() < deadline:  # written as the run starts
                records = list((api_server.home / "store" / "runs").glob("*/cgroups"))
                time.sleep(0.01)
            assert len(records) == 1
            found: dict[str, str] = {}
            for line in records[0].read_text().split():
                found.update(_limit_files(Path(line)))
        finally:
            assert http.delete(f"/v1/operations/{op}").status_code == 202
            wait_done(http, op)
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert found["pids.max"] == str(daemon.DEFAULT_PIDS)
    memory = found.get("memory.limit_in_bytes") or found["memory.max"]
    page = os.sysconf("SC_PAGE_SIZE")  # v1 rounds the limit down to whole pages
    assert int(memory) == max(256 << 20, ram // 2) // page * page


def test_a_fork_bomb_under_the_default_limits_ends_its_own_run_only(
    api_server: ApiServer,  # noqa: F811
) -> None:
    if "pids" not in set(cgroups.detect().v1) | set(cgroups.detect().v2_controllers):
        pytest.skip("no pids cgroup controller on this host")
    off = {"enabled": False}
    with api_server.http() as http:
        bomb = spawn(http, api_server.busybox, "f(){ f | f & }; f; sleep 60",
                     timeout=4, networking=off)
        # While the bomb runs into its process limit, other runs go on as usual.
        for i in range(3):
            body = run(http, api_server.busybox, f"echo fine-{i}", networking=off)
            assert body["status"] == "SUCCESS", body
            assert body["metadata"]["result"]["stdout"]["value"] == f"fine-{i}\n"
        ended = wait_done(http, bomb)
    state = ended["metadata"]["result"]["state"]
    assert state["timed_out"] is True, ended
    assert state["exit_code"] != 0
