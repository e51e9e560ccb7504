"""The pure completion analysis: what kind of candidate belongs at the cursor."""

from __future__ import annotations

import argparse

import pytest

from contree_shell.shell.completion.engine import (
    BuiltinNames,
    Choices,
    CommandNames,
    FlagNames,
    HelpTopics,
    SandboxPath,
    Source,
    Word,
    analyze,
    split_words,
)

BUILTINS = frozenset({"cd", "pwd", "help", "history", "clear", "timeout", "exit", "quit", "ls",
                      "cat"})


def tree() -> argparse.ArgumentParser:
    """A small parser with the shapes the real `contree` tree has."""
    root = argparse.ArgumentParser(prog="contree")
    root.add_argument("-o", "--format", dest="output_format", choices=["json", "table"])
    root.add_argument("-S", "--session", metavar="KEY")
    root.add_argument("--debug", action="store_true")
    sub = root.add_subparsers(dest="command")
    run = sub.add_parser("run", aliases=["r"])
    run.add_argument("--timeout", type=float)
    run.add_argument("-C", "--cwd")
    run.add_argument("--use", dest="image")
    run.add_argument("args", nargs=argparse.REMAINDER)
    session = sub.add_parser("session", aliases=["s"])
    ssub = session.add_subparsers(dest="session_command")
    checkout = ssub.add_parser("checkout")
    checkout.add_argument("name")
    branch = ssub.add_parser("branch")
    branch.add_argument("name", nargs="?")
    branch.add_argument("--from", dest="from_branch")
    ssub.add_parser("list")
    ls = sub.add_parser("ls")
    ls.add_argument("-l", action="store_true")
    ls.add_argument("path", nargs="?")
    use = sub.add_parser("use")
    use.add_argument("image")
    ops = sub.add_parser("ps")
    ops.add_argument("--status", choices=["EXECUTING", "SUCCESS", "FAILED"])
    return root


def kinds(text: str) -> tuple[object, ...]:
    return analyze(text, tree(), BUILTINS).suggestions


def test_empty_line_offers_builtins_and_contree_not_bare_commands() -> None:
    assert kinds("") == (BuiltinNames(),)
    assert kinds("cl") == (BuiltinNames(),)


def test_first_word_that_looks_like_a_path_completes_in_the_sandbox() -> None:
    assert kinds("./scr") == (SandboxPath(),)
    assert kinds("/usr/bin/py") == (SandboxPath(),)


def test_contree_offers_subcommands_with_aliases() -> None:
    result = kinds("contree ")
    assert len(result) == 1 and isinstance(result[0], CommandNames)
    assert {"run", "r", "session", "s", "ls", "use", "ps"} <= set(result[0].names)


def test_contree_partial_subcommand_word_is_the_replaced_word() -> None:
    analysis = analyze("contree ses", tree(), BUILTINS)
    assert analysis.word == Word("ses", "ses")
    assert isinstance(analysis.suggestions[0], CommandNames)


def test_nested_subcommands_through_an_alias() -> None:
    result = kinds("contree s ")
    assert isinstance(result[0], CommandNames)
    assert result[0].path == ("session",)
    assert set(result[0].names) == {"checkout", "branch", "list"}


def test_bare_session_is_a_sandbox_command_not_a_contree_one() -> None:
    # The official shell walked bare words as contree commands; they run remotely.
    assert kinds("session ") == (SandboxPath(),)


def test_flags_of_the_current_command() -> None:
    result = kinds("contree run --t")
    assert isinstance(result[0], FlagNames)
    assert result[0].path == ("run",)
    assert "--timeout" in dict(result[0].flags)


def test_global_flags_before_the_command() -> None:
    result = kinds("contree -")
    assert isinstance(result[0], FlagNames)
    assert {"-o", "--format", "--debug"} <= set(dict(result[0].flags))


def test_flag_value_with_choices() -> None:
    assert kinds("contree -o ") == (Choices(("json", "table")),)
    assert kinds("contree ps --status E") == (Choices(("EXECUTING", "SUCCESS", "FAILED")),)


def test_inline_flag_value_with_choices() -> None:
    assert kinds("contree --format=j") == (Choices(("json", "table")),)


def test_a_flag_value_is_skipped_when_walking() -> None:
    result = kinds("contree -o json s")
    assert isinstance(result[0], CommandNames) and result[0].path == ()


def test_positional_branch_source() -> None:
    assert kinds("contree session checkout ") == (Source("branch", ("session", "checkout"), "name"),)


def test_flag_branch_source_by_dest() -> None:
    assert kinds("contree session branch x --from ") == (
        Source("branch", ("session", "branch"), "from_branch"),
    )


def test_image_source() -> None:
    assert kinds("contree use ") == (Source("image", ("use",), "image"),)
    assert kinds("contree run --use ") == (Source("image", ("run",), "image"),)


def test_directory_flag_completes_directories_only() -> None:
    assert kinds("contree run -C /u") == (SandboxPath(dirs_only=True),)


def test_path_positional() -> None:
    assert kinds("contree ls /e") == (SandboxPath(),)


def test_remainder_swallows_flags_and_completes_paths() -> None:
    assert kinds("contree run --timeout 5 python /app/") == (SandboxPath(),)
    assert kinds("contree run -- ls -l /et") == (SandboxPath(),)


def test_unknown_subcommand_offers_nothing() -> None:
    assert kinds("contree nosuch ") == ()


def test_help_topics() -> None:
    assert kinds("help ") == (HelpTopics(),)
    result = kinds("help session ")
    assert isinstance(result[0], CommandNames) and "checkout" in result[0].names


@pytest.mark.parametrize(("text", "dirs_only"), [("cd ", True), ("cd /us", True),
                                                 ("ls ", False), ("cat no", False)])
def test_builtin_path_arguments(text: str, dirs_only: bool) -> None:
    assert kinds(text) == (SandboxPath(dirs_only=dirs_only),)


def test_cd_takes_one_argument() -> None:
    assert kinds("cd /tmp ") == ()


def test_quiet_builtins() -> None:
    assert kinds("pwd ") == ()
    assert kinds("history ") == ()


def test_timeout_command_completes_like_a_bare_line() -> None:
    assert kinds("timeout 5m ") == (BuiltinNames(),)
    assert kinds("timeout 5m python ./") == (SandboxPath(),)


def test_bare_command_arguments_are_sandbox_paths_but_not_flags() -> None:
    assert kinds("python ") == (SandboxPath(),)
    assert kinds("grep -") == ()


def test_split_words_tracks_quotes_and_escapes() -> None:
    words, current = split_words("cat 'my fi")
    assert words == [Word("cat", "cat")]
    assert current == Word("'my fi", "my fi")
    words, current = split_words('ls a\\ b "c d" ')
    assert [w.value for w in words] == ["ls", "a b", "c d"]
    assert current is None


def test_the_real_contree_parser_is_walkable() -> None:
    from contree_shell.shell.commands import shell_parser

    result = analyze("contree ", shell_parser(), BUILTINS).suggestions
    assert isinstance(result[0], CommandNames)
    assert "run" in result[0].names


def test_real_parser_specific_sources() -> None:
    from contree_shell.shell.commands import shell_parser

    def real(text: str) -> tuple[object, ...]:
        return analyze(text, shell_parser(), BUILTINS).suggestions

    assert real("contree cd /") == (SandboxPath(dirs_only=True),)
    assert real("contree session delete ")[0] == Source("session", ("session", "delete"), "keys")
    assert real("contree session checkout ")[0] == Source("branch", ("session", "checkout"),
                                                          "branch")
    assert real("contree -S ")[0] == Source("session", (), "session")


def _complete_builtin_names(text: str, fuzzy: bool = True) -> list[str]:
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document

    from contree_shell.shell import builtins
    from contree_shell.shell.completion.completer import ContreeCompleter
    from contree_shell.shell.completion.sources import Sources

    completer = ContreeCompleter(Sources(None), parser=lambda: None,
                                 builtins=builtins.help_map, cwd=lambda: "/",
                                 image=lambda: None, fuzzy=fuzzy)
    return [c.text for c in completer.get_completions(Document(text), CompleteEvent())]


def test_prefix_matches_win_and_fuzzy_only_fills_an_empty_answer() -> None:
    assert _complete_builtin_names("hi") == ["history"]
    assert _complete_builtin_names("hstry") == ["history"]
    assert _complete_builtin_names("hstry", fuzzy=False) == []


def test_output_format_builtin_completes_format_names() -> None:
    assert "json-pretty" in _complete_builtin_names("-o json")
    assert _complete_builtin_names("--format cs") == ["csv"]


def test_editor_aliases_complete_sandbox_paths() -> None:
    from contree_shell.shell.completion.engine import SandboxPath

    assert analyze("vim /et", None, BUILTINS | {"vim"}).suggestions == (SandboxPath(),)


def test_arguments_on_this_machine_complete_host_paths() -> None:
    from contree_shell.shell.commands import shell_parser
    from contree_shell.shell.completion.engine import HostPath

    parser = shell_parser()
    if commands_missing(parser, ["cp"], ["export"]):
        pytest.skip("cp/export are not in this build")
    assert analyze("contree cp /etc/passwd ./", parser, BUILTINS).suggestions == (HostPath(),)
    assert analyze("contree export -F ./", parser, BUILTINS).suggestions == (HostPath(),)
    assert analyze("contree cp /et", parser, BUILTINS).suggestions == (SandboxPath(),)


def test_operation_arguments_complete_operations() -> None:
    from contree_shell.shell.commands import shell_parser

    parser = shell_parser()
    if commands_missing(parser, ["show"]):
        pytest.skip("show is not in this build")
    assert analyze("contree show ", parser, BUILTINS).suggestions[0].name == "operation"


def commands_missing(parser: object, *paths: list[str]) -> bool:
    from contree_shell.shell.commands import find_command

    return any(find_command(p, parser) is None for p in paths)  # type: ignore[arg-type]
