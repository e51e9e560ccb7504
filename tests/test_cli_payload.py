"""Pure parts of the command layer: spawn payloads, env pairs, titles, path resolution."""

from __future__ import annotations

import pytest

from contree_shell.cli.errors import CliError
from contree_shell.cli.images import is_uuid, tag_of
from contree_shell.cli.paths import resolve_path
from contree_shell.cli.run import build_payload, parse_env_pairs, run_title

IMG = "5b0e3f0c-0f67-4a64-9d0b-6f1d1c2e9a11"


def test_payload_always_carries_the_fixed_fields() -> None:
    payload = build_payload(image=IMG, tokens=["true"], shell=False)
    assert payload == {
        "image": IMG, "command": "true", "shell": False, "disposable": False,
        "hostname": "linuxkit", "truncate_output_at": 65536, "timeout": 120,
    }


def test_payload_non_shell_splits_command_and_args() -> None:
    payload = build_payload(image=IMG, tokens=["ls", "-l", "/a b"], shell=False)
    assert payload["command"] == "ls"
    assert payload["args"] == ["-l", "/a b"]


def test_payload_shell_single_token_is_verbatim() -> None:
    payload = build_payload(image=IMG, tokens=["a && b | c"], shell=True)
    assert payload["command"] == "a && b | c"
    assert "args" not in payload


def test_payload_shell_several_tokens_are_quoted() -> None:
    payload = build_payload(image=IMG, tokens=["echo", "a b", "$X"], shell=True)
    assert payload["command"] == "echo 'a b' '$X'"


def test_payload_sends_cwd_env_timeout_only_when_set() -> None:
    payload = build_payload(image=IMG, tokens=["x"], shell=True, cwd="", env={}, timeout=None)
    assert "cwd" not in payload and "env" not in payload and "timeout" not in payload
    payload = build_payload(image=IMG, tokens=["x"], shell=True, cwd="/w", env={"A": "1"}, timeout=5)
    assert (payload["cwd"], payload["env"], payload["timeout"]) == ("/w", {"A": "1"}, 5)


def test_payload_without_command_is_a_usage_error() -> None:
    with pytest.raises(CliError) as info:
        build_payload(image=IMG, tokens=[], shell=False)
    assert info.value.exit_code == 2


def test_env_pairs_parse_and_reject_malformed() -> None:
    assert parse_env_pairs(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(CliError, match="Invalid format 'oops', expected KEY=VALUE"):
        parse_env_pairs(["oops"])
    with pytest.raises(CliError):
        parse_env_pairs(["=1"])


def test_run_title_is_what_was_typed() -> None:
    assert run_title(["echo $HOME"], True) == "echo $HOME"
    assert run_title(["ls", "a b"], False) == "ls 'a b'"


@pytest.mark.parametrize(
    ("cwd", "path", "expected"),
    [
        ("", None, "/"),
        ("", "etc", "/etc"),
        ("/etc", "../tmp/./x/", "/tmp/x"),
        ("/work", "", "/work"),
        ("/a", "/b//c", "/b/c"),
        ("/", "../..", "/"),
        ("/w", "//x", "/x"),
    ],
)
def test_relative_paths_resolve_against_the_session_cwd(cwd: str, path: str | None, expected: str) -> None:
    assert resolve_path(cwd, path) == expected


def test_image_references() -> None:
    assert is_uuid(IMG)
    assert is_uuid(IMG.replace("-", ""))
    assert not is_uuid("busybox:latest")
    assert tag_of("tag:busybox:latest") == "busybox:latest"
    assert tag_of("debian:bookworm") == "debian:bookworm"


def test_spawn_failures_map_to_shell_statuses() -> None:
    from contree_shell.cli.run import spawn_failure_status

    assert spawn_failure_status("spawn failed: exec nope: No such file or directory") == 127
    assert spawn_failure_status("spawn failed: exec /etc/passwd: Permission denied") == 126
    assert spawn_failure_status("server restarted") is None
    assert spawn_failure_status(None) is None
