"""Staging files: `file edit`, `file cp`, `file ls`, `run -F`, pending files sent once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import LocalServer
from tests.test_cli_commands import contree, err, out

pytestmark = pytest.mark.root


def _sh(server: LocalServer, env: dict[str, str], script: str) -> str:
    result = contree(server, env, "run", "--", "sh", "-c", script)
    assert result.returncode == 0, err(result)
    return out(result)


def _editor(tmp_path: Path, script: str) -> str:
    """An $EDITOR that edits the file non-interactively."""
    path = tmp_path / "editor.sh"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return str(path)


def test_file_edit_resolves_against_cwd_and_keeps_the_mode(
    server: LocalServer, session_env: dict[str, str], tmp_path: Path
) -> None:
    _sh(server, session_env, "mkdir -p /app && echo old > /app/run.sh && chmod 750 /app/run.sh")
    assert contree(server, session_env, "cd", "/app").returncode == 0
    env = dict(session_env, EDITOR=_editor(tmp_path, 'echo new > "$1"\n'))
    edited = contree(server, env, "file", "edit", "run.sh")
    assert edited.returncode == 0, err(edited)
    assert "Pending: /app/run.sh -> " in err(edited)
    pending = contree(server, session_env, "-o", "json", "file", "ls", "-P")
    row = json.loads(pending.stdout)
    assert row["path"] == "/app/run.sh" and row["mode"] == "0750"
    assert _sh(server, session_env, "cat /app/run.sh; stat -c %a /app/run.sh") == "new\n750\n"
    # The run consumed the staged file: nothing pending, nothing re-sent.
    assert contree(server, session_env, "file", "ls", "-P").stdout.strip() == b""


def test_file_edit_without_changes_uploads_nothing(
    server: LocalServer, session_env: dict[str, str], tmp_path: Path
) -> None:
    env = dict(session_env, EDITOR="true")
    result = contree(server, env, "file", "edit", "/etc/passwd")
    assert result.returncode == 0, err(result)
    assert "No changes detected, skipping upload" in err(result)
    failing = contree(server, dict(session_env, EDITOR="false"), "f", "e", "/etc/passwd")
    assert failing.returncode == 1
    assert "Editor exited with code 1" in err(failing)


def test_file_edit_of_a_new_file_starts_empty(
    server: LocalServer, session_env: dict[str, str], tmp_path: Path
) -> None:
    editor = _editor(tmp_path, 'test -s "$1" && exit 9; echo created > "$1"\n')
    result = contree(server, session_env, "file", "edit", "-E", editor, "/new.txt")
    assert result.returncode == 0, err(result)
    assert _sh(server, session_env, "cat /new.txt; stat -c %a /new.txt") == "created\n644\n"


def test_file_cp_keeps_the_host_mode_and_dest_dir_gets_the_name(
    server: LocalServer, session_env: dict[str, str], tmp_path: Path
) -> None:
    host = tmp_path / "tool.sh"
    host.write_text("#!/bin/sh\necho tool ran\n")
    host.chmod(0o755)
    result = contree(server, session_env, "file", "cp", str(host), "/usr/")
    assert result.returncode == 0, err(result)
    assert "Pending: /usr/tool.sh" in err(result)
    assert _sh(server, session_env, "/usr/tool.sh") == "tool ran\n"
    missing = contree(server, session_env, "file", "cp", str(tmp_path / "nope"), "/x")
    assert missing.returncode == 1 and "File not found: " in err(missing)


def test_file_ls_lists_uploads_with_their_source(
    server: LocalServer, session_env: dict[str, str], tmp_path: Path
) -> None:
    host = tmp_path / "listed.txt"
    host.write_text(f"unique {os.getpid()} {tmp_path}\n")
    assert contree(server, session_env, "file", "cp", str(host), "/l.txt").returncode == 0
    listed = contree(server, session_env, "-o", "json", "file", "ls", "--since", "1h")
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert any(r["source"] == str(host) for r in rows)


def test_run_file_specs_upload_dirs_with_excludes_and_modes(
    server: LocalServer, session_env: dict[str, str], tmp_path: Path
) -> None:
    proj = tmp_path / "proj"
    (proj / "pkg").mkdir(parents=True)
    (proj / "pkg" / "mod.py").write_text("print('mod')\n")
    (proj / "pkg" / "skip.log").write_text("no\n")
    (proj / ".git").mkdir()
    (proj / ".git" / "HEAD").write_text("ref\n")
    script = tmp_path / "s.sh"
    script.write_text("echo script\n")
    result = contree(
        server, session_env, "run", "-F", f"{proj}:/srv", "--file-excludes", "*.log",
        "-F", f"{script}:/bin/s.sh:m700:u1:g2", "--",
        "sh", "-c", "find /srv -type f | sort; stat -c '%a %u %g' /bin/s.sh; /bin/s.sh",
    )
    assert result.returncode == 0, err(result)
    assert out(result) == "/srv/pkg/mod.py\n700 1 2\nscript\n"
    assert "2 uploaded" in err(result) or "uploaded" in err(result)
    again = contree(server, session_env, "run", "-F", f"{script}:/bin/t.sh", "--", "cat", "/bin/t.sh")
    assert out(again) == "echo script\n"
    assert "0 uploaded, 1 reused" in err(again)  # the local cache: not hashed or sent again


def test_run_file_with_a_bad_spec_fails_before_running(
    server: LocalServer, session_env: dict[str, str], tmp_path: Path
) -> None:
    result = contree(server, session_env, "run", "-F", f"{tmp_path}/missing", "--", "true")
    assert result.returncode == 1
    assert "is neither file nor directory" in err(result)
    bad = contree(server, session_env, "run", "-F", f"{tmp_path}:m8", "--", "true")
    assert bad.returncode == 1 and "bad mode" in err(bad)


def test_interpreter_mode_runs_a_host_script_body(
    server: LocalServer, session_env: dict[str, str], tmp_path: Path
) -> None:
    script = tmp_path / "job"
    script.write_bytes(b"#!/usr/bin/env -S contree run -I\r\necho \"args: $*\"\r\n")
    result = contree(server, session_env, "run", "-I", str(script), "a", "b c")
    assert result.returncode == 0, err(result)
    assert out(result) == "args: a b c\n"


def test_a_second_edit_starts_from_the_staged_content(
    server: LocalServer, session_env: dict[str, str], tmp_path: Path
) -> None:
    env = dict(session_env, EDITOR=_editor(tmp_path, 'echo more >> "$1"\n'))
    for _ in range(2):
        result = contree(server, env, "file", "edit", "/etc/motd-test")
        assert result.returncode == 0, err(result)
    assert _sh(server, session_env, "cat /etc/motd-test") == "more\nmore\n"
