"""The snapshot mtime policy as a server setting, through a real server.

`CONTREE_SNAPSHOT_MTIME=ignore` (the default) lets a run that only touches a file keep
its parent's image; `--snapshot-mtime keep` (or the env) commits it as a new image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_server_support import REPO, ApiServer, import_busybox, run, start_api_server

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox engine needs root")


def _status(home: Path) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONTREE_", "XDG_"))}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run(
        [sys.executable, "-m", "contree_shell.server.cli", "--home", str(home), "status",
         "--json"],
        env=env, capture_output=True, timeout=60, check=True,
    )
    body: dict[str, object] = json.loads(out.stdout)
    return body


def _touch_result(srv: ApiServer) -> tuple[str, str]:
    """(image with /etc/marker, result of a run that only touches it)."""
    with srv.http() as http:
        srv.busybox = import_busybox(http)
        first = run(http, srv.busybox, "mkdir -p /etc && echo hi > /etc/marker")
        assert first["status"] == "SUCCESS", first
        base = str(first["result"]["image"])
        assert base != srv.busybox
        touched = run(http, base, "touch -d '2001-02-03 04:05:06' /etc/marker")
        assert touched["status"] == "SUCCESS", touched
        return base, str(touched["result"]["image"])


def test_mtime_ignore_by_default_keeps_the_parent_image(tmp_path: Path) -> None:
    srv = start_api_server(tmp_path)
    try:
        assert _status(srv.home)["snapshot_mtime"] == "ignore"
        base, after = _touch_result(srv)
        assert after == base
    finally:
        srv.stop()


def test_mtime_keep_flag_commits_a_new_image(tmp_path: Path) -> None:
    srv = start_api_server(tmp_path, "--snapshot-mtime", "keep")
    try:
        assert _status(srv.home)["snapshot_mtime"] == "keep"
        base, after = _touch_result(srv)
        assert after != base
    finally:
        srv.stop()


def test_mtime_keep_from_the_environment(tmp_path: Path) -> None:
    srv = start_api_server(tmp_path, env={"CONTREE_SNAPSHOT_MTIME": "keep"})
    try:
        assert _status(srv.home)["snapshot_mtime"] == "keep"
        base, after = _touch_result(srv)
        assert after != base
    finally:
        srv.stop()


def test_invalid_mtime_policy_refuses_to_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONTREE_", "XDG_"))}
    env.update(PYTHONPATH=str(REPO), CONTREE_SNAPSHOT_MTIME="sometimes")
    out = subprocess.run(
        [sys.executable, "-m", "contree_shell.server.cli", "run", "--home",
         str(tmp_path / "home")],
        env=env, capture_output=True, timeout=60,
    )
    assert out.returncode == 1
    assert b"invalid snapshot mtime policy 'sometimes'" in out.stderr


def test_status_shows_the_run_limits_the_server_applies(tmp_path: Path) -> None:
    srv = start_api_server(tmp_path, "--memory", "1G", "--pids", "none", "--cpus", "0.5")
    try:
        limits = _status(srv.home)["limits"]
        assert limits == {"memory_bytes": 1 << 30, "cpus": 0.5}
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONTREE_", "XDG_"))}
        env["PYTHONPATH"] = str(REPO)
        text = subprocess.run(
            [sys.executable, "-m", "contree_shell.server.cli", "--home", str(srv.home), "status"],
            env=env, capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert "run limits: memory 1.0 GiB, processes unlimited, CPU 0.5\n" in text
    finally:
        srv.stop()
