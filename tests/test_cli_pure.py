"""Pure parts of the CLI: --since/--until parsing, --file specs, history references."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from contree_shell.cli.errors import CliError
from contree_shell.cli.filespec import FileSpecError, excluded, expand, parse_spec
from contree_shell.cli.intervals import IntervalError, parse_interval, to_query
from contree_shell.cli.operations import parse_status

NOW = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "delta"),
    [("600s", 600), ("15m", 900), ("2h", 7200), ("3d", 3 * 86400), ("1w", 7 * 86400),
     ("1W", 7 * 86400)],
)
def test_relative_intervals_count_back_from_now(text: str, delta: int) -> None:
    assert parse_interval(text, now=NOW) == NOW - timedelta(seconds=delta)


def test_a_bare_number_is_unix_seconds_never_a_year() -> None:
    assert parse_interval("3600", now=NOW) == datetime(1970, 1, 1, 1, 0, tzinfo=UTC)
    assert parse_interval("12345", now=NOW) == datetime.fromtimestamp(12345, UTC)
    assert parse_interval("1700000000", now=NOW).year == 2023


def test_iso_dates_and_datetimes() -> None:
    assert parse_interval("2024-05-01T10:00:00Z") == datetime(2024, 5, 1, 10, tzinfo=UTC)
    assert parse_interval("2024-05-01T12:00:00+02:00") == datetime(2024, 5, 1, 10, tzinfo=UTC)
    assert parse_interval("2024-05-01").date() in (
        datetime(2024, 4, 30).date(), datetime(2024, 5, 1).date())  # local midnight


@pytest.mark.parametrize("text", ["1x", "5min", "1y", "", "abc", "15 m", "2024/05/01", "-5m"])
def test_unknown_units_and_garbage_are_rejected(text: str) -> None:
    with pytest.raises(IntervalError) as info:
        parse_interval(text, now=NOW)
    assert "600s, 15m, 2h, 3d, 1w" in info.value.message


def test_to_query_is_iso_utc() -> None:
    assert to_query("1h", now=NOW) == "2026-05-01T11:00:00Z"
    assert to_query(None) is None


@pytest.mark.parametrize(("text", "status"), [
    ("E", "EXECUTING"), ("s", "SUCCESS"), ("failed", "FAILED"), ("C", "CANCELLED"),
    ("P", "PENDING"), ("A", "ASSIGNED")])
def test_status_letters_and_names(text: str, status: str) -> None:
    assert parse_status(text) == status


def test_bad_status_is_a_usage_error() -> None:
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        parse_status("X")


# -- --file specs ----------------------------------------------------------------------


def test_file_spec_tags_in_any_order() -> None:
    spec = parse_spec("app.py:m755:/srv/app.py:u1000:g0")
    assert (spec.host, spec.instance_path, spec.uid, spec.gid, spec.mode) == (
        "app.py", "/srv/app.py", 1000, 0, 0o755)
    assert parse_spec("x").instance_path is None


def test_file_spec_named_owner_resolves_locally() -> None:
    assert parse_spec("x:uroot:groot").uid == 0


@pytest.mark.parametrize("spec", ["x:m9z", "x:q1", ":/a", "x:/a:/b", "x:unosuchuser_zz"])
def test_bad_file_specs_are_errors_not_zero(spec: str) -> None:
    with pytest.raises(FileSpecError):
        parse_spec(spec)


def test_excludes_match_whole_path_or_any_component() -> None:
    patterns = [".*", "node_modules", "build/out*"]
    assert excluded("a/node_modules/b.js", patterns)
    assert excluded(".git/config", patterns)
    assert excluded("build/output.txt", patterns)
    assert not excluded("src/main.py", patterns)


def test_directory_specs_walk_with_default_excludes(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("a")
    (tmp_path / "src" / "a.pyc").write_text("x")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "m.pyc").write_text("x")
    (tmp_path / ".env").write_text("secret")
    (tmp_path / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(tmp_path / "run.sh", 0o750)
    mapped = expand(parse_spec(f"{tmp_path}:/work"), cwd="/", excludes=["*.sh"])
    assert [m.instance_path for m in mapped] == ["/work/src/a.py"]
    mapped = expand(parse_spec(f"{tmp_path}:/work:m600"), cwd="/")
    assert {m.instance_path: m.mode for m in mapped} == {
        "/work/run.sh": 0o600, "/work/src/a.py": 0o600}
    one = expand(parse_spec(str(tmp_path / "run.sh")), cwd="/")
    assert one[0].mode == 0o750 and one[0].instance_path == str(tmp_path / "run.sh")
    assert one[0].payload("u")["mode"] == "0750"


def test_relative_host_path_lands_under_the_session_cwd(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("f.txt").write_text("x")
    assert expand(parse_spec("f.txt"), cwd="/app")[0].instance_path == "/app/f.txt"


def test_missing_host_path_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileSpecError, match="neither file nor directory"):
        expand(parse_spec(str(tmp_path / "nope")), cwd="/")


# -- history references ----------------------------------------------------------------


def _ctx(tmp_path: Path):  # a real store, no server
    from contree_shell.cli.context import Context
    from contree_shell.config import Profile
    from contree_shell.state.sessions import SessionStore

    ctx = Context(profile=Profile(name="t", url="unix:///none", type="jwt"), session_key="k")
    ctx.store = SessionStore(tmp_path / "s.db")
    return ctx


OP1 = "11111111-1111-4111-8111-111111111111"
OP2 = "22222222-2222-4222-8222-222222222222"


def test_refs_resolve_history_entries_to_operations(tmp_path: Path) -> None:
    from contree_shell.cli.refs import resolve_operation_refs

    ctx = _ctx(tmp_path)
    use = ctx.store.append("k", kind="use", image="img0", title="busybox")
    first = ctx.store.append("k", kind="run", image="img1", title="a", operation_uuid=OP1)
    ctx.store.append("k", kind="run", image="img2", title="b", operation_uuid=OP2)
    assert resolve_operation_refs(ctx, ["HEAD"]) == [OP2]
    assert resolve_operation_refs(ctx, ["@-1"]) == [OP1]
    assert resolve_operation_refs(ctx, ["HEAD~1"]) == [OP1]
    assert resolve_operation_refs(ctx, [f"@{first.id}"]) == [OP1]
    assert resolve_operation_refs(ctx, [f"{OP1.upper()} HEAD"]) == [OP1, OP2]
    with pytest.raises(CliError) as info:
        resolve_operation_refs(ctx, [f"@{use.id}", "@99", "bogus"])
    msg = info.value.message
    assert msg.startswith("Invalid operation references: ")
    assert f"History entry {use.id} has no operation UUID" in msg
    assert "@99" in msg and "bogus" in msg
    with pytest.raises(CliError, match="non-zero"):
        resolve_operation_refs(ctx, ["@0"])


# -- shell -----------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "image"), [
    (["shell"], None), (["shell", "busybox:latest"], "busybox:latest"),
    (["shell", "--image", "tag:x"], "tag:x"), (["sh", "--image=tag:y"], "tag:y"),
])
def test_shell_passes_the_image_to_the_repl(
    argv: list[str], image: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import contree_shell.shell.repl as repl
    from contree_shell.cli.main import main

    monkeypatch.setenv("CONTREE_HOME", str(tmp_path))
    monkeypatch.setenv("CONTREE_SESSION", "shell-test")
    monkeypatch.delenv("CONTREE_PROFILE", raising=False)
    seen: list[object] = []

    def fake_repl(ctx: object, *, image: str | None = None) -> int:
        seen.append(image)
        return 0

    monkeypatch.setattr(repl, "main", fake_repl)
    assert main(argv) == 0
    assert seen == [image]


def test_shell_refuses_two_different_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from contree_shell.cli.main import main

    monkeypatch.setenv("CONTREE_HOME", str(tmp_path))
    assert main(["shell", "a", "--image", "b"]) == 2
