"""Formatters, field conversions, the Output writer, colour and pager policy."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from contree_shell.output import (
    EXIT_BROKEN_PIPE,
    Output,
    StdoutClosed,
    UnknownFormat,
    color_enabled,
    display_width,
    get_formatter,
    render,
    strip_ansi,
    truncate,
)
from contree_shell.output.fields import (
    format_duration,
    format_local_time,
    format_mode,
    parse_timestamp,
)
from contree_shell.output.formatters import fit_columns
from contree_shell.output.pager import needs_paging, pager_command, pager_env

ROWS = [
    {"uuid": "a1", "status": "SUCCESS", "exit_code": 0, "error": None, "ok": True},
    {"uuid": "b2", "status": "FAILED", "exit_code": 2, "error": "boom", "ok": False},
]


# -- field conversions ---------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (12, "12s"),
        (12.4, "12s"),
        (0.42, "0.4s"),
        (59.6, "1m0s"),
        (184, "3m4s"),
        (3600, "1h0m"),
        (3720, "1h2m"),
        (None, ""),
        ("n/a", "n/a"),
    ],
)
def test_duration_format(seconds: object, text: str) -> None:
    assert format_duration(seconds) == text


def test_mode_is_octal_without_type_bits() -> None:
    assert format_mode(0o100644) == "0644"
    assert format_mode(0o4755) == "4755"
    assert format_mode("0600") == "0600"


@pytest.mark.parametrize(
    "value",
    [
        "2026-01-02T03:04:05Z",
        "2026-01-02T03:04:05.123456789Z",
        "2026-01-02T05:04:05+02:00",
        "2026-01-02 03:04:05",
        "2026-01-02T03:04:05.5",
        1767323045,
    ],
)
def test_timestamps_parse_as_utc(value: object) -> None:
    parsed = parse_timestamp(value)
    assert parsed is not None
    assert parsed.astimezone(UTC).replace(microsecond=0) == datetime(
        2026, 1, 2, 3, 4, 5, tzinfo=UTC
    )


def test_local_time_is_compact_today_and_full_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    now = datetime.now(UTC)
    local = now.astimezone()
    assert format_local_time(now.isoformat()) == local.strftime("%H:%M:%S")
    old = now - timedelta(days=3)
    assert format_local_time(old.isoformat()) == old.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    assert format_local_time(now.isoformat(), compact=False) == local.strftime("%Y-%m-%d %H:%M:%S")
    assert format_local_time("garbage") == "garbage"


# -- table ---------------------------------------------------------------------


def test_table_upper_case_headers_and_alignment() -> None:
    text, notices = render(ROWS, "table")
    lines = text.splitlines()
    assert lines[0].split() == ["UUID", "STATUS", "EXIT_CODE", "ERROR", "OK"]
    assert lines[1] == "a1    SUCCESS          0         true"
    assert lines[2] == "b2    FAILED           2  boom   false"
    assert notices == []


def test_table_head_and_tail_ordering() -> None:
    rows = [{"z": 1, "error": "e", "uuid": "u", "a": 2}]
    text, _ = render(rows, "table", head=["uuid"], tail=["error"])
    assert text.splitlines()[0].split() == ["UUID", "Z", "A", "ERROR"]


def test_table_none_is_blank_and_booleans_lower_case() -> None:
    text, _ = render([{"a": None, "b": True, "c": False}], "table")
    assert text.splitlines()[1].split() == ["true", "false"]


def test_table_skips_nested_columns_unless_named() -> None:
    rows = [{"uuid": "u", "result": {"x": 1}, "tags": ["a"]}]
    assert render(rows, "table")[0].splitlines()[0].split() == ["UUID"]
    assert render(rows, "table", tail=["result"])[0].splitlines()[0].split() == ["UUID", "RESULT"]


def test_table_converts_durations_modes_and_times() -> None:
    text, _ = render(
        [{"duration": 184, "mode": 0o100755, "created_at": "2020-05-06T07:08:09Z"}], "table"
    )
    row = text.splitlines()[1]
    expected_time = (
        datetime(2020, 5, 6, 7, 8, 9, tzinfo=UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    )
    assert row.split()[0] == "3m4s"  # numbers are right-aligned
    assert "0755" in row and expected_time in row


def test_table_flattens_multiline_and_strips_escapes_in_cells() -> None:
    text, _ = render([{"title": "line1\nline2\t\x1b[31mred\x1b[0m"}], "table")
    assert text.splitlines()[1] == "line1 line2 red"


def test_table_fits_width_40_with_cjk_and_hides_later_columns() -> None:
    rows = [
        {
            "uuid": "0123456789abcdef0123456789abcdef",
            "title": "日本語のタイトルです長い長い説明",
            "kind": "run",
            "created_at": "2020-01-01T00:00:00Z",
            "extra": "x" * 30,
            "error": "",
        }
    ]
    text, notices = render(rows, "table", head=["uuid"], tail=["error"], tty=True, width=40)
    lines = text.splitlines()
    assert all(display_width(line) <= 40 for line in lines), lines
    header = lines[0].split()
    assert header[0] == "UUID" and header[-1] == "ERROR"
    assert "EXTRA" not in header and "CREATED_AT" not in header
    assert notices[0].startswith("Hid ") and notices[0].endswith(
        " to fit terminal; use --format json to see everything"
    )
    assert "extra" in notices[0] and "created_at" in notices[0]
    # CJK cells are cut by display width, not by code points
    assert "…" in lines[1]
    assert "Output truncated to fit terminal; use --format json to see full values" in notices


def test_table_does_not_fit_when_not_a_tty() -> None:
    rows = [{"a": "x" * 100, "b": "y" * 100}]
    text, notices = render(rows, "table", tty=False, width=40)
    assert "x" * 100 in text and "y" * 100 in text and notices == []


def test_table_wide_chars_are_padded_by_display_width() -> None:
    text, _ = render([{"name": "日本", "n": 1}, {"name": "abcd", "n": 2}], "table")
    lines = text.splitlines()
    assert display_width(lines[1]) == display_width(lines[2])


def test_table_colours_headers_and_status_only_when_asked() -> None:
    plain, _ = render(ROWS, "table", tty=True, width=200, color=False)
    assert "\x1b[" not in plain
    coloured, _ = render(ROWS, "table", tty=True, width=200, color=True)
    assert "\x1b[32mSUCCESS\x1b[0m" in coloured and "\x1b[31mFAILED\x1b[0m" in coloured
    assert strip_ansi(coloured).splitlines()[0] == plain.splitlines()[0]


def test_table_layout_fixed_at_first_flush() -> None:
    f = get_formatter("table", tty=True, width=30)
    f.add([{"a": "short", "b": "x"}])
    first = f.flush()
    f.add([{"a": "a much longer value than before", "b": "y", "c": "new"}])
    second = f.flush()
    assert first.splitlines()[0].split() == ["A", "B"]
    assert len(second.splitlines()) == 1  # no second header, no new column
    assert second.startswith("a…") or second.startswith("a ")
    assert display_width(second.splitlines()[0]) <= 30


def test_fit_columns_keeps_required_and_tail() -> None:
    cols, widths, hidden = fit_columns(
        ["id", "a", "b", "err"], [30, 30, 30, 10], 25, required=["id"], tail=["err"]
    )
    assert cols == ["id", "err"] and hidden == ["a", "b"]
    assert sum(widths) + 2 * (len(widths) - 1) <= 25
    assert widths[1] == 10  # tail shrinks last


def test_fit_columns_prefers_shrinking_to_hiding_when_columns_fit_comfortably() -> None:
    cols, widths, hidden = fit_columns(["id", "a", "b"], [30, 30, 30], 40, required=["id"])
    assert cols == ["id", "a", "b"] and hidden == []
    assert sum(widths) + 4 == 40


def test_fit_columns_shrinks_everything_when_needed() -> None:
    cols, widths, hidden = fit_columns(["a", "b"], [50, 50], 10, required=["a", "b"])
    assert cols == ["a", "b"] and hidden == []
    assert sum(widths) + 2 <= 10


def test_empty_rows_render_nothing() -> None:
    assert render([], "table") == ("", [])
    assert render([], "csv") == ("", [])
    assert render([], "json") == ("", [])
    assert render([], "json-pretty") == ("[]\n", [])


def test_unknown_format_names_the_choices() -> None:
    with pytest.raises(UnknownFormat, match=r"Unknown format 'xml'\. Available: default, table"):
        get_formatter("xml")


# -- csv / tsv -----------------------------------------------------------------


def test_csv_quoting_and_nested_values_as_json() -> None:
    rows = [
        {"name": 'say "hi"', "note": "a,b", "multi": "l1\nl2", "nested": {"k": [1, 2]}, "n": None},
        {"name": "plain", "note": "", "multi": "", "nested": [], "n": 3},
    ]
    text, _ = render(rows, "csv")
    assert text.splitlines()[0] == "name,note,multi,nested,n"
    parsed = list(csv.reader(io.StringIO(text)))
    assert parsed[1] == ['say "hi"', "a,b", "l1\nl2", '{"k":[1,2]}', ""]
    assert parsed[2] == ["plain", "", "", "[]", "3"]
    assert '"say ""hi"""' in text


def test_csv_header_is_printed_once_across_flushes() -> None:
    f = get_formatter("csv")
    f.add([{"a": 1}])
    out = f.flush()
    f.add([{"a": 2}])
    out += f.close()
    assert out == "a\n1\n2\n"


def test_tsv_uses_tabs_and_quotes_tabs() -> None:
    text, _ = render([{"a": "x\ty", "b": True}], "tsv")
    assert text.splitlines()[0] == "a\tb"
    assert list(csv.reader(io.StringIO(text), delimiter="\t"))[1] == ["x\ty", "true"]


# -- json ----------------------------------------------------------------------


def test_json_is_jsonl_with_nested_values_kept() -> None:
    rows = [{"a": 1, "n": {"x": [1]}, "none": None, "mode": 0o644, "ts": "2020-01-01T00:00:00Z"}]
    text, _ = render(rows * 2, "json")
    lines = text.splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0]) == {
        "a": 1,
        "n": {"x": [1]},
        "none": None,
        "mode": "0644",
        "ts": "2020-01-01T00:00:00Z",
    }


def test_json_pretty_is_one_array_across_flushes() -> None:
    f = get_formatter("json-pretty")
    f.add([{"a": 1}])
    out = f.flush()
    f.add([{"a": 2}, {"a": "日本"}])
    out += f.flush()
    out += f.close()
    assert json.loads(out) == [{"a": 1}, {"a": 2}, {"a": "日本"}]
    assert "日本" in out


# -- plain ---------------------------------------------------------------------


def test_plain_blocks_with_indented_multiline_values() -> None:
    text, _ = render(
        [{"uuid": "u1", "stdout": "a\nb\n", "ok": True}, {"uuid": "u2", "error": None}], "plain"
    )
    assert text == "uuid: u1\nstdout: a\n  b\nok: true\n---\nuuid: u2\nerror:\n"


# -- Output writer --------------------------------------------------------------


def make_output(**kw: object) -> tuple[Output, io.BytesIO, io.BytesIO]:
    out, err = io.BytesIO(), io.BytesIO()
    kw.setdefault("env", {})
    return Output(out, err, **kw), out, err  # type: ignore[arg-type]


def test_error_warn_info_notice_go_to_stderr() -> None:
    o, out, err = make_output(stderr_tty=False)
    o.error("Branch 'x' does not exist")
    o.warn("careful")
    o.info("Set A=1")
    o.notice("Hid a to fit terminal")
    assert out.getvalue() == b""
    assert err.getvalue().decode().splitlines() == [
        "[ERROR] Branch 'x' does not exist",
        "[WARNING] careful",
        "Set A=1",
        "Hid a to fit terminal",
    ]


def test_error_tag_is_red_on_a_tty_or_with_force_color() -> None:
    o, _, err = make_output(stderr_tty=True, env={"TERM": "xterm"})
    o.error("bad")
    assert err.getvalue().startswith(b"\x1b[31;1m[ERROR]\x1b[0m bad")
    o, _, err = make_output(stderr_tty=False, env={"FORCE_COLOR": "1"})
    o.error("bad")
    assert b"\x1b[" in err.getvalue()
    o, _, err = make_output(stderr_tty=True, env={"NO_COLOR": "1", "FORCE_COLOR": "1"})
    o.error("bad")
    assert err.getvalue() == b"[ERROR] bad\n"


def test_color_policy() -> None:
    assert color_enabled(True, {"TERM": "xterm"}) is True
    assert color_enabled(True, {"TERM": "dumb"}) is False
    assert color_enabled(False, {}) is False
    assert color_enabled(False, {"FORCE_COLOR": "1"}) is True
    assert color_enabled(False, {"FORCE_COLOR": "0"}) is False
    assert color_enabled(True, {"NO_COLOR": "1"}) is False


def test_emit_writes_rows_and_notices(monkeypatch: pytest.MonkeyPatch) -> None:
    o, out, err = make_output(stdout_tty=True, stderr_tty=False, size=(20, 24))
    o.emit([{"id": "x" * 10, "more": "y" * 10, "error": ""}], "table", head=["id"], tail=["error"])
    assert strip_ansi(out.getvalue().decode()).splitlines()[0].split() == ["ID", "ERROR"]
    assert b"Hid more to fit terminal" in err.getvalue()


def test_row_stream_closes_json_pretty_array() -> None:
    o, out, _ = make_output()
    with o.stream("json-pretty") as s:
        s.write([{"a": 1}])
        s.write([{"a": 2}])
    assert json.loads(out.getvalue()) == [{"a": 1}, {"a": 2}]


def test_write_stdout_broken_pipe_raises_clean_exit_141() -> None:
    class Closed(io.BytesIO):
        def write(self, data: bytes) -> int:  # type: ignore[override]
            raise BrokenPipeError

    o = Output(Closed(), io.BytesIO(), env={})
    with pytest.raises(StdoutClosed) as info:
        o.line("x")
    assert info.value.code == EXIT_BROKEN_PIPE == 141


def test_broken_pipe_in_a_real_pipeline_exits_quietly(tmp_path: Path) -> None:
    script = (
        "from contree_shell.output import line\n"
        "try:\n"
        "    for i in range(200000): line(f'row {i}')\n"
        "except SystemExit as e:\n"
        "    raise SystemExit(e.code)\n"
    )
    proc = subprocess.run(
        f'{sys.executable} -c "{script}" | head -n 1',
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        executable="/bin/bash",
    )
    assert proc.stdout == "row 0\n"
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_stderr_broken_pipe_is_ignored() -> None:
    class Closed(io.BytesIO):
        def write(self, data: bytes) -> int:  # type: ignore[override]
            raise BrokenPipeError

    Output(io.BytesIO(), Closed(), env={}).error("x")  # no exception


# -- text width ----------------------------------------------------------------


def test_display_width_counts_wide_chars_and_ignores_ansi() -> None:
    assert display_width("abc") == 3
    assert display_width("日本") == 4
    assert display_width("\x1b[1;31mred\x1b[0m") == 3
    assert display_width("e\u0301") == 1  # combining accent


def test_truncate_by_cells() -> None:
    assert truncate("hello", 10) == "hello"
    assert truncate("hello world", 6) == "hello…"
    assert truncate("日本語テキスト", 6) == "日本…"
    assert display_width(truncate("日本語テキスト", 5)) <= 5


# -- pager ---------------------------------------------------------------------


def test_needs_paging_only_when_taller_or_wider() -> None:
    assert needs_paging("a\n" * 5, rows=24, columns=80) is False
    assert needs_paging("a\n" * 30, rows=24, columns=80) is True
    assert needs_paging("x" * 81 + "\n", rows=24, columns=80) is True
    assert needs_paging("日" * 40 + "\n", rows=24, columns=80) is False
    assert needs_paging("日" * 41 + "\n", rows=24, columns=80) is True


def test_pager_command_and_env() -> None:
    assert pager_command({}) == ["less"]
    assert pager_command({"PAGER": "more -s"}) == ["more", "-s"]
    assert pager_command({"PAGER": ""}) is None
    assert pager_command({"CONTREE_PAGER": "off", "PAGER": "less"}) is None
    assert pager_command({"CONTREE_PAGER": "most"}) == ["most"]
    assert pager_env({})["LESS"] == "-RXF"
    assert pager_env({"LESS": "-S"})["LESS"] == "-S"


def test_page_if_needed_runs_the_pager_for_long_output(tmp_path: Path) -> None:
    marker = tmp_path / "paged.txt"
    pager = tmp_path / "fakepager"
    pager.write_text(f"#!/bin/sh\n{{ echo BEGIN; cat; echo END; echo LESS=$LESS; }} > {marker}\n")
    pager.chmod(0o755)
    o, out, _ = make_output(stdout_tty=True, size=(80, 10), env={"PAGER": str(pager)})
    o.page_if_needed("short\n")
    assert out.getvalue() == b"short\n" and not marker.exists()
    long_text = "".join(f"line {i}\n" for i in range(50))
    o.page_if_needed(long_text)
    assert marker.read_text() == "BEGIN\n" + long_text + "END\nLESS=-RXF\n"
    assert out.getvalue() == b"short\n"


def test_page_if_needed_respects_disable_and_non_tty(tmp_path: Path) -> None:
    long_text = "x\n" * 100
    o, out, _ = make_output(stdout_tty=False, size=(80, 10), env={"PAGER": "false"})
    o.page_if_needed(long_text)
    assert out.getvalue() == long_text.encode()
    o, out, _ = make_output(stdout_tty=True, size=(80, 10), env={"PAGER": "false"}, pager=False)
    o.page_if_needed(long_text)
    assert out.getvalue() == long_text.encode()
    o, out, _ = make_output(stdout_tty=True, size=(80, 10), env={"PAGER": "/nonexistent/pager"})
    o.page_if_needed(long_text)
    assert out.getvalue() == long_text.encode()  # falls back to writing


def test_text_only_streams_receive_decoded_text() -> None:
    out, err = io.StringIO(), io.StringIO()
    o = Output(out, err, env={})
    o.line("日本")
    o.error("x")
    assert out.getvalue() == "日本\n" and err.getvalue() == "[ERROR] x\n"
