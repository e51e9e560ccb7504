"""The shell's router: which lines are builtins, contree commands or sandbox commands."""

from __future__ import annotations

import pytest

from contree_shell.shell.router import (
    BUILTIN_NAMES,
    SHELL_IN_SHELL,
    Builtin,
    ContreeCommand,
    Empty,
    Incomplete,
    ParseError,
    RemoteShell,
    classify,
    is_incomplete,
    join_continuation,
    parse_duration,
)


@pytest.mark.parametrize("line", ["", "   ", "\t", "# a comment", "  # indented comment"])
def test_blank_and_comment_lines_do_nothing(line: str) -> None:
    assert classify(line) == Empty()


@pytest.mark.parametrize(
    "line",
    [
        "echo hi | grep h",
        "make > log 2>&1",
        "cd /tmp; ls",
        "a && b || c",
        "FOO=1 env",
        "python -c 'print(1)'",
    ],
)
def test_bare_lines_run_remotely_verbatim(line: str) -> None:
    assert classify(line) == RemoteShell(line)


def test_remote_line_is_stripped_but_not_requoted() -> None:
    assert classify("  echo 'a  b'  ") == RemoteShell("echo 'a  b'")


def test_contree_prefix_gives_argv_without_the_word_contree() -> None:
    assert classify("contree session branch 'my x'") == ContreeCommand(
        ["session", "branch", "my x"]
    )


def test_contree_alone_is_a_contree_command_with_no_args() -> None:
    assert classify("contree") == ContreeCommand([])


@pytest.mark.parametrize(
    "line", ["contree shell", "contree -o json shell", "contree --profile x shell --help"]
)
def test_contree_shell_inside_the_shell_is_refused(line: str) -> None:
    assert classify(line) == ParseError(SHELL_IN_SHELL)


def test_contree_help_flag_stays_a_contree_command() -> None:
    # --help is handled by the for-shell parser (it raises, never exits).
    assert classify("contree run --help") == ContreeCommand(["run", "--help"])


def test_contree_run_remainder_with_dash_h_is_not_shell_help() -> None:
    assert classify("contree run -- ls -h") == ContreeCommand(["run", "--", "ls", "-h"])


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("cd", Builtin("cd", [], "")),
        ("cd /tmp", Builtin("cd", ["/tmp"], "/tmp")),
        ("cd -", Builtin("cd", ["-"], "-")),
        ("cd 'a b'", Builtin("cd", ["a b"], "'a b'")),
        ("pwd", Builtin("pwd", [], "")),
        ("history", Builtin("history", [], "")),
        ("history 'git co'", Builtin("history", ["git co"], "'git co'")),
        ("help run", Builtin("help", ["run"], "run")),
        ("clear", Builtin("clear", [], "")),
        ("exit", Builtin("exit", [], "")),
        ("quit", Builtin("quit", [], "")),
    ],
)
def test_builtins(line: str, expected: Builtin) -> None:
    assert classify(line) == expected


def test_only_the_first_word_selects_a_builtin() -> None:
    assert classify("echo cd /tmp") == RemoteShell("echo cd /tmp")
    assert classify("cdx") == RemoteShell("cdx")


def test_ls_and_cat_with_one_plain_path_use_the_inspect_api() -> None:
    assert classify("ls") == Builtin("ls", [], "")
    assert classify("ls /etc") == Builtin("ls", ["/etc"], "/etc")
    assert classify("cat note") == Builtin("cat", ["note"], "note")


@pytest.mark.parametrize(
    "line",
    [
        "ls -la",
        "ls /etc /tmp",
        "ls *.py",
        "ls src/[ab]",
        "ls ~",
        "ls $HOME",
        "ls >out",
        "cat",
        "cat a b",
        "cat -n note",
        "cat note | wc -l",
        "cat note>copy",
        "cat f?",
    ],
)
def test_ls_and_cat_fall_back_to_a_real_run(line: str) -> None:
    assert classify(line) == RemoteShell(line)


def test_timeout_keeps_the_rest_of_the_line_verbatim() -> None:
    assert classify("timeout 5m make 'a  b' | tee log") == Builtin(
        "timeout", ["5m"], "make 'a  b' | tee log"
    )


@pytest.mark.parametrize("line", ["timeout", "timeout 5", "timeout abc make", "timeout -s 9 5 x",
                                  "timeout 0 make", "timeout 1w make"])
def test_unparsable_timeout_falls_through_to_the_sandbox(line: str) -> None:
    assert classify(line) == RemoteShell(line)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5", 5.0), ("2.5", 2.5), (".5", 0.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0),
     ("1d", 86400.0), ("1.5m", 90.0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0s", "-1", "1w", "m", "5 m", "1e3", "abc"])
def test_parse_duration_rejects(text: str) -> None:
    assert parse_duration(text) is None


@pytest.mark.parametrize("line", ["echo 'open", 'echo "open', "echo a \\", "cd 'x"])
def test_open_quote_or_trailing_backslash_is_incomplete(line: str) -> None:
    assert classify(line) == Incomplete()
    assert is_incomplete(line)


def test_complete_lines_are_not_incomplete() -> None:
    assert not is_incomplete("echo 'closed'")
    assert not is_incomplete("")


def test_continuation_removes_backslash_newline() -> None:
    assert join_continuation("echo a \\\nb") == "echo a b"


def test_continuation_keeps_newline_inside_quotes() -> None:
    assert join_continuation('echo "unclosed\nmore"') == 'echo "unclosed\nmore"'
    assert join_continuation("echo 'x\\\ny'") == "echo 'x\\\ny'"


def test_continuation_removes_backslash_newline_inside_double_quotes() -> None:
    assert join_continuation('echo "a\\\nb"') == 'echo "ab"'


def test_continuation_keeps_an_escaped_backslash() -> None:
    assert join_continuation("echo a\\\\\nb") == "echo a\\\\\nb"


def test_joined_continuation_classifies_as_one_command() -> None:
    text = "echo one \\\ntwo"
    assert classify(text) == RemoteShell("echo one \\\ntwo")
    assert classify(join_continuation(text)) == RemoteShell("echo one two")


def test_router_builtin_names_match_the_registry() -> None:
    from contree_shell.shell.builtins import all_names

    assert set(all_names()) == set(BUILTIN_NAMES)


def test_builtin_with_shell_operators_runs_in_the_sandbox() -> None:
    assert classify("history | grep x") == RemoteShell("history | grep x")
    assert classify("pwd > f") == RemoteShell("pwd > f")


def test_quoted_operators_keep_a_builtin_local() -> None:
    assert classify("cd 'a;b'") == Builtin("cd", ["a;b"], "'a;b'")
    assert classify('history "a|b"') == Builtin("history", ["a|b"], '"a|b"')


def test_contree_line_with_a_pipe_is_refused_with_a_hint() -> None:
    from contree_shell.shell.router import CONTREE_OPERATORS

    assert classify("contree ls / | head") == ParseError(CONTREE_OPERATORS)
    assert classify("contree run -- sh -c 'a | b'") == ContreeCommand(
        ["run", "--", "sh", "-c", "a | b"]
    )


def test_dollar_question_mark_sees_the_previous_status() -> None:
    from contree_shell.shell.dispatch import with_last_status

    assert with_last_status("echo $?", 7) == "(exit 7); echo $?"
    assert with_last_status("echo ${?}", 300) == "(exit 44); echo ${?}"
    assert with_last_status("echo hi", 7) == "echo hi"


def test_editor_and_format_lines_are_builtins() -> None:
    assert classify("vim notes.txt") == Builtin("vim", ["notes.txt"], "notes.txt")
    assert classify("-o json") == Builtin("-o", ["json"], "json")
    assert classify("--format") == Builtin("--format", [], "")
