"""The `contree` parser tree: every command parses, and the shell's variant never exits."""

from __future__ import annotations

import argparse

import pytest

from contree_shell.cli.errors import CliHelp, CliUsageError
from contree_shell.cli.main import build_parser
from contree_shell.cli.run import command_tokens


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


@pytest.fixture(scope="module")
def shell_parser() -> argparse.ArgumentParser:
    return build_parser(for_shell=True)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["use", "tag:busybox:latest"], {"image": "tag:busybox:latest", "new": False}),
        (["ci", "-N", "busybox"], {"image": "busybox", "new": True}),
        (["use"], {"image": None}),
        (["run", "-s", "echo $HOME"], {"shell": True, "command_args": ["echo $HOME"]}),
        (["r", "-t", "5", "-e", "A=1", "-e", "B=2", "-C", "/tmp", "true"],
         {"timeout": 5, "env": ["A=1", "B=2"], "cwd": "/tmp", "command_args": ["true"]}),
        (["run", "-D", "-d", "-T", "10", "-H", "box", "--use", "tag:x", "ls"],
         {"disposable": True, "detach": True, "truncate": 10, "hostname": "box", "use": "tag:x"}),
        (["run", "ls"], {"timeout": 120, "truncate": 65536, "hostname": "linuxkit",
                         "interactive": False}),
        (["ls"], {"path": None}),
        (["ls", "/etc"], {"path": "/etc"}),
        (["cat", "/etc/os-release"], {"path": "/etc/os-release"}),
        (["cd"], {"path": None}),
        (["cd", "/tmp"], {"path": "/tmp"}),
        (["env", "A=1", "B=2"], {"pairs": ["A=1", "B=2"], "delete": False}),
        (["env", "-U", "A"], {"pairs": ["A"], "delete": True}),
        (["session"], {"session_command": None}),
        (["s", "ls", "--filter", "x"], {"session_command": "ls", "filter": "x"}),
        (["session", "branch"], {"name": None, "delete": False, "prune": False}),
        (["session", "br", "exp", "--from", "main"], {"name": "exp", "from_branch": "main"}),
        (["session", "branch", "-U", "exp"], {"name": "exp", "delete": True}),
        (["session", "branch", "--prune"], {"prune": True}),
        (["session", "checkout", "exp"], {"branch": "exp"}),
        (["session", "co", "main"], {"branch": "main"}),
        (["session", "rollback"], {"target": "-1"}),
        (["session", "rb", "+2"], {"target": "+2"}),
        (["session", "rollback", "7"], {"target": "7"}),
        (["session", "show", "-a", "-k", "run", "-l", "5"],
         {"all": True, "kind": "run", "last": 5, "key": None}),
        (["session", "delete", "a", "b", "-f"], {"keys": ["a", "b"], "force": True}),
        (["session", "rm", "a"], {"keys": ["a"], "force": False}),
        (["images"], {"all": False, "prefix": None, "limit": 3000}),
        (["images", "--prefix", "deb", "-a"], {"prefix": "deb", "all": True}),
        (["img", "list", "--limit", "5"], {"limit": 5, "all": False}),
        (["i", "-a", "ls"], {"all": True}),
        (["tag", "mine"], {"refs": ["mine"], "delete": False}),
        (["t", "tag:a", "b"], {"refs": ["tag:a", "b"]}),
        (["tag", "-U", "b"], {"refs": ["b"], "delete": True}),
        (["shell"], {"image": None}),
        (["shell", "tag:busybox:latest"], {"image": "tag:busybox:latest"}),
        (["sh"], {}),
    ],
)
def test_every_command_parses(
    parser: argparse.ArgumentParser, argv: list[str], expected: dict[str, object]
) -> None:
    args = parser.parse_args(argv)
    assert callable(args.handler)
    for key, value in expected.items():
        assert getattr(args, key) == value, key


def test_global_flags_come_before_the_command(parser: argparse.ArgumentParser) -> None:
    args = parser.parse_args(
        ["-p", "local", "-S", "k1", "-o", "json", "--debug", "--token", "t", "--url", "u",
         "--project", "pr", "session"]
    )
    assert (args.profile, args.session, args.output_format, args.debug) == ("local", "k1", "json", True)
    assert (args.token, args.url, args.project) == ("t", "u", "pr")
    for flag in ("--format", "--output"):
        assert parser.parse_args([flag, "csv", "ls"]).output_format == "csv"


def test_run_remainder_keeps_help_flag_of_the_remote_command(
    shell_parser: argparse.ArgumentParser,
) -> None:
    args = shell_parser.parse_args(["run", "--", "ls", "-h"])
    assert command_tokens(args.command_args) == ["ls", "-h"]
    args = shell_parser.parse_args(["run", "ls", "-la", "--help"])
    assert command_tokens(args.command_args) == ["ls", "-la", "--help"]


def test_run_flags_after_the_command_belong_to_the_command(parser: argparse.ArgumentParser) -> None:
    args = parser.parse_args(["run", "-t", "5", "grep", "-t", "x"])
    assert args.timeout == 5
    assert command_tokens(args.command_args) == ["grep", "-t", "x"]


def test_shell_mode_expression_after_double_dash_is_kept_verbatim(
    parser: argparse.ArgumentParser,
) -> None:
    args = parser.parse_args(["run", "-s", "--", "a && b"])
    assert command_tokens(args.command_args) == ["a && b"]


def test_bare_negative_rollback_target_parses(parser: argparse.ArgumentParser) -> None:
    assert parser.parse_args(["session", "rollback", "-3"]).target == "-3"
    assert parser.parse_args(["s", "rb", "-1"]).target == "-1"


def test_shell_parser_raises_usage_error_instead_of_exiting(
    shell_parser: argparse.ArgumentParser,
) -> None:
    with pytest.raises(CliUsageError) as info:
        shell_parser.parse_args(["no-such-command"])
    assert "invalid choice" in info.value.message
    assert info.value.usage.startswith("usage: contree")
    with pytest.raises(CliUsageError) as info:
        shell_parser.parse_args(["run", "-t", "soon", "ls"])
    assert "usage: contree run" in info.value.usage
    with pytest.raises(CliUsageError):
        shell_parser.parse_args(["session", "checkout"])


def test_shell_parser_raises_help_instead_of_exiting(shell_parser: argparse.ArgumentParser) -> None:
    with pytest.raises(CliHelp) as info:
        shell_parser.parse_args(["run", "--help"])
    assert "usage: contree run" in info.value.text
    assert "rollback" in info.value.text  # the session policy is documented in run's help
    with pytest.raises(CliHelp) as info:
        shell_parser.parse_args(["-h"])
    assert "session" in info.value.text


def test_cli_parser_exits_with_status_2_on_bad_arguments(
    parser: argparse.ArgumentParser, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["session", "checkout"])
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err
