"""`contree shell` end to end against the real local server: script mode and completion.

Script mode (`contree shell < script`) is the non-interactive face of the same loop:
no prompts, every command in order, exit status of the last one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document

from tests.conftest import LocalServer


def shell(server: LocalServer, env: dict[str, str], script: str) -> tuple[int, str, str]:
    result = server.contree("shell", env=env, input=script.encode())
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def test_script_runs_lines_in_order_and_exits_with_the_last_status(
    server: LocalServer, session_env: dict[str, str]
) -> None:
    code, out, err = shell(server, session_env, "echo one\necho two | tr a-z A-Z\nfalse\n")
    assert out == "one\nTWO\n"
    assert code == 1
    assert "Traceback" not in err


def test_script_builtins_persist_the_cwd_in_the_session(
    server: LocalServer, session_env: dict[str, str]
) -> None:
    code, out, _ = shell(server, session_env, "mkdir -p /srv/app\ncd /srv/app\npwd\n"
                                              "echo hi > f\ncat f\ncd -\npwd\n")
    assert code == 0
    assert out == "/srv/app\nhi\n/\n/\n"


def test_script_continuation_and_quoted_newlines(
    server: LocalServer, session_env: dict[str, str]
) -> None:
    code, out, _ = shell(server, session_env, "echo one \\\n two\necho 'a\nb'\n")
    assert code == 0
    assert out == "one two\na\nb\n"


def test_script_errors_are_one_line_and_do_not_stop_the_script(
    server: LocalServer, session_env: dict[str, str]
) -> None:
    code, out, err = shell(server, session_env,
                           "cd /nonexistent\ncontree shell\ncontree nosuch\necho after\n")
    assert code == 0
    assert out.endswith("after\n")
    assert "cd: /nonexistent: no such directory" in err
    assert "Error: 'contree shell' cannot be run from within the shell." in err
    assert "Traceback" not in err


def test_script_exit_stops_and_timeout_runs_with_a_server_side_limit(
    server: LocalServer, session_env: dict[str, str]
) -> None:
    code, out, _ = shell(server, session_env, "timeout 1 sleep 30\necho before-exit\nexit\n"
                                              "echo never\n")
    assert "before-exit" in out and "never" not in out
    assert code == 0


def test_unterminated_quote_at_the_end_of_a_script_is_a_parse_error(
    server: LocalServer, session_env: dict[str, str]
) -> None:
    code, out, err = shell(server, session_env, "echo ok\necho 'open\n")
    assert out == "ok\n"
    assert code == 2
    assert "unterminated quote" in err


@pytest.fixture
def completer(server: LocalServer, session_env: dict[str, str],
              monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    for key, value in session_env.items():
        monkeypatch.setenv(key, value)
    from contree_shell.cli.context import session_db_path
    from contree_shell.cli.main import make_context, shell_parser
    from contree_shell.shell.builtins import help_map
    from contree_shell.shell.completion.completer import ContreeCompleter
    from contree_shell.shell.completion.sources import Sources
    from contree_shell.shell.context import ShellContext
    from contree_shell.state.cache import CompletionCache

    ctx = make_context(in_shell=True)
    sh = ShellContext(ctx)
    sources = Sources(ctx, CompletionCache(session_db_path(ctx.profile.name)))
    try:
        yield ContreeCompleter(sources, parser=shell_parser, builtins=help_map, cwd=sh.cwd,
                               image=sh.image)
    finally:
        sources.close()


def complete(completer: object, text: str) -> list[str]:
    return [c.text for c in completer.get_completions(  # type: ignore[attr-defined]
        Document(text), CompleteEvent(completion_requested=True))]


def test_cd_completes_sandbox_directories_with_a_slash(completer: object) -> None:
    found = complete(completer, "cd /")
    assert "bin/" in found and "etc/" in found
    assert all(name.endswith("/") for name in found)


def test_paths_complete_files_and_dirs_inside_a_directory(completer: object) -> None:
    found = complete(completer, "cat /etc/pa")
    assert "passwd" in found


def test_a_missing_directory_completes_to_nothing(completer: object) -> None:
    assert complete(completer, "cat /no/such/dir/x") == []


def test_branches_complete_from_the_session(completer: object) -> None:
    assert complete(completer, "contree session checkout ") == ["main"]


def test_contree_shell_is_not_offered_inside_the_shell(completer: object) -> None:
    found = complete(completer, "contree s")
    assert "session" in found
    assert "shell" not in found and "sh" not in found


def test_exit_with_a_status(server: LocalServer, session_env: dict[str, str]) -> None:
    code, out, _ = shell(server, session_env, "echo x\nexit 3\necho never\n")
    assert (code, out) == (3, "x\n")


def test_aliases_are_offered_only_when_no_full_name_fits(completer: object) -> None:
    found = complete(completer, "contree session c")
    assert "checkout" in found and "co" not in found
    assert complete(completer, "contree session rb") == ["rb"]


def test_contree_commands_work_inside_the_shell(
    server: LocalServer, session_env: dict[str, str]
) -> None:
    script = ("contree images\ncontree session show\ncontree session list\ncontree env\n"
              "contree ls /\nhelp session\nhelp\n")
    code, out, err = shell(server, session_env, script)
    assert code == 0, err
    assert "busybox" in out
    assert "Settings (editing mode" in out
    assert "[ERROR]" not in err and "Traceback" not in err


def test_a_long_command_ends_with_its_status_and_duration(
    server: LocalServer, session_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from contree_shell import output
    from contree_shell.cli.main import make_context
    from contree_shell.shell import dispatch
    from contree_shell.shell.context import ShellContext
    from contree_shell.shell.router import RemoteShell

    for key, value in session_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(dispatch, "LONG_RUN", 0.0)  # every command counts as long here
    out, err = io.StringIO(), io.StringIO()
    previous = output.set_output(output.Output(out, err))
    try:
        sh = ShellContext(make_context(in_shell=True))
        assert dispatch.run_route(sh, RemoteShell("exit 3")) == 3
    finally:
        output.set_output(previous)
    assert re.search(r"exit 3 · \d", err.getvalue())
    assert sh.last.status == 3 and sh.last.duration > 0


def test_images_complete_by_tag_and_by_uuid_prefix(server: LocalServer, completer: object
                                                    ) -> None:
    assert "tag:busybox:latest" in complete(completer, "contree use tag:bu")
    assert complete(completer, f"contree use {server.busybox[:6]}") == [server.busybox]
    assert server.busybox not in complete(completer, "contree use ")
