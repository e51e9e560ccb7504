"""Failure injection the real server cannot produce on demand (httpx.MockTransport only here).

Covers: retries on 503 and their bound, no replay of spawns, connection errors as one
line, SSE streams dropped mid-run and resumed with Last-Event-Id without duplicates.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from contree_shell.client.api import ContreeClient
from contree_shell.client.errors import (
    ConnectionFailed,
    NotFound,
    ServerError,
    StreamError,
)
from contree_shell.client.runner import run_operation
from contree_shell.config import ConfigError, Profile

OP = "11111111-2222-3333-4444-555555555555"
IMG = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"

Handler = Callable[[httpx.Request], httpx.Response]


def make_client(handler: Handler, sleeps: list[float] | None = None) -> ContreeClient:
    profile = Profile(name="t", url="https://contree.test", token="tok", project="proj", type="iam")
    record = sleeps if sleeps is not None else []
    return ContreeClient(profile, transport=httpx.MockTransport(handler), sleep=record.append)


def frame(event_id: int, etype: str, data: dict[str, Any], spid: int | None = 1) -> bytes:
    event: dict[str, Any] = {"id": event_id, "ts": "2026-01-01T00:00:00Z", "type": etype, "data": data}
    if spid is not None:
        event["spid"] = spid
    return f"id: {event_id}\nevent: {etype}\ndata: {json.dumps(event)}\n\n".encode()


def out(event_id: int, text: str) -> bytes:
    return frame(event_id, "stdout", {"value": text, "encoding": "ascii"})


def completion(event_id: int, status: str = "SUCCESS") -> bytes:
    return frame(
        event_id, "completion",
        {"status": status, "duration_ms": 1500, "result_image_uuid": IMG, "error": None},
        spid=None,
    )


class Dropping(httpx.SyncByteStream):
    """A response body that delivers `chunks`, then breaks like a dropped connection."""

    def __init__(self, chunks: list[bytes], *, drop: bool = True) -> None:
        self.chunks = chunks
        self.drop = drop

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        if self.drop:
            raise httpx.ReadError("connection reset by peer")


def sse(chunks: list[bytes], *, drop: bool = False) -> httpx.Response:
    return httpx.Response(
        200, headers={"content-type": "text/event-stream"}, stream=Dropping(chunks, drop=drop)
    )


def test_headers_sent_as_the_official_client() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"images": []})

    make_client(handler).list_images(tagged=True)
    request = seen[0]
    assert request.url.path == "/v1/images"
    assert request.url.params["tagged"] == "1"
    assert request.headers["authorization"] == "Bearer tok"
    assert request.headers["project"] == "proj"
    assert request.headers["user-agent"].startswith("contree-shell/")
    assert " httpx/" in request.headers["user-agent"]
    assert " Python/" in request.headers["user-agent"]


def test_no_auth_headers_without_token_or_project() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={})

    client = ContreeClient(
        Profile(name="x", url="https://h.test/prefix", type="jwt"),
        transport=httpx.MockTransport(handler),
    )
    client.whoami()
    assert "authorization" not in seen[0].headers
    assert "project" not in seen[0].headers
    assert seen[0].url.path == "/prefix/v1/whoami"


def test_503_then_success_is_retried() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            return httpx.Response(503, json={"error": "busy"})
        return httpx.Response(200, json={"images": [{"uuid": IMG}]})

    sleeps: list[float] = []
    assert make_client(handler, sleeps).list_images() == [{"uuid": IMG}]
    assert len(calls) == 2
    assert sleeps == [0.1]


def test_persistent_5xx_gives_up_after_bounded_attempts() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(503, json={"status": 503, "error": "overloaded"})

    sleeps: list[float] = []
    with pytest.raises(ServerError) as err:
        make_client(handler, sleeps).get_operation(OP)
    assert len(calls) == 6
    assert sleeps == [0.1, 0.2, 0.5, 1.0, 2.0]
    assert err.value.message == "HTTP 503: overloaded (gave up after 6 attempts)"


def test_retry_after_header_sets_the_delay() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            return httpx.Response(429, headers={"Retry-After": "3"}, json={"error": "slow down"})
        return httpx.Response(200, json={"uuid": OP, "status": "SUCCESS"})

    sleeps: list[float] = []
    make_client(handler, sleeps).get_operation(OP)
    assert sleeps == [3.0]


def test_spawn_is_not_replayed_after_a_5xx() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(502, text="bad gateway")

    with pytest.raises(ServerError, match="HTTP 502: bad gateway"):
        make_client(handler).spawn({"image": IMG, "command": "true"})
    assert len(calls) == 1


def test_spawn_is_not_replayed_when_the_response_was_lost() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ReadError("connection reset by peer")

    with pytest.raises(ConnectionFailed, match="may or may not have been processed"):
        make_client(handler).spawn({"image": IMG, "command": "true"})
    assert len(calls) == 1


def test_spawn_is_retried_when_the_connection_never_opened() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            raise httpx.ConnectError("connection refused")
        return httpx.Response(201, json={"uuid": OP})

    assert make_client(handler).spawn({"image": IMG, "command": "true"})["uuid"] == OP
    assert len(calls) == 2


def test_stdin_write_is_never_replayed() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(json.loads(request.content))
        return httpx.Response(500, json={"error": "write timed out"})

    with pytest.raises(ServerError):
        make_client(handler).write_stdin(OP, 1, b"\x00data", close=False)
    assert calls == [{"value": "AGRhdGE=", "encoding": "base64", "close": False}]


def test_connection_refused_is_one_line(tmp_path: Path) -> None:
    sock_path = tmp_path / "dead.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))  # bound but not listening: connect() is refused
    try:
        sleeps: list[float] = []
        client = ContreeClient(
            Profile(name="local", url=f"unix://{sock_path}", type="local"), sleep=sleeps.append
        )
        with pytest.raises(ConnectionFailed) as err:
            client.whoami()
    finally:
        listener.close()
    message = err.value.message
    assert "\n" not in message
    assert message.startswith(f"Cannot connect to the local server at unix://{sock_path}: ")
    assert "refused" in message.lower()
    assert message.endswith("(gave up after 6 attempts)")
    assert len(sleeps) == 5


def test_missing_socket_is_one_line(tmp_path: Path) -> None:
    client = ContreeClient(
        Profile(name="local", url=f"unix://{tmp_path}/none.sock", type="local"), sleep=lambda _: None
    )
    with pytest.raises(ConnectionFailed, match="No such file"):
        client.get_operation(OP)


def test_resolve_image_reads_the_302_without_following_it() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.params.get("tag") == "busybox:latest":
            return httpx.Response(302, headers={"Location": f"/v1/inspect/{IMG}/"})
        return httpx.Response(404, json={"error": "tag not found"})

    client = make_client(handler)
    assert client.resolve_image("tag:busybox:latest") == IMG
    assert client.resolve_image("busybox:latest") == IMG
    assert client.resolve_image(OP) == OP  # a uuid is not looked up
    assert len(seen) == 2
    assert seen[0].url.path == "/v1/inspect/"
    with pytest.raises(NotFound, match="HTTP 404: image tag 'nope' not found"):
        client.resolve_image("nope")


class EventServer:
    """Scripted `/events` answers; records each request's Last-Event-Id and follow flag."""

    def __init__(self, answers: list[httpx.Response], status: str = "EXECUTING") -> None:
        self.answers = answers
        self.status = status
        self.requests: list[tuple[str | None, str | None]] = []
        self.spawns: list[dict[str, Any]] = []
        self.deletes: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/events"):
            self.requests.append(
                (request.headers.get("last-event-id"), request.url.params.get("follow"))
            )
            return self.answers.pop(0)
        if path == "/v1/instances":
            self.spawns.append(json.loads(request.content))
            return httpx.Response(201, json={"uuid": OP})
        if request.method == "DELETE":
            self.deletes.append(str(request.url.copy_with(scheme="http", host="x").raw_path.decode()))
            return httpx.Response(202 if path.endswith(OP) else 204)
        if path == f"/v1/operations/{OP}":
            return httpx.Response(200, json={"uuid": OP, "status": self.status})
        return httpx.Response(404, json={"error": f"unexpected {path}"})


def test_dropped_stream_resumes_with_last_event_id() -> None:
    server = EventServer([
        sse([frame(0, "spawn", {"pid": 7}), out(1, "one\n"), out(2, "two\n")], drop=True),
        sse([out(3, "three\n"), completion(4)]),
    ])
    events = list(make_client(server).iter_events(OP))
    assert [e["id"] for e in events] == [0, 1, 2, 3, 4]
    assert server.requests == [(None, "1"), ("2", "1")]


def test_server_ignoring_last_event_id_gives_no_duplicates() -> None:
    server = EventServer([
        sse([out(0, "a"), out(1, "b")], drop=True),
        sse([out(0, "a"), out(1, "b"), out(2, "c"), completion(3)]),
    ])
    events = list(make_client(server).iter_events(OP))
    assert [e["id"] for e in events] == [0, 1, 2, 3]


def test_sse_error_frame_triggers_a_reconnect() -> None:
    broken = b": stream ended with error, retry since last event id\n\nevent: sse_error\ndata: db locked\n\n"
    server = EventServer([sse([out(0, "a"), broken]), sse([completion(1)])])
    events = list(make_client(server).iter_events(OP))
    assert [e["type"] for e in events] == ["stdout", "completion"]
    assert server.requests[1] == ("0", "1")


def test_clean_end_without_completion_rereads_a_terminal_operation_once() -> None:
    server = EventServer([sse([out(0, "a")]), sse([completion(1)])], status="SUCCESS")
    events = list(make_client(server).iter_events(OP))
    assert [e["id"] for e in events] == [0, 1]
    assert server.requests == [(None, "1"), ("0", None)]  # second read without follow


def test_log_without_completion_is_a_stream_error() -> None:
    server = EventServer([sse([out(0, "a")]), sse([])], status="FAILED")
    with pytest.raises(StreamError, match="ended without completion"):
        list(make_client(server).iter_events(OP))


def test_clean_end_of_a_running_operation_reconnects() -> None:
    server = EventServer([sse([out(0, "a")]), sse([completion(1)])], status="EXECUTING")
    events = list(make_client(server).iter_events(OP))
    assert [e["id"] for e in events] == [0, 1]
    assert server.requests == [(None, "1"), ("0", "1")]


def test_stream_that_never_progresses_gives_up() -> None:
    server = EventServer([sse([], drop=True) for _ in range(10)])
    sleeps: list[float] = []
    with pytest.raises(ConnectionFailed, match="gave up after 6 attempts"):
        list(make_client(server, sleeps).iter_events(OP))
    assert len(server.requests) == 6


def test_events_of_an_unknown_operation_fail_at_once() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": "operation not found"})

    with pytest.raises(NotFound, match="HTTP 404: operation not found"):
        list(make_client(handler).iter_events(OP))


def test_run_survives_a_dropped_stream_without_duplicate_output() -> None:
    server = EventServer([
        sse([frame(0, "spawn", {"pid": 7}), out(1, "one\n"), out(2, "two\n")], drop=True),
        sse([out(2, "two\n"), out(3, "three\n"),
             frame(4, "exit", {"code": 3, "signal": -1, "timed_out": False}),
             completion(5)]),
    ])
    shown: list[bytes] = []
    outcome = run_operation(
        make_client(server), {"image": IMG, "command": "x", "shell": True}, on_stdout=shown.append
    )
    assert b"".join(shown) == b"one\ntwo\nthree\n"
    assert outcome.stdout == b"one\ntwo\nthree\n"
    assert outcome.exit_code == 3
    assert outcome.exit_status == 3
    assert outcome.status == "SUCCESS"
    assert outcome.result_image == IMG
    assert outcome.duration == 1.5
    assert server.spawns[0]["stdin"] == {"value": "", "encoding": "ascii", "close": True}


def test_ctrl_c_twice_signals_then_cancels() -> None:
    server = EventServer([
        sse([frame(0, "spawn", {"pid": 7}), out(1, "first\n"), out(2, "second\n")]),
        sse([out(2, "second\n"), out(3, "third\n")]),
        sse([frame(4, "exit", {"code": -1, "signal": 9, "timed_out": False}),
             completion(5, "CANCELLED")]),
    ], status="CANCELLED")
    shown: list[bytes] = []
    notices: list[str] = []

    def on_stdout(chunk: bytes) -> None:
        shown.append(chunk)
        if chunk in (b"first\n", b"third\n"):
            raise KeyboardInterrupt

    outcome = run_operation(
        make_client(server), {"image": IMG, "command": "x"}, on_stdout=on_stdout,
        on_notice=notices.append,
    )
    assert b"".join(shown) == b"first\nsecond\nthird\n"
    assert notices == [
        f"Sent SIGINT to operation {OP}; Ctrl-C again to cancel it",
        f"Cancelled operation {OP}",
    ]
    assert server.deletes == [f"/v1/operations/{OP}/subprocesses/1?signal=INT", f"/v1/operations/{OP}"]
    assert server.requests[1][0] == "1"  # resumed after the chunk that was interrupted
    assert outcome.interrupted
    assert outcome.status == "CANCELLED"
    assert outcome.signal == 9
    assert outcome.exit_status == 130


def test_no_completion_falls_back_to_the_operation_record() -> None:
    record = {
        "uuid": OP, "status": "FAILED", "error": "server restarted", "duration": 2.0,
        "result_image_uuid": None,
        "metadata": {"result": {"state": {"exit_code": -1, "signal": 15, "timed_out": False}}},
    }

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            return sse([frame(0, "spawn", {"pid": 7}), out(1, "x")])
        if request.url.path == "/v1/instances":
            return httpx.Response(201, json={"uuid": OP})
        return httpx.Response(200, json=record)

    outcome = run_operation(make_client(handler), {"image": IMG, "command": "x"})
    assert outcome.status == "FAILED"
    assert outcome.error == "server restarted"
    assert outcome.signal == 15
    assert outcome.stdout == b"x"
    assert outcome.exit_status == 128 + 15


def test_invalid_profile_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="Invalid URL 'ftp://nope' for profile 'x'"):
        ContreeClient(Profile(name="x", url="ftp://nope"))


def test_resumed_read_past_the_completion_just_ends() -> None:
    server = EventServer([sse([]), sse([])], status="SUCCESS")
    assert list(make_client(server).iter_events(OP, since=9)) == []
    assert server.requests == [("9", "1"), ("9", None)]
