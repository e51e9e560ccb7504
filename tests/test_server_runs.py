"""Instance runs through the real server: events, results, stdin, signals, cancel."""

# ruff: noqa: F811  (pytest fixtures imported from test_server_support)

from __future__ import annotations

import base64
import threading
from typing import Any

import httpx

from tests.test_server_support import (  # noqa: F401 - fixtures
    ApiServer,
    api_server,
    http,
    run,
    spawn,
    sse_events,
    wait_done,
)

RESOURCE_KEYS = {
    "block_input", "block_output", "cost", "elapsed_time", "involuntary_switches", "max_rss",
    "monotonic_time", "page_faults", "page_faults_io", "shared_memory", "signals", "swaps",
    "system_cpu_time", "unshared_memory", "user_cpu_time", "voluntary_switches",
}
STATE_KEYS = {"continued", "core_dump", "exit_code", "pid", "signal", "stopped", "timed_out"}
SUMMARY_KEYS = {
    "uuid", "kind", "status", "error", "created_at", "duration", "image_size", "consumed_cpu",
    "consumed_memory", "image_uuid", "result_image_uuid",
}


def assert_sdk_shape(op: dict[str, Any]) -> None:
    """What the official SDK structures strictly on every poll (§3.7)."""
    assert set(op) >= SUMMARY_KEYS
    assert isinstance(op["duration"], float | int)
    md = op["metadata"]
    for key in ("args", "command", "cwd", "disposable", "env", "files", "hostname", "image",
                "result", "shell", "stdin", "timeout", "truncate_output_at"):
        assert key in md, key
    assert isinstance(md["args"], list) and isinstance(md["env"], dict)
    assert isinstance(md["files"], dict) and isinstance(md["timeout"], int)
    assert isinstance(md["stdin"], dict) and "value" in md["stdin"]
    assert set(op["result"]) == {"image", "tag"}
    if op["status"] in ("SUCCESS", "FAILED", "CANCELLED") and md["result"] is not None:
        assert set(md["result"]["resources"]) == RESOURCE_KEYS
        assert set(md["result"]["state"]) == STATE_KEYS
        assert "value" in md["result"]["stdout"] and "value" in md["result"]["stderr"]


def test_echo_streams_events_in_order_and_keeps_the_parent_image(api_server: ApiServer,
                                                                 http: httpx.Client) -> None:
    op = spawn(http, api_server.busybox, "echo hi", networking={"enabled": False})
    events = list(sse_events(http, op))
    types = [e["type"] for e in events]
    assert types == ["init", "spawn", "stdout", "exit", "shutdown", "completion"]
    assert [e["id"] for e in events] == list(range(len(events)))
    assert [e.get("spid") for e in events] == [0, 1, 1, 1, 0, None]
    assert "spid" not in events[-1]
    assert events[1]["data"]["command"] == "/bin/sh"
    assert events[1]["data"]["args"] == ["-c", "echo hi"]
    assert events[2]["data"] == {"value": "hi\n", "encoding": "ascii", "truncated": False}
    assert events[3]["data"]["code"] == 0 and events[3]["data"]["signal"] == -1
    assert len(events[3]["data"]["resources"]) == 15
    assert events[4]["data"]["reason"] == "job_complete"
    done = events[-1]["data"]
    assert done["status"] == "SUCCESS"
    assert done["result_image_uuid"] == api_server.busybox  # nothing changed
    body = http.get(f"/v1/operations/{op}").json()
    assert_sdk_shape(body)
    assert body["result"] == {"image": api_server.busybox, "tag": None}
    assert body["metadata"]["result"]["stdout"]["value"] == "hi\n"
    assert body["metadata"]["result"]["state"]["exit_code"] == 0


def test_write_makes_a_new_image_and_leaves_the_parent_alone(api_server: ApiServer,
                                                             http: httpx.Client) -> None:
    op = run(http, api_server.busybox, "echo x > /f")
    assert op["status"] == "SUCCESS"
    new = op["result"]["image"]
    assert new and new != api_server.busybox
    assert op["result_image_uuid"] == new and op["image_uuid"] == api_server.busybox
    assert op["image_size"] > 0
    got = http.get(f"/v1/inspect/{new}/download", params={"path": "/f"})
    assert got.content == b"x\n"
    assert http.get(f"/v1/inspect/{api_server.busybox}/download",
                    params={"path": "/f"}).status_code == 404
    image = http.get(f"/v1/inspect/{new}/").json()
    assert image["operation_uuid"] == op["uuid"] and image["tag"] is None


def test_nonzero_exit_is_success_with_the_code(api_server: ApiServer,
                                               http: httpx.Client) -> None:
    op = run(http, api_server.busybox, "echo oops >&2; exit 3")
    assert op["status"] == "SUCCESS"
    assert op["metadata"]["result"]["state"]["exit_code"] == 3
    assert op["metadata"]["result"]["stderr"]["value"] == "oops\n"


def test_operation_shape_satisfies_the_sdk_while_running(api_server: ApiServer,
                                                         http: httpx.Client) -> None:
    op = spawn(http, api_server.busybox, "sleep 100")
    # PENDING or EXECUTING, the shape is complete (duration a number, result key present).
    early = http.get(f"/v1/operations/{op}").json()
    assert early["status"] in ("PENDING", "EXECUTING")
    assert_sdk_shape(early)
    assert early["metadata"]["result"] is None
    for ev in sse_events(http, op):
        if ev["type"] == "spawn":
            break
    running = http.get(f"/v1/operations/{op}").json()
    assert running["status"] == "EXECUTING"
    assert_sdk_shape(running)
    assert http.delete(f"/v1/operations/{op}").status_code == 202
    assert_sdk_shape(wait_done(http, op))


def test_follow_delivers_stdout_before_the_run_ends(api_server: ApiServer,
                                                    http: httpx.Client) -> None:
    op = spawn(http, api_server.busybox, "echo a; read x; echo b",
               stdin={"value": "", "close": False})
    seen: list[str] = []
    for ev in sse_events(http, op):
        seen.append(ev["type"])
        if ev["type"] == "stdout" and ev["data"]["value"] == "a\n":
            # The command is still blocked on stdin: `a` arrived live.
            assert http.get(f"/v1/operations/{op}").json()["status"] == "EXECUTING"
            resp = http.post(f"/v1/operations/{op}/subprocesses/1/stdin",
                             json={"value": "go\n", "close": True})
            assert resp.status_code in (204, 409), resp.text
    assert seen[-1] == "completion"


def test_follow_with_sleep_sees_a_before_exit(api_server: ApiServer,
                                              http: httpx.Client) -> None:
    op = spawn(http, api_server.busybox, "echo a; sleep 1; echo b")
    order: list[tuple[str, str]] = []
    for ev in sse_events(http, op):
        if ev["type"] == "stdout":
            status = http.get(f"/v1/operations/{op}").json()["status"]
            order.append((ev["data"]["value"], status))
    assert order[0] == ("a\n", "EXECUTING")
    assert [v for v, _ in order] == ["a\n", "b\n"]


def test_last_event_id_resumes_and_wins_over_since(api_server: ApiServer,
                                                   http: httpx.Client) -> None:
    op = run(http, api_server.busybox, "echo 1; echo 2")["uuid"]
    all_events = list(sse_events(http, op, follow=False))
    assert all_events[-1]["type"] == "completion"
    tail = list(sse_events(http, op, headers={"Last-Event-Id": "2"}, since=0))
    assert [e["id"] for e in tail] == [e["id"] for e in all_events if e["id"] > 2]
    since = list(sse_events(http, op, since=3))
    assert [e["id"] for e in since] == [e["id"] for e in all_events if e["id"] > 3]
    only1 = list(sse_events(http, op, spid=1))
    assert only1 and all(e["spid"] == 1 for e in only1)
    assert http.get(f"/v1/operations/{op}/events", params={"since": "x"}).status_code == 400
    assert http.get("/v1/operations/00000000-0000-4000-8000-000000000000/events"
                    ).status_code == 404


def test_stdin_stays_open_for_posts_to_cat(api_server: ApiServer, http: httpx.Client) -> None:
    op = spawn(http, api_server.busybox, "cat", shell=False,
               stdin={"value": "first\n", "encoding": "ascii", "close": False},
               env={"PATH": "/bin"})
    out = b""
    for ev in sse_events(http, op):
        if ev["type"] == "spawn":
            resp = http.post(f"/v1/operations/{op}/subprocesses/1/stdin",
                             json={"value": base64.b64encode(b"second\n").decode(),
                                   "encoding": "base64", "close": False})
            assert resp.status_code == 204, resp.text
            resp = http.post(f"/v1/operations/{op}/subprocesses/1/stdin",
                             json={"value": "third\n", "close": True})
            assert resp.status_code == 204, resp.text
            resp = http.post(f"/v1/operations/{op}/subprocesses/1/stdin",
                             json={"value": "late\n"})
            assert resp.status_code in (409, 410)
        if ev["type"] == "stdout":
            out += ev["data"]["value"].encode()
    assert out == b"first\nsecond\nthird\n"
    resp = http.post(f"/v1/operations/{op}/subprocesses/1/stdin", json={"value": "x"})
    assert resp.status_code == 410


def test_stdin_without_close_false_is_409(api_server: ApiServer, http: httpx.Client) -> None:
    op = spawn(http, api_server.busybox, "sleep 30")
    for ev in sse_events(http, op):
        if ev["type"] == "spawn":
            break
    resp = http.post(f"/v1/operations/{op}/subprocesses/1/stdin", json={"value": "x"})
    assert resp.status_code == 409
    http.delete(f"/v1/operations/{op}")
    wait_done(http, op)


def test_signal_int_ends_sleep(api_server: ApiServer, http: httpx.Client) -> None:
    op = spawn(http, api_server.busybox, "sleep", shell=False, args=["100"],
               env={"PATH": "/bin"})
    for ev in sse_events(http, op):
        if ev["type"] == "spawn":
            resp = http.delete(f"/v1/operations/{op}/subprocesses/1", params={"signal": "INT"})
            assert resp.status_code == 204, resp.text
        if ev["type"] == "exit":
            assert ev["data"]["signal"] == 2 and ev["data"]["code"] == -1
    body = http.get(f"/v1/operations/{op}").json()
    assert body["status"] == "SUCCESS"
    assert body["metadata"]["result"]["state"]["signal"] == 2
    resp = http.delete(f"/v1/operations/{op}/subprocesses/1", params={"signal": "TERM"})
    assert resp.status_code == 409


def test_signal_names_numbers_and_bad_values(api_server: ApiServer, http: httpx.Client) -> None:
    op = spawn(http, api_server.busybox, "sleep 100")
    base = f"/v1/operations/{op}/subprocesses"
    assert http.delete(f"{base}/1", params={"signal": "NOPE"}).status_code == 400
    assert http.delete(f"{base}/0").status_code == 400
    assert http.delete(f"{base}/7", params={"signal": "TERM"}).status_code == 404
    assert http.delete(f"{base}/1", params={"signal": "SIGCONT"}).status_code == 204
    assert http.delete(f"{base}/1", params={"signal": "18"}).status_code == 204
    assert http.delete(f"{base}/1").status_code == 204  # default KILL
    body = wait_done(http, op)
    assert body["metadata"]["result"]["state"]["signal"] == 9


def test_cancel_ends_cancelled_with_completion_and_second_cancel_is_409(
        api_server: ApiServer, http: httpx.Client) -> None:
    op = spawn(http, api_server.busybox, "sleep 100")
    for ev in sse_events(http, op):
        if ev["type"] == "spawn":
            assert http.delete(f"/v1/operations/{op}").status_code == 202
    events = list(sse_events(http, op, follow=False))
    assert events[-1]["type"] == "completion"
    assert events[-1]["data"]["status"] == "CANCELLED"
    assert events[-1]["data"]["result_image_uuid"] is None
    body = http.get(f"/v1/operations/{op}").json()
    assert body["status"] == "CANCELLED" and body["result_image_uuid"] is None
    assert http.delete(f"/v1/operations/{op}").status_code == 409


def test_timeout_is_success_with_timed_out(api_server: ApiServer, http: httpx.Client) -> None:
    op = spawn(http, api_server.busybox, "sleep 30", timeout=1)
    events = list(sse_events(http, op))
    exit_ev = next(e for e in events if e["type"] == "exit")
    assert exit_ev["data"]["timed_out"] is True
    assert exit_ev["data"]["code"] == -1 and exit_ev["data"]["signal"] == 9
    assert next(e for e in events if e["type"] == "shutdown")["data"]["reason"] == "timeout"
    body = http.get(f"/v1/operations/{op}").json()
    assert body["status"] == "SUCCESS"
    state = body["metadata"]["result"]["state"]
    assert state["timed_out"] is True and state["exit_code"] == -1 and state["signal"] == 9


def test_disposable_run_has_null_result(api_server: ApiServer, http: httpx.Client) -> None:
    op = spawn(http, api_server.busybox, "echo x > /f", disposable=True)
    events = list(sse_events(http, op))
    assert events[-1]["data"]["result_image_uuid"] is None
    body = http.get(f"/v1/operations/{op}").json()
    assert body["status"] == "SUCCESS"
    assert body["result"] == {"image": None, "tag": None}
    assert body["result_image_uuid"] is None and body["image_size"] is None


def test_missing_binary_without_shell_fails_with_spawn_failed(api_server: ApiServer,
                                                              http: httpx.Client) -> None:
    op = spawn(http, api_server.busybox, "/no/such/binary", shell=False)
    events = list(sse_events(http, op))
    assert events[-1]["data"]["status"] == "FAILED"
    shutdown = [e for e in events if e["type"] == "shutdown"]
    assert shutdown[-1]["data"]["reason"] == "spawn_failed"
    body = http.get(f"/v1/operations/{op}").json()
    assert body["status"] == "FAILED" and "/no/such/binary" in body["error"]
    assert_sdk_shape(body)


def test_unknown_command_in_shell_mode_is_exit_127(api_server: ApiServer,
                                                   http: httpx.Client) -> None:
    body = run(http, api_server.busybox, "no-such-command")
    assert body["status"] == "SUCCESS"
    assert body["metadata"]["result"]["state"]["exit_code"] == 127


def test_spawn_validation_errors(api_server: ApiServer, http: httpx.Client) -> None:
    img = api_server.busybox
    cases: list[tuple[dict[str, Any], int]] = [
        ({"command": "true"}, 400),
        ({"image": img}, 400),
        ({"image": "00000000-0000-4000-8000-000000000000", "command": "true"}, 404),
        ({"image": "tag:nope:nope", "command": "true"}, 404),
        ({"image": "not a uuid", "command": "true"}, 400),
        ({"image": img, "command": "true", "cwd": "relative"}, 400),
        ({"image": img, "command": "true", "uid": -1}, 400),
        ({"image": img, "command": "true", "timeout": "10"}, 400),
        ({"image": img, "command": "true", "truncate_output_at": 10485761}, 400),
        ({"image": img, "command": "true", "stdin": {"value": "!", "encoding": "base64"}}, 400),
        ({"image": img, "command": "true", "files": {"/x": {
            "uuid": "00000000-0000-4000-8000-000000000000"}}}, 404),
        ({"image": img, "command": "true", "env": {"A": 1}}, 400),
    ]
    for payload, status in cases:
        resp = http.post("/v1/instances", json=payload)
        assert resp.status_code == status, (payload, resp.text)
        assert resp.json()["status"] == status and resp.json()["error"]
    resp = http.post("/v1/instances", json={"image": "tag:nope", "command": "true"})
    assert "image not found" in resp.json()["error"]


def test_spawn_echoes_a_fully_defaulted_request(api_server: ApiServer,
                                                http: httpx.Client) -> None:
    resp = http.post("/v1/instances", json={
        "image": "tag:busybox:latest", "command": "true", "args": ["ignored"], "shell": True,
        "timeout": 100000, "stdin": {"value": "", "truncated": False}})
    assert resp.status_code == 201
    echo = resp.json()
    assert echo["image"] == api_server.busybox
    assert echo["timeout"] == 3600  # clamped, not rejected
    assert echo["stdin"] == {"value": "", "encoding": "ascii", "close": True}
    assert echo["networking"] == {"enabled": True}
    assert echo["resources_limits"] == {"max_layer_bytes": 12884901888}
    for key in ("env", "files", "hostname", "cwd", "uid", "gid", "preserve_env", "disposable",
                "truncate_output_at"):
        assert key in echo
    wait_done(http, echo["uuid"])


def test_files_are_materialized_with_mode_and_owner(api_server: ApiServer,
                                                    http: httpx.Client) -> None:
    up = http.post("/v1/files", content=b"#!/bin/sh\necho from-file\n").json()
    body = run(http, api_server.busybox, "/opt/tool/run.sh; stat -c '%a %u %g' "
               "/opt/tool/run.sh /etc/data /opt/tool", files={
                   "/opt/tool/run.sh": {"uuid": up["uuid"], "mode": "0o100755"},
                   "/etc/data": {"uuid": up["uuid"], "uid": 1000, "gid": 1000, "mode": "0600"},
               })
    out = body["metadata"]["result"]["stdout"]["value"]
    assert out == "from-file\n755 0 0\n600 1000 1000\n755 0 0\n"
    new = body["result"]["image"]
    listing = http.get(f"/v1/inspect/{new}/list", params={"path": "/etc"}).json()
    assert "passwd" in {f["path"] for f in listing["files"]}  # /etc merged, not replaced


def test_env_cwd_and_preserve_env(api_server: ApiServer, http: httpx.Client) -> None:
    body = run(http, api_server.busybox, "echo $FOO; pwd", env={"FOO": "bar"},
               cwd="/work/dir", preserve_env=True, preserve_cwd=True)
    assert body["metadata"]["result"]["stdout"]["value"] == "bar\n/work/dir\n"
    child = body["result"]["image"]
    again = run(http, child, "echo $FOO; pwd")
    assert again["metadata"]["result"]["stdout"]["value"] == "bar\n/work/dir\n"


def test_output_is_truncated_at_the_cap_with_an_event(api_server: ApiServer,
                                                      http: httpx.Client) -> None:
    op = spawn(http, api_server.busybox, "head -c 5000 /dev/zero | tr '\\0' a",
               truncate_output_at=100)
    events = list(sse_events(http, op))
    out = "".join(e["data"]["value"] for e in events if e["type"] == "stdout")
    assert out == "a" * 100
    trunc = next(e for e in events if e["type"] == "truncated")
    assert trunc["data"] == {"stream": "stdout", "bytes_emitted": 100, "bytes_dropped": 4900}
    body = http.get(f"/v1/operations/{op}").json()
    assert body["metadata"]["result"]["stdout"]["truncated"] is True


def test_binary_output_is_base64(api_server: ApiServer, http: httpx.Client) -> None:
    op = spawn(http, api_server.busybox, "printf '\\001\\377'")
    events = list(sse_events(http, op))
    chunk = next(e for e in events if e["type"] == "stdout")["data"]
    assert chunk["encoding"] == "base64"
    assert base64.b64decode(chunk["value"]) == b"\x01\xff"


def test_operations_list_is_a_bare_array_with_filters(api_server: ApiServer,
                                                      http: httpx.Client) -> None:
    run(http, api_server.busybox, "true")
    rows = http.get("/v1/operations", params={"limit": 5}).json()
    assert isinstance(rows, list) and 0 < len(rows) <= 5
    assert all(set(r) == SUMMARY_KEYS for r in rows)
    kinds = {r["kind"] for r in http.get("/v1/operations", params={"kind": "image_import"}
                                         ).json()}
    assert kinds == {"image_import"}
    assert all(r["status"] == "SUCCESS" for r in http.get(
        "/v1/operations", params={"status": "SUCCESS"}).json())
    page2 = http.get("/v1/operations", params={"limit": 1, "offset": 1}).json()
    assert page2[0]["uuid"] == rows[1]["uuid"]
    assert http.get("/v1/operations", params={"status": "DONE"}).status_code == 400
    assert http.get("/v1/operations", params={"kind": "x"}).status_code == 400
    assert http.get("/v1/operations/not-a-uuid").status_code == 400
    assert http.get("/v1/operations/00000000-0000-4000-8000-000000000000").status_code == 404


def test_concurrent_runs_all_complete(api_server: ApiServer, http: httpx.Client) -> None:
    results: list[dict[str, Any]] = []

    def one(i: int) -> None:
        with api_server.http() as c:
            results.append(run(c, api_server.busybox, f"echo {i}"))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["metadata"]["result"]["stdout"]["value"] for r in results) == sorted(
        f"{i}\n" for i in range(8))


def test_files_follow_symlinked_parent_dirs_inside_the_image(api_server: ApiServer,
                                                             http: httpx.Client) -> None:
    base = run(http, api_server.busybox, "mkdir -p /opt/real && ln -s /opt/real /lnk")
    up = http.post("/v1/files", content=b"via link\n").json()
    body = run(http, base["result"]["image"], "cat /opt/real/f; test -L /lnk && echo link",
               files={"/lnk/f": {"uuid": up["uuid"], "mode": "0644"}})
    assert body["metadata"]["result"]["stdout"]["value"] == "via link\nlink\n"


def test_inflight_and_subprocess_get_show_partial_then_final_output(
        api_server: ApiServer, http: httpx.Client) -> None:
    op = spawn(http, api_server.busybox, "echo early; read x; echo late",
               stdin={"value": "", "close": False})
    for ev in sse_events(http, op):
        if ev["type"] == "stdout" and ev["data"]["value"] == "early\n":
            live = http.get(f"/v1/operations/{op}", params={"inflight": "1"}).json()
            partial = live["metadata"]["result"]
            assert partial["stdout"]["value"] == "early\n"
            assert partial["state"]["exit_code"] == -1
            sub = http.get(f"/v1/operations/{op}/subprocesses/1").json()
            assert sub["stdout"]["value"] == "early\n"
            http.post(f"/v1/operations/{op}/subprocesses/1/stdin", json={"value": "\n"})
    final = http.get(f"/v1/operations/{op}/subprocesses/1").json()
    assert final["stdout"]["value"] == "early\nlate\n"
    assert final["state"]["exit_code"] == 0
    assert http.get(f"/v1/operations/{op}/subprocesses/2").status_code == 404
