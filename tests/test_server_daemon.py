"""Server process lifecycle: restart persistence, stop semantics, socket mode, TCP auth."""

from __future__ import annotations

import os
import signal
import socket
import stat
from pathlib import Path

import httpx
import pytest

from contree_shell.server import daemon
from tests.test_server_support import (
    import_busybox,
    run,
    spawn,
    sse_events,
    start_api_server,
    wait_done,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox engine needs root")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_restarted_server_answers_for_past_operations(tmp_path: Path) -> None:
    srv = start_api_server(tmp_path)
    try:
        with srv.http() as http:
            image = import_busybox(http)
            done = run(http, image, "echo persisted > /p; echo out")
            events = list(sse_events(http, done["uuid"], follow=False))
        assert srv.stop() == 0
        srv.start()
        with srv.http() as http:
            again = http.get(f"/v1/operations/{done['uuid']}").json()
            assert again == done | {"duration": again["duration"]}
            assert list(sse_events(http, done["uuid"], follow=True)) == events
            got = http.get(f"/v1/inspect/{done['result']['image']}/download",
                           params={"path": "/p"})
            assert got.content == b"persisted\n"
            assert http.get("/v1/inspect/", params={"tag": "busybox:latest"}).status_code == 302
    finally:
        srv.stop()


def test_killed_server_fails_unfinished_operations_at_restart(tmp_path: Path) -> None:
    srv = start_api_server(tmp_path)
    try:
        with srv.http() as http:
            image = import_busybox(http)
            op = spawn(http, image, "sleep 100")
            for ev in sse_events(http, op):
                if ev["type"] == "spawn":
                    break
        assert srv.process is not None
        os.killpg(srv.process.pid, signal.SIGKILL)
        srv.process.wait()
        srv.process = None
        srv.start()
        with srv.http() as http:
            body = http.get(f"/v1/operations/{op}").json()
            assert body["status"] == "FAILED" and body["error"] == "server restarted"
            events = list(sse_events(http, op))
            assert events[-1]["type"] == "completion"
            assert events[-1]["data"]["status"] == "FAILED"
            # The engine left nothing behind: a new run works on the same store.
            assert run(http, image, "true")["status"] == "SUCCESS"
        assert not any((srv.home / "store" / "runs").iterdir())
    finally:
        srv.stop()


def test_graceful_stop_cancels_running_operations(tmp_path: Path) -> None:
    srv = start_api_server(tmp_path)
    try:
        with srv.http() as http:
            image = import_busybox(http)
            op = spawn(http, image, "sleep 100")
            stream = sse_events(http, op)
            for ev in stream:
                if ev["type"] == "spawn":
                    break
            assert srv.process is not None
            srv.process.send_signal(signal.SIGTERM)
            rest = list(stream)  # the follower gets its completion before the server exits
        assert rest[-1]["type"] == "completion"
        assert rest[-1]["data"]["status"] == "CANCELLED"
        assert srv.stop() == 0
        srv.start()
        with srv.http() as http:
            body = http.get(f"/v1/operations/{op}").json()
            assert body["status"] == "CANCELLED" and body["error"] == "server stopped"
    finally:
        srv.stop()


def test_unix_socket_is_private_to_its_owner(tmp_path: Path) -> None:
    srv = start_api_server(tmp_path)
    try:
        mode = stat.S_IMODE(os.stat(srv.socket).st_mode)
        assert mode == 0o600
        assert stat.S_IMODE(os.stat(srv.home).st_mode) == 0o700
    finally:
        srv.stop()
    assert not srv.socket.exists()


def test_tcp_requires_the_bearer_token(tmp_path: Path) -> None:
    port = _free_port()
    srv = start_api_server(tmp_path, "--listen", f"127.0.0.1:{port}")
    try:
        token_file = srv.home / "token"
        assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
        token = token_file.read_text().strip()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as tcp:
            missing = tcp.get("/v1/whoami")
            assert missing.status_code == 401 and missing.json()["status"] == 401
            wrong = tcp.get("/v1/whoami", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            ok = tcp.get("/v1/whoami", headers={"Authorization": f"Bearer {token}"})
            assert ok.status_code == 200
        with srv.http() as http:  # the unix socket needs no token, and accepts any
            assert http.get("/v1/whoami").status_code == 200
            assert http.get("/v1/whoami",
                            headers={"Authorization": "Bearer whatever"}).status_code == 200
    finally:
        srv.stop()


def test_start_status_stop_manage_a_background_server(tmp_path: Path) -> None:
    home = tmp_path / "bg"
    pid = daemon.start(home)
    try:
        assert pid > 0
        info = daemon.status(home)
        assert info["running"] is True and info["pid"] == pid
        assert info["socket"] == str(home / "server.sock")
        assert {c["name"] for c in info["preflight"]} >= {"privileges", "overlayfs"}
        assert daemon.start(home) == pid  # already running: the same server
    finally:
        assert daemon.stop(home) is True
    assert daemon.status(home)["running"] is False
    assert daemon.stop(home) is False
    assert "contree server" in (home / "server.log").read_text()


def test_second_server_on_the_same_home_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "bad"
    pid = daemon.start(home)
    try:
        # A second server on the same home must refuse to take over its socket.
        with pytest.raises(daemon.ServerStartError) as err:
            daemon._bind_unix(daemon.socket_path(home))
        assert "already running" in str(err.value)
    finally:
        daemon.stop(home)
    assert pid > 0


def test_server_home_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONTREE_SERVER_HOME", str(tmp_path / "a"))
    assert daemon.server_home(None) == tmp_path / "a"
    assert daemon.server_home(str(tmp_path / "b")) == tmp_path / "b"
    monkeypatch.delenv("CONTREE_SERVER_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "x"))
    assert daemon.server_home(None) == tmp_path / "x" / "contree" / "server"


def test_token_is_created_once(tmp_path: Path) -> None:
    first = daemon.ensure_token(tmp_path)
    assert daemon.ensure_token(tmp_path) == first and len(first) >= 32


def test_completion_is_last_even_for_follow_on_finished_ops(tmp_path: Path) -> None:
    srv = start_api_server(tmp_path)
    try:
        with srv.http() as http:
            image = import_busybox(http)
            op = spawn(http, image, "true")
            wait_done(http, op)
            for follow in (True, False):
                events = list(sse_events(http, op, follow=follow))
                assert [e["type"] for e in events].count("completion") == 1
                assert events[-1]["type"] == "completion"
    finally:
        srv.stop()


def test_debootstrap_import_streams_progress_and_fails_cleanly(tmp_path: Path) -> None:
    # An unreachable mirror: debootstrap starts, reports progress, then fails.
    srv = start_api_server(tmp_path, env={"CONTREE_DEBIAN_MIRROR": "http://127.0.0.1:9/debian"})
    try:
        with srv.http() as http:
            resp = http.post("/v1/images/import", json={
                "registry": {"url": "debootstrap:bookworm"}, "tag": "debian:bookworm"})
            assert resp.status_code == 201
            op = resp.json()["uuid"]
            events = list(sse_events(http, op))
            assert events[-1]["type"] == "completion"
            assert events[-1]["data"]["status"] == "FAILED"
            progress = [e for e in events if e["type"] == "stderr"]
            assert progress and all(e["spid"] == 0 for e in progress)
            assert progress[0]["data"]["value"].startswith("debootstrap --variant=minbase")
            body = http.get(f"/v1/operations/{op}").json()
            assert body["status"] == "FAILED" and body["error"].startswith("import failed:")
            assert http.get("/v1/inspect/", params={"tag": "debian:bookworm"}
                            ).status_code == 404
            assert not any((srv.home / "store" / "tmp").iterdir())
    finally:
        srv.stop()


def test_start_failure_names_the_reason_from_the_log(tmp_path: Path) -> None:
    with pytest.raises(daemon.ServerStartError) as err:
        daemon.start(tmp_path / "h", listen="nonsense")
    assert str(err.value) == ("the local server did not start: --listen must be HOST:PORT, "
                              "got 'nonsense'")


def test_deep_histories_are_squashed_and_every_image_stays_identical(tmp_path: Path) -> None:
    srv = start_api_server(tmp_path, env={"CONTREE_SQUASH_THRESHOLD": "4"})
    try:
        with srv.http() as http:
            image = import_busybox(http)
            chain = [image]
            for i in range(12):
                body = run(http, chain[-1], f"echo {i} >> /log; echo {i} > /f{i}")
                assert body["status"] == "SUCCESS", body
                chain.append(body["result"]["image"])
            for i, img in enumerate(chain[1:]):
                got = http.get(f"/v1/inspect/{img}/download", params={"path": "/log"})
                assert got.content == "".join(f"{j}\n" for j in range(i + 1)).encode()
            last = run(http, chain[-1], "cat /f0 /f11; wc -l < /log")
            assert last["metadata"]["result"]["stdout"]["value"] == "0\n11\n12\n"
    finally:
        srv.stop()


def test_generated_tokens_are_safe_on_a_command_line(tmp_path: Path) -> None:
    """A token goes into `--token TOKEN`: it must never look like an option."""
    from contree_shell.server.daemon import ensure_token

    tokens = {ensure_token(tmp_path / f"home{i}") for i in range(200)}
    assert len(tokens) == 200
    assert all(len(t) == 64 and t.isalnum() and not t.startswith("-") for t in tokens)
