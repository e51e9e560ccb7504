"""Extra processes (spid >= 2) in a running instance, the layer size cap, the network
event and the EXECUTING status, against a real server."""

# ruff: noqa: F811  (pytest fixtures imported from test_server_support)
from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from contree_shell.sandbox.instances import RequestError, layer_size, normalize_exec_request
from tests.test_server_support import (  # noqa: F401 - fixtures
    ApiServer,
    api_server,
    http,
    spawn,
    sse_events,
    wait_done,
)


def _running(http: httpx.Client, command: str, **fields: Any) -> str:
    """Spawn and return once the main command runs (its `spawn` event is recorded)."""
    op = spawn(http, _image(http), command, networking={"enabled": False}, **fields)
    for ev in sse_events(http, op):
        if ev["type"] == "spawn":
            return op
    raise AssertionError(f"the main command never spawned: {http.get(f'/v1/operations/{op}').text}")


def _image(http: httpx.Client) -> str:
    return str(http.get("/v1/images", params={"tag": "busybox:latest"}).json()["images"][0]["uuid"])


def _exec(http: httpx.Client, op: str, **body: Any) -> int:
    resp = http.post(f"/v1/operations/{op}/subprocesses", json=body)
    assert resp.status_code == 201, resp.text
    spid = int(resp.json()["spid"])
    assert resp.headers["location"] == f"/v1/operations/{op}/subprocesses/{spid}"
    return spid


def _events_of(http: httpx.Client, op: str, spid: int) -> list[dict[str, Any]]:
    return [e for e in sse_events(http, op, follow=False) if e.get("spid") == spid]


def _result_when_exited(http: httpx.Client, op: str, spid: int) -> dict[str, Any]:
    for ev in sse_events(http, op, spid=spid):
        if ev["type"] == "exit":
            break
    resp = http.get(f"/v1/operations/{op}/subprocesses/{spid}")
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def test_exec_runs_in_the_instance_and_sees_its_files_and_hostname(http: httpx.Client) -> None:
    op = _running(http, "echo marker > /tmp/m; sleep 100", hostname="boxy")
    # Poll for the marker through a subprocess: the main command writes it right away.
    spid = _exec(http, op, command="sh", args=["-c", "hostname; cat /tmp/m; pwd"], cwd="/tmp")
    assert spid == 2
    result = _result_when_exited(http, op, spid)
    assert result["stdout"]["value"] == "boxy\nmarker\n/tmp\n"
    assert result["state"]["exit_code"] == 0 and result["state"]["signal"] == 0
    spawn_ev = _events_of(http, op, spid)[0]
    assert spawn_ev["type"] == "spawn" and spawn_ev["data"]["cwd"] == "/tmp"
    assert _exec(http, op, command="true") == 3  # spids are monotonic
    assert http.delete(f"/v1/operations/{op}").status_code == 202


def test_exec_stdin_is_streamed_recorded_and_closed(http: httpx.Client) -> None:
    op = _running(http, "sleep 100")
    spid = _exec(http, op, command="cat", stdin={"value": "one\n", "close": False})
    base = f"/v1/operations/{op}/subprocesses/{spid}"
    live = http.get(base).json()
    assert live["state"]["exit_code"] == -1  # still running: sentinel state
    assert http.post(f"{base}/stdin", json={"value": "two\n", "close": True}).status_code == 204
    result = _result_when_exited(http, op, spid)
    assert result["stdout"]["value"] == "one\ntwo\n"
    stdin = [e["data"]["value"] for e in _events_of(http, op, spid) if e["type"] == "stdin"]
    assert stdin == ["one\n", "two\n"]
    assert http.post(f"{base}/stdin", json={"value": "x"}).status_code in (404, 409)
    assert http.delete(f"/v1/operations/{op}").status_code == 202


@pytest.mark.parametrize("sig, number", [("TERM", 15), ("SIGINT", 2), ("9", 9)])
def test_exec_kill_by_signal_name_or_number(http: httpx.Client, sig: str, number: int) -> None:
    op = _running(http, "sleep 100")
    spid = _exec(http, op, command="sleep", args=["100"])
    resp = http.delete(f"/v1/operations/{op}/subprocesses/{spid}", params={"signal": sig})
    assert resp.status_code == 204, resp.text
    result = _result_when_exited(http, op, spid)
    assert result["state"]["signal"] == number and result["state"]["exit_code"] == -1
    # The instance itself keeps running.
    assert http.get(f"/v1/operations/{op}").json()["status"] == "EXECUTING"
    assert http.delete(f"/v1/operations/{op}").status_code == 202


def test_exec_missing_binary_exits_127_with_a_reason(http: httpx.Client) -> None:
    op = _running(http, "sleep 100")
    spid = _exec(http, op, command="no-such-binary")
    result = _result_when_exited(http, op, spid)
    assert result["state"]["exit_code"] == 127
    assert "no-such-binary" in result["stderr"]["value"]
    assert http.delete(f"/v1/operations/{op}").status_code == 202


def test_extra_processes_end_with_the_instance_before_shutdown(http: httpx.Client) -> None:
    op = spawn(http, _image(http), "read x", stdin={"value": "", "close": False},
               networking={"enabled": False})
    for ev in sse_events(http, op):
        if ev["type"] == "spawn":
            break
    spid = _exec(http, op, command="sleep", args=["100"])
    assert http.post(f"/v1/operations/{op}/subprocesses/1/stdin",
                     json={"value": "go\n", "close": True}).status_code == 204
    body = wait_done(http, op)
    assert body["status"] == "SUCCESS"
    events = list(sse_events(http, op, follow=False))
    kinds = [(e.get("spid"), e["type"]) for e in events]
    assert kinds.index((1, "exit")) < kinds.index((spid, "exit")) < kinds.index((0, "shutdown"))
    assert kinds[-1] == (None, "completion")
    done = http.get(f"/v1/operations/{op}/subprocesses/{spid}").json()
    assert done["state"]["signal"] == 9
    # Finished instance: no more subprocesses.
    assert http.post(f"/v1/operations/{op}/subprocesses", json={"command": "true"}).status_code == 409


def test_exec_request_errors(http: httpx.Client) -> None:
    op = _running(http, "sleep 100")
    base = f"/v1/operations/{op}/subprocesses"
    assert http.post(base, json={"command": "true", "image": "x"}).status_code == 400
    assert http.post(base, json={"args": ["x"]}).status_code == 400
    assert http.post(base, json={"command": "x", "shell": True, "args": ["a"]}).status_code == 400
    assert http.get(f"{base}/77").status_code == 404
    assert http.delete(f"{base}/77").status_code == 404
    assert http.delete(f"/v1/operations/{op}").status_code == 202


def test_normalize_exec_request_fills_defaults() -> None:
    spec = normalize_exec_request({"command": "ls", "cwd": "/etc/"})
    assert spec["cwd"] == "/etc" and spec["args"] == [] and spec["shell"] is False
    assert spec["stdin"] == {"value": "", "encoding": "ascii", "close": True}
    with pytest.raises(RequestError):
        normalize_exec_request({"command": "ls", "timeout": 5})


def test_max_layer_bytes_fails_the_run_with_size_cap_and_keeps_nothing(
        http: httpx.Client) -> None:
    image = _image(http)
    op = spawn(http, image, "dd if=/dev/zero of=/big bs=1024 count=512 2>/dev/null; echo done",
               resources_limits={"max_layer_bytes": 64 * 1024}, networking={"enabled": False})
    body = wait_done(http, op)
    assert body["status"] == "FAILED"
    assert "max_layer_bytes" in body["error"]
    assert body["result_image_uuid"] is None
    caps = [e for e in sse_events(http, op, follow=False) if e["type"] == "size_cap"]
    assert len(caps) == 1 and caps[0]["spid"] == 0
    assert caps[0]["data"]["limit_bytes"] == 64 * 1024
    assert caps[0]["data"]["file_size"] > 64 * 1024
    # Under the cap the same run succeeds.
    op = spawn(http, image, "echo small > /small",
               resources_limits={"max_layer_bytes": 64 * 1024}, networking={"enabled": False})
    assert wait_done(http, op)["status"] == "SUCCESS"


def test_size_cap_stops_a_run_while_it_is_still_running(http: httpx.Client) -> None:
    started = time.monotonic()
    op = spawn(http, _image(http), "dd if=/dev/zero of=/big bs=1024 count=512; sleep 60",
               resources_limits={"max_layer_bytes": 64 * 1024}, networking={"enabled": False})
    body = wait_done(http, op)
    assert body["status"] == "FAILED" and "max_layer_bytes" in body["error"]
    assert time.monotonic() - started < 30  # killed long before `sleep 60` ended
    kinds = [e["type"] for e in sse_events(http, op, follow=False)]
    assert kinds[-3:] == ["size_cap", "shutdown", "completion"]


def test_layer_size_counts_files_and_stops_early(tmp_path: Any) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x" * 1000)
    (tmp_path / "l").symlink_to("d/f")
    assert layer_size(tmp_path) == 512 + 1000 + 3
    assert layer_size(tmp_path, stop_above=10) > 10


def test_status_is_executing_only_once_the_command_runs(http: httpx.Client) -> None:
    op = spawn(http, _image(http), "sleep 100", networking={"enabled": False})
    seen_status_at_spawn = None
    for ev in sse_events(http, op):
        if ev["type"] == "init":
            # init is recorded before the sandbox exists: not EXECUTING unless spawned since
            pass
        if ev["type"] == "spawn":
            seen_status_at_spawn = http.get(f"/v1/operations/{op}").json()["status"]
            break
    assert seen_status_at_spawn == "EXECUTING"
    assert http.delete(f"/v1/operations/{op}").status_code == 202


def test_network_event_only_when_networking_is_on(http: httpx.Client) -> None:
    image = _image(http)
    off = spawn(http, image, "true", networking={"enabled": False})
    wait_done(http, off)
    assert not [e for e in sse_events(http, off, follow=False) if e["type"] == "network"]
    on = spawn(http, image, "true", networking={"enabled": True})
    body = wait_done(http, on)
    if body["status"] != "SUCCESS":
        pytest.skip(f"networking is unavailable here: {body['error']}")
    events = list(sse_events(http, on, follow=False))
    net = [e for e in events if e["type"] == "network"]
    if not net:
        pytest.skip("the runtime reports no network support on this host")
    assert net[0]["spid"] == 0
    names = [i["name"] for i in net[0]["data"]["interfaces"]]
    assert "lo" in names
    configured = net[0]["data"]["configured"]
    assert configured.get("nameserver")
    # pid 1 reads them inside the namespace once slirp4netns has configured it.
    assert configured.get("ip4") == "10.0.2.100" and configured.get("ip4_gw") == "10.0.2.2"
    types = [e["type"] for e in events]
    assert types.index("init") < types.index("network") < types.index("spawn")



