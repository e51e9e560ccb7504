"""Pure request parsing: spawn defaults, file modes, signals, time filters, encodings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from contree_shell.sandbox.instances import (
    RequestError,
    encode_stream,
    normalize_spawn_request,
    parse_mode,
    parse_signal,
)
from contree_shell.server.validation import parse_time

IMG = "11111111-2222-4333-8444-555555555555"


def _norm(**body: object) -> dict[str, object]:
    return normalize_spawn_request({"image": IMG, "command": "true", **body},
                                   lambda ref: IMG, lambda uuid: None)


def test_spawn_defaults_are_complete() -> None:
    spec = _norm()
    assert spec == {
        "command": "true", "image": IMG, "args": [], "shell": False, "env": {},
        "preserve_env": False, "preserve_cwd": False, "cwd": "", "uid": 0, "gid": 0,
        "hostname": "linuxkit", "disposable": False,
        "resources_limits": {"max_layer_bytes": 12884901888},
        "networking": {"enabled": True},
        "stdin": {"value": "", "encoding": "ascii", "close": True},
        "timeout": 600, "truncate_output_at": 1048576, "files": {},
    }


def test_spawn_accepts_what_official_clients_send() -> None:
    spec = _norm(shell=True, args=["-I", "mode"], env={"A": None},
                 stdin={"value": "", "encoding": "ascii", "truncated": False},
                 timeout=1000, files={"/a/b": {"uuid": IMG, "mode": "0o100755"}})
    assert spec["timeout"] == 1000 and spec["env"] == {"A": ""}
    assert spec["files"] == {"/a/b": {"uuid": IMG, "uid": 0, "gid": 0, "mode": "0755"}}
    assert _norm(timeout=99999)["timeout"] == 3600


@pytest.mark.parametrize("body", [
    {"cwd": "rel"}, {"uid": -1}, {"gid": True}, {"timeout": 0}, {"args": "x"},
    {"env": ["A"]}, {"env": {"A=B": "x"}}, {"shell": "yes"}, {"truncate_output_at": -1},
    {"stdin": {"value": 1}}, {"stdin": {"value": "", "encoding": "hex"}},
    {"files": {"relative": {"uuid": IMG}}}, {"files": {"/x": {"uuid": IMG, "mode": "9"}}},
    {"hostname": "bad host"}, {"networking": {"enabled": "no"}},
])
def test_spawn_rejects_bad_fields_with_400(body: dict[str, object]) -> None:
    with pytest.raises(RequestError) as err:
        _norm(**body)
    assert err.value.status == 400


def test_file_modes() -> None:
    assert parse_mode("0644") == 0o644
    assert parse_mode("0o100644") == 0o644
    assert parse_mode("4755") == 0o4755
    assert parse_mode(33261) == 0o755
    with pytest.raises(ValueError):
        parse_mode("rwx")


def test_signals_by_name_number_and_default() -> None:
    assert parse_signal(None) == 9
    assert parse_signal("INT") == parse_signal("SIGINT") == parse_signal("int") == 2
    assert parse_signal("15") == 15
    for bad in ("NOPE", "0", "99", "SIG"):
        with pytest.raises(ValueError):
            parse_signal(bad)


def test_time_filters() -> None:
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert parse_time("15m", now=now) == now - timedelta(minutes=15)
    assert parse_time("1w", now=now) == now - timedelta(weeks=1)
    assert parse_time("1700000000") == datetime.fromtimestamp(1700000000, UTC)
    assert parse_time("2025-01-01T12:00:00Z") == datetime(2025, 1, 1, 12, tzinfo=UTC)
    assert parse_time("2025-01-01T12:00:00 00:00") == datetime(2025, 1, 1, 12, tzinfo=UTC)
    assert parse_time("2025-01-01T12:00:00.123456789+00:00").microsecond == 123456
    with pytest.raises(ValueError):
        parse_time("yesterday")


def test_stream_encoding_rule() -> None:
    assert encode_stream(b"ok\t\r\n") == ("ok\t\r\n", "ascii")
    assert encode_stream(b"caf\xc3\xa9") == ("Y2Fmw6k=", "base64")
    assert encode_stream(b"\x1b[0m") == ("G1swbQ==", "base64")
