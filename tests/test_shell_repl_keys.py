"""Keys at the shell prompt, driven through prompt_toolkit's pipe input (no terminal).

The Repl is the real one (real Context, real SQLite state in a temp dir); nothing here
needs the server, because no line typed here reaches the sandbox.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prompt_toolkit.application import create_app_session
from prompt_toolkit.formatted_text import to_plain_text
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.input.base import PipeInput
from prompt_toolkit.output import DummyOutput

from contree_shell.shell.context import ShellContext
from contree_shell.shell.repl import Repl
from contree_shell.shell.router import split_commands
from contree_shell.shell.status import take_snapshot

ENTER = "\r"
CTRL_C = "\x03"
CTRL_D = "\x04"


@pytest.fixture
def shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ShellContext:
    monkeypatch.setenv("CONTREE_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("CONTREE_SESSION_DB", str(tmp_path / "state.db"))
    monkeypatch.setenv("CONTREE_SESSION", "keys-test")
    monkeypatch.delenv("CONTREE_PROFILE", raising=False)
    from contree_shell.cli.main import make_context
    from contree_shell.state.history import ShellHistory

    ctx = make_context(in_shell=True)
    sh = ShellContext(ctx)
    sh.history = ShellHistory(tmp_path / "state.db", ctx.session_key)
    return sh


@pytest.fixture
def pipe() -> Iterator[PipeInput]:
    with create_pipe_input() as inp, create_app_session(input=inp, output=DummyOutput()):
        yield inp


def test_ctrl_c_clears_the_line_and_keeps_prompting(shell: ShellContext, pipe: PipeInput) -> None:
    repl = Repl(shell)
    pipe.send_text("echo abc" + CTRL_C + "pwd" + ENTER)
    assert repl.read() == "pwd"


def test_open_quote_continues_and_keeps_the_newline(shell: ShellContext, pipe: PipeInput) -> None:
    repl = Repl(shell)
    pipe.send_text("echo 'a" + ENTER + "b'" + ENTER)
    text = repl.read()
    assert text == "echo 'a\nb'"
    assert split_commands(text) == ["echo 'a\nb'"]


def test_trailing_backslash_continues_and_joins(shell: ShellContext, pipe: PipeInput) -> None:
    repl = Repl(shell)
    pipe.send_text("echo one \\" + ENTER + "two" + ENTER)
    text = repl.read()
    assert text == "echo one \\\ntwo"
    assert split_commands(text) == ["echo one two"]


def test_ctrl_c_on_a_continuation_line_cancels_the_whole_command(
    shell: ShellContext, pipe: PipeInput
) -> None:
    repl = Repl(shell)
    pipe.send_text("echo 'a" + ENTER + "more" + CTRL_C + "pwd" + ENTER)
    assert repl.read() == "pwd"


def test_ctrl_d_on_an_empty_line_exits(shell: ShellContext, pipe: PipeInput) -> None:
    repl = Repl(shell)
    pipe.send_text(CTRL_D)
    with pytest.raises(EOFError):
        repl.read()


def test_a_continued_command_is_one_history_entry(shell: ShellContext, pipe: PipeInput) -> None:
    repl = Repl(shell)
    pipe.send_text("echo 'a" + ENTER + "b'" + ENTER)
    repl.read()
    assert shell.history.lines() == ["echo 'a\nb'"]


def test_history_is_written_as_each_line_is_accepted(
    shell: ShellContext, pipe: PipeInput, capsys: pytest.CaptureFixture[str]
) -> None:
    repl = Repl(shell)
    pipe.send_text("pwd" + ENTER + "history" + ENTER + "exit" + ENTER)
    assert repl.run() == 0
    out = capsys.readouterr().out
    assert "/\n" in out
    assert "    1  pwd\n    2  history\n" in out


def test_exit_leaves_the_loop_and_later_lines_do_not_run(
    shell: ShellContext, pipe: PipeInput, capsys: pytest.CaptureFixture[str]
) -> None:
    repl = Repl(shell)
    pipe.send_text("quit" + ENTER + "pwd" + ENTER)
    assert repl.run() == 0
    assert capsys.readouterr().out == ""


def test_errors_stay_in_the_loop_as_one_line(
    shell: ShellContext, pipe: PipeInput, capsys: pytest.CaptureFixture[str]
) -> None:
    repl = Repl(shell)
    pipe.send_text("contree shell" + ENTER + "cd a b" + ENTER + "pwd" + ENTER + CTRL_D)
    repl.run()
    captured = capsys.readouterr()
    assert "Error: 'contree shell' cannot be run from within the shell." in captured.err
    assert "cd: too many arguments" in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == "/\n"


def test_prompt_shows_branch_cwd_and_a_failed_status(shell: ShellContext) -> None:
    from contree_shell.shell.prompt import prompt_message

    assert to_plain_text(prompt_message(take_snapshot(shell))) == "(main) / $ "
    shell.last.status = 1
    assert to_plain_text(prompt_message(take_snapshot(shell))) == "[1] (main) / $ "



def test_toolbar_is_hidden_on_an_idle_prompt_by_default(
    shell: ShellContext, pipe: PipeInput
) -> None:
    from contree_shell.shell.settings import ShellSettings

    assert Repl(shell, settings=ShellSettings(toolbar="typing")).session.bottom_toolbar is None
    assert Repl(shell, settings=ShellSettings(toolbar="always")).session.bottom_toolbar is not None


def test_a_pasted_block_is_one_entry_and_runs_line_by_line(
    shell: ShellContext, pipe: PipeInput
) -> None:
    repl = Repl(shell)
    pipe.send_text("\x1b[200~cd /tmp\necho 'a\nb'\npwd\x1b[201~" + ENTER)
    text = repl.read()
    assert text == "cd /tmp\necho 'a\nb'\npwd"
    assert split_commands(text) == ["cd /tmp", "echo 'a\nb'", "pwd"]


def test_a_line_with_a_credential_is_not_persisted(shell: ShellContext, pipe: PipeInput) -> None:
    repl = Repl(shell)
    pipe.send_text("export API_TOKEN=abc" + ENTER)
    repl.read()
    pipe.send_text("pwd" + ENTER)
    repl.read()
    assert shell.history.lines() == ["pwd"]


F4 = "\x1bOS"


def test_f4_toggles_between_emacs_and_vi_editing(shell: ShellContext, pipe: PipeInput) -> None:
    from prompt_toolkit.enums import EditingMode

    repl = Repl(shell)
    modes: list[EditingMode] = []
    pipe.send_text(F4 + "pwd" + ENTER)
    repl.read()
    modes.append(repl.session.app.editing_mode)
    pipe.send_text(F4 + "pwd" + ENTER)
    repl.read()
    modes.append(repl.session.app.editing_mode)
    assert modes == [EditingMode.VI, EditingMode.EMACS]


def test_remapped_toggle_key_from_settings(shell: ShellContext, pipe: PipeInput) -> None:
    from prompt_toolkit.enums import EditingMode

    from contree_shell.shell.settings import ShellSettings

    settings = ShellSettings(keys={"toggle_editing_mode": ("c-t",)})
    repl = Repl(shell, settings=settings)
    pipe.send_text("\x14" + "pwd" + ENTER)
    repl.read()
    assert repl.session.app.editing_mode == EditingMode.VI


def test_ctrl_x_ctrl_e_opens_the_line_in_the_editor(
    shell: ShellContext, pipe: PipeInput, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    editor = tmp_path / "editor.sh"
    editor.write_text("#!/bin/sh\nprintf 'echo from-editor' > \"$1\"\n")
    editor.chmod(0o755)
    monkeypatch.setenv("VISUAL", str(editor))
    repl = Repl(shell)
    pipe.send_text("echo typed" + "\x18\x05")
    # The edited line comes back for review; Enter runs it.
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(repl.read()))
    reader.start()
    deadline = time.monotonic() + 10
    while repl.session.default_buffer.text != "echo from-editor":
        assert time.monotonic() < deadline, repl.session.default_buffer.text
        time.sleep(0.01)  # the editor is another process: nothing to await here
    pipe.send_text(ENTER)
    reader.join(10)
    assert result == ["echo from-editor"]


def test_a_paste_ending_in_a_newline_runs_without_enter(
    shell: ShellContext, pipe: PipeInput
) -> None:
    repl = Repl(shell)
    pipe.send_text("\x1b[200~pwd\ncd /tmp\n\x1b[201~")
    assert repl.read() == "pwd\ncd /tmp"


def test_a_pasted_block_stops_at_the_first_failure(
    shell: ShellContext, pipe: PipeInput, capsys: pytest.CaptureFixture[str]
) -> None:
    repl = Repl(shell)
    pipe.send_text("\x1b[200~pwd\ncd /nonexistent-dir\npwd\n\x1b[201~" + "exit" + ENTER)
    repl.run()
    captured = capsys.readouterr()
    assert captured.out == "/\n"
    assert captured.err.count("stopped at line 2: exit status 1") == 1


def test_output_format_builtin(shell: ShellContext, pipe: PipeInput,
                               capsys: pytest.CaptureFixture[str]) -> None:
    repl = Repl(shell)
    pipe.send_text("-o csv" + ENTER + "--format" + ENTER + "-o bad" + ENTER + "exit" + ENTER)
    repl.run()
    captured = capsys.readouterr()
    assert captured.out == "csv\n"
    assert "Unknown format 'bad'. Available: default, table" in captured.err
    assert shell.ctx.output_format == "csv"


def test_history_skips_repeats_and_lines_starting_with_a_space(
    shell: ShellContext, pipe: PipeInput
) -> None:
    repl = Repl(shell)
    for line in ("pwd", "pwd", " echo private", "history"):
        pipe.send_text(line + ENTER)
        repl.read()
    assert shell.history.lines() == ["pwd", "history"]


def test_lines_a_finished_command_never_received_reach_the_next_prompt(
    shell: ShellContext, pipe: PipeInput
) -> None:
    from contree_shell.shell.repl import feed_type_ahead

    repl = Repl(shell)
    feed_type_ahead(repl.session.input, b"pwd\n")
    assert repl.read() == "pwd"
