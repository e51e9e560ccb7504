"""Pure wire-format parts of the client: SSE framing, stream encoding, retry ladder, errors."""

from __future__ import annotations

import base64

import pytest

from contree_shell.client.errors import (
    ApiError,
    Conflict,
    ContreeError,
    NotFound,
    ServerError,
    Unprocessable,
    api_error,
)
from contree_shell.client.retry import RetryPolicy, parse_retry_after
from contree_shell.client.sse import SseFrame, SseParser, event_from_frame, parse_frames
from contree_shell.client.streams import decode_stream, encode_stream, stdin_repr


def test_sse_frames_with_comments_and_multiline_data() -> None:
    lines = [
        ": keepalive",
        "",
        "id: 3",
        "event: stdout",
        'data: {"a":',
        "data: 1}",
        "",
        "retry: 100",
        "data:x",
        "",
    ]
    frames = list(parse_frames(lines))
    assert frames == [
        SseFrame(event="stdout", data='{"a":\n1}', id="3"),
        SseFrame(event="message", data="x", id=None),
    ]


def test_sse_unterminated_trailing_frame_is_dropped() -> None:
    parser = SseParser()
    assert parser.feed("id: 1") is None
    assert parser.feed("data: {}") is None
    assert parser.finish() is None


def test_sse_error_frame_is_a_frame_of_its_own() -> None:
    lines = [": stream ended with error, retry since last event id", "", "event: sse_error",
             "data: boom", ""]
    assert list(parse_frames(lines)) == [SseFrame(event="sse_error", data="boom")]


def test_event_from_frame_fills_type_and_id_from_the_frame() -> None:
    event = event_from_frame(SseFrame(event="exit", data='{"data": {"code": 0}}', id="7"))
    assert event == {"type": "exit", "id": 7, "data": {"code": 0}}
    assert event_from_frame(SseFrame(event="x", data="not json")) is None
    assert event_from_frame(SseFrame(event="x", data="{}")) is None  # no id anywhere


def test_stream_encoding_ascii_or_base64() -> None:
    assert encode_stream(b"hi\tthere\r\n") == ("hi\tthere\r\n", "ascii")
    assert encode_stream(b"") == ("", "ascii")
    raw = b"caf\xc3\xa9\x00\x1b"
    value, enc = encode_stream(raw)
    assert enc == "base64" and base64.b64decode(value) == raw
    assert stdin_repr(b"x", close=True) == {"value": "x", "encoding": "ascii", "close": True}


def test_stream_decoding_round_trips() -> None:
    for raw in (b"plain\n", b"\xff\xfe binary", "ünïcode".encode()):
        value, enc = encode_stream(raw)
        assert decode_stream({"value": value, "encoding": enc}) == raw
    assert decode_stream({"value": "ünï", "encoding": "ascii"}) == "ünï".encode()


def test_retry_ladder_is_bounded() -> None:
    policy = RetryPolicy()
    delays = []
    attempt = 1
    while (delay := policy.delay(attempt)) is not None:
        delays.append(delay)
        attempt += 1
    assert delays == [0.1, 0.2, 0.5, 1.0, 2.0]
    assert attempt == 6  # six attempts in all


def test_retry_after_is_honoured_up_to_ten_seconds() -> None:
    policy = RetryPolicy()
    assert policy.delay(1, retry_after=3.0) == 3.0
    assert policy.delay(1, retry_after=120.0) == 10.0
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_unsafe_requests_retry_only_when_not_processed() -> None:
    assert RetryPolicy.status_retryable(503, replayable=True)
    assert RetryPolicy.status_retryable(429, replayable=True)
    assert not RetryPolicy.status_retryable(404, replayable=True)
    assert not RetryPolicy.status_retryable(503, replayable=False)
    assert RetryPolicy.status_retryable(429, replayable=False)


@pytest.mark.parametrize(
    ("status", "cls"),
    [(404, NotFound), (409, Conflict), (422, Unprocessable), (500, ServerError), (503, ServerError)],
)
def test_api_error_classes_by_status(status: int, cls: type[ApiError]) -> None:
    assert type(api_error(status, b'{"error": "x"}')) is cls


def test_api_error_messages_are_one_line() -> None:
    err = api_error(404, b'{"status": 404, "error": "image not found"}')
    assert err.message == "HTTP 404: image not found"
    assert isinstance(err, ContreeError) and err.status == 404
    assert api_error(502, b"<html>\nBad\nGateway</html>").message == "HTTP 502: <html> Bad Gateway</html>"
    validation = api_error(400, b'{"error": [{"loc": ["body", "cwd"], "msg": "bad path"}]}')
    assert validation.message == "HTTP 400: body.cwd: bad path"
    assert ContreeError("two\nlines").message == "two lines"


def _modules_after(code: str) -> set[str]:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        capture_output=True, text=True, check=True,
    ).stdout
    return set(out.split())


def test_client_never_imports_the_server_or_the_engine() -> None:
    loaded = _modules_after(
        "import contree_shell.client.api, contree_shell.client.runner, "
        "contree_shell.client.local, contree_shell.client.stdin"
    )
    assert not {m for m in loaded if m.startswith(("contree_shell.server", "contree_shell.sandbox"))}


def test_error_classes_load_without_httpx() -> None:
    loaded = _modules_after("import contree_shell.client.errors, contree_shell.config")
    assert "httpx" not in loaded
