"""Prompt, toolbar and fresh-line behaviour of the shell (pure parts, no terminal)."""

from __future__ import annotations

import io

from prompt_toolkit.formatted_text import to_plain_text

from contree_shell.output import get_output, set_output
from contree_shell.shell.fresh_line import LineTrackingOutput, ensure_fresh_line
from contree_shell.shell.prompt import prompt_message
from contree_shell.shell.status import Snapshot
from contree_shell.shell.toolbar import format_duration, toolbar_tokens, toolbar_visible


def snap(**changes: object) -> Snapshot:
    base = dict(key="proj+1234abcd", branch="main", image="0f" * 16, depth=3, cwd="/work",
                status=0, duration=1.5, ran=True)
    base.update(changes)
    return Snapshot(**base)  # type: ignore[arg-type]


def test_prompt_is_branch_cwd_dollar() -> None:
    assert to_plain_text(prompt_message(snap())) == "(main) /work $ "


def test_prompt_shows_a_non_zero_status_first() -> None:
    assert to_plain_text(prompt_message(snap(status=130))) == "[130] (main) /work $ "


def test_toolbar_shows_session_branch_image_depth_cwd_and_last_status() -> None:
    text = to_plain_text(toolbar_tokens(snap(status=2, duration=0.25), "debian:bookworm"))
    for part in ("proj+1234abcd", "main", "depth 3", "debian:bookworm", "/work", "✗ 2",
                 "0.25s"):
        assert part in text


def test_toolbar_has_no_status_before_the_first_command() -> None:
    text = to_plain_text(toolbar_tokens(snap(ran=False), "busybox"))
    assert "✓" not in text and "✗" not in text


def test_format_duration() -> None:
    assert format_duration(0.123) == "0.12s"
    assert format_duration(3.44) == "3.4s"
    assert format_duration(42) == "42s"
    assert format_duration(125) == "2m05s"
    assert format_duration(3720) == "1h02m"


def test_fresh_line_after_output_without_a_newline() -> None:
    out, err = io.StringIO(), io.StringIO()
    previous = set_output(LineTrackingOutput(out, err))
    try:
        get_output().write_stdout(b"abc")
        ensure_fresh_line()
        assert err.getvalue() == "\n"
        get_output().write_stdout(b"done\n")
        ensure_fresh_line()
        assert err.getvalue() == "\n"
    finally:
        set_output(previous)


def test_toolbar_visibility_modes() -> None:
    assert toolbar_visible("always", "", False)
    assert not toolbar_visible("typing", "", False)
    assert toolbar_visible("typing", "ec", False)
    assert toolbar_visible("typing", "", True)
    assert not toolbar_visible("off", "ec", True)


def test_toolbar_says_when_completions_are_refreshing_and_when_vi_is_on() -> None:
    text = to_plain_text(toolbar_tokens(snap(), "busybox", refreshing=True, vi=True))
    assert "refreshing completions…" in text and "│  vi" in text
    assert "refreshing" not in to_plain_text(toolbar_tokens(snap(), "busybox"))
