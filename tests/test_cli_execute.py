"""`execute` (the shell's `contree …` lines) and `main`: errors become one line and a status.

These run in-process on a temporary state DB; none of them needs a server.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from contree_shell.cli import main as cli_main
from contree_shell.cli.context import Context
from contree_shell.cli.main import execute, main, make_context


@pytest.fixture
def ctx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Context:
    monkeypatch.setenv("CONTREE_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("CONTREE_SERVER_HOME", str(tmp_path / "server"))
    monkeypatch.setenv("CONTREE_SESSION", "unit-session")
    monkeypatch.delenv("CONTREE_PROFILE", raising=False)
    monkeypatch.delenv("CONTREE_SESSION_DB", raising=False)
    return make_context(in_shell=True)


def test_context_defaults_to_the_local_profile_and_the_env_session(ctx: Context) -> None:
    assert ctx.profile.name == "local"
    assert ctx.session_key == "unit-session"
    assert ctx.output_format == "default"


def test_help_inside_the_shell_prints_and_returns_0(
    ctx: Context, capsys: pytest.CaptureFixture[str]
) -> None:
    assert execute(ctx, ["session", "--help"]) == 0
    assert "usage: contree session" in capsys.readouterr().out


def test_usage_error_inside_the_shell_returns_2(ctx: Context, capsys: pytest.CaptureFixture[str]) -> None:
    assert execute(ctx, ["no-such-command"]) == 2
    err = capsys.readouterr().err
    assert "usage: contree" in err and "error: argument COMMAND: invalid choice" in err


def test_shell_inside_the_shell_is_refused(ctx: Context, capsys: pytest.CaptureFixture[str]) -> None:
    assert execute(ctx, ["shell"]) == 1
    assert capsys.readouterr().err == "[ERROR] 'contree shell' cannot be run from within the shell.\n"


def test_no_session_is_one_line(ctx: Context, capsys: pytest.CaptureFixture[str]) -> None:
    assert execute(ctx, ["session"]) == 1
    assert capsys.readouterr().err == (
        "[ERROR] No active session. Run `contree use IMAGE` to start one.\n"
    )


def test_format_flag_applies_to_one_command_only(ctx: Context, capsys: pytest.CaptureFixture[str]) -> None:
    assert execute(ctx, ["env", "GREETING=hi"]) == 0
    assert "Set GREETING=hi" in capsys.readouterr().err
    assert execute(ctx, ["-o", "json", "env"]) == 0
    assert capsys.readouterr().out == '{"key": "GREETING", "value": "hi"}\n'
    assert ctx.output_format == "default"
    assert execute(ctx, ["env", "-U", "GREETING"]) == 0
    assert execute(ctx, ["env", "broken"]) == 1
    assert "Invalid format 'broken', expected KEY=VALUE" in capsys.readouterr().err


def test_internal_error_is_one_line_without_traceback(
    ctx: Context, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(self: Context) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(Context, "require_state", boom)
    assert execute(ctx, ["session"]) == 1
    err = capsys.readouterr().err
    assert err == "[ERROR] internal error: boom (run with --debug for details)\n"
    assert execute(ctx, ["--debug", "session"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith(
        "[ERROR] internal error: boom (run with --debug for details)\n"
    )


def test_ctrl_c_in_a_command_is_130(
    ctx: Context, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(self: Context) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Context, "require_state", interrupted)
    assert execute(ctx, ["session"]) == 130
    assert capsys.readouterr().err == "[ERROR] User interrupted\n"


def test_main_without_arguments_prints_help(ctx: Context, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert capsys.readouterr().out.startswith("usage: contree")


def test_main_version(ctx: Context, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-v"]) == 0
    assert capsys.readouterr().out.startswith("contree-shell/")


def test_unknown_profile_is_one_line(ctx: Context, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-p", "nowhere", "session"]) == 1
    assert capsys.readouterr().err == (
        "[ERROR] Profile 'nowhere' does not exist. Run `contree auth` first.\n"
    )


def test_use_new_without_image_is_refused(ctx: Context, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["use", "-N"]) == 1
    assert capsys.readouterr().err == "[ERROR] --new requires an IMAGE argument.\n"


def test_session_branch_commands_need_a_session(ctx: Context, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["session", "branch"], ["session", "checkout", "x"], ["session", "rollback", "-3"]):
        assert main(argv) == 1
        assert "No active session" in capsys.readouterr().err


def test_local_state_round_trip_without_a_server(
    ctx: Context, capsys: pytest.CaptureFixture[str]
) -> None:
    # Seed the session directly (no server): two `run`-like nodes on main.
    store = ctx.store
    store.append(ctx.session_key, kind="use", image="img-1", title="tag:base")
    store.append(ctx.session_key, kind="run", image="img-2", title="make", operation_uuid="op-2")
    assert execute(ctx, ["session", "branch", "side"]) == 0
    assert execute(ctx, ["session", "checkout", "side"]) == 0
    assert execute(ctx, ["-o", "json", "session", "rollback", "-1"]) == 0
    out = capsys.readouterr().out
    assert '"image": "img-1"' in out
    assert ctx.store.state(ctx.session_key).branch == "side"  # type: ignore[union-attr]
    assert execute(ctx, ["session", "checkout", "main"]) == 0
    assert ctx.current_image() == "img-2"
    assert execute(ctx, ["session", "branch", "-U", "main"]) == 1
    assert "Cannot delete the active branch" in capsys.readouterr().err
    assert execute(ctx, ["session", "branch", "-U", "side"]) == 0
    assert execute(ctx, ["-o", "json", "session", "show", "-a"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert len(shown) == 2 and '"branches": "main"' in shown[1]
    assert execute(ctx, ["session", "delete", "-f", ctx.session_key]) == 0
    assert ctx.state() is None


def test_module_exports_the_shell_api() -> None:
    for name in ("build_parser", "execute", "main", "make_context", "Context", "CliHelp", "CliUsageError"):
        assert hasattr(cli_main, name)


def test_unstartable_server_is_one_line_with_the_reason(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONTREE_", "XDG_"))}
    env.update(
        CONTREE_HOME=str(tmp_path / "config"),
        CONTREE_SERVER_HOME=str(blocker / "server"),  # cannot be created
        CONTREE_SESSION="unit-unstartable",
        PYTHONPATH=str(Path(__file__).resolve().parent.parent),
    )
    result = subprocess.run(
        [sys.executable, "-m", "contree_shell", "use", "busybox"],
        env=env, capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1
    err = result.stderr.decode()
    assert err.startswith("[ERROR] ") and err.count("\n") == 1, err
    assert "server" in err and "Traceback" not in err
