"""`grep`, `cp` and `export` against the real local server (busybox image)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from tests.conftest import LocalServer
from tests.test_cli_commands import contree, err, out

pytestmark = pytest.mark.root


def _write(server: LocalServer, env: dict[str, str], script: str) -> None:
    result = contree(server, env, "run", "--", "sh", "-c", script)
    assert result.returncode == 0, err(result)


def test_grep_prints_gnu_style_lines_and_context(server: LocalServer, session_env: dict[str, str]) -> None:
    _write(server, session_env, "mkdir -p /g && printf 'a\\nneedle one\\nb\\nc\\nd\\nneedle two\\n' > /g/f.txt")
    result = contree(server, session_env, "grep", "needle", "/g")
    assert result.returncode == 0, err(result)
    assert out(result) == "/g/f.txt:2:needle one\n/g/f.txt:6:needle two\n"
    ctx = contree(server, session_env, "grep", "-C", "1", "needle", "/g")
    assert out(ctx).splitlines() == [
        "/g/f.txt-1-a", "/g/f.txt:2:needle one", "/g/f.txt-3-b", "--",
        "/g/f.txt-5-d", "/g/f.txt:6:needle two",
    ]
    raw = contree(server, session_env, "grep", "--raw", "--max-total", "1", "needle", "/g")
    body = json.loads(raw.stdout)
    assert len(body["matches"]) == 1


def test_grep_relative_paths_use_the_session_cwd_and_exit_1_without_match(
    server: LocalServer, session_env: dict[str, str]
) -> None:
    _write(server, session_env, "mkdir -p /h && echo Hello > /h/x")
    assert contree(server, session_env, "cd", "/h").returncode == 0
    found = contree(server, session_env, "grep", "--case", "insensitive", "hello", ".")
    assert out(found) == "/h/x:1:Hello\n"
    missing = contree(server, session_env, "grep", "zzz-not-there", "x")
    assert missing.returncode == 1 and missing.stdout == b""


def test_grep_colours_only_when_forced(server: LocalServer, session_env: dict[str, str]) -> None:
    _write(server, session_env, "mkdir -p /c && echo 'say hi' > /c/f")
    env = dict(session_env, FORCE_COLOR="1")
    result = contree(server, env, "grep", "hi", "/c")
    assert "\x1b[35m/c/f" in out(result) and "\x1b[1;31mhi" in out(result)


def test_cp_downloads_into_a_directory_atomically(
    server: LocalServer, session_env: dict[str, str], tmp_path: Path
) -> None:
    _write(server, session_env, "echo payload > /tmp/data.txt")
    result = contree(server, session_env, "cp", "/tmp/data.txt", str(tmp_path))
    assert result.returncode == 0, err(result)
    assert (tmp_path / "data.txt").read_text() == "payload\n"
    assert [p.name for p in tmp_path.iterdir()] == ["data.txt"]  # no temp file left
    named = contree(server, session_env, "cp", "/tmp/data.txt", str(tmp_path / "other"))
    assert named.returncode == 0 and (tmp_path / "other").read_text() == "payload\n"
    missing = contree(server, session_env, "cp", "/nope", str(tmp_path))
    assert missing.returncode == 1
    assert "cp: /nope: No such file or directory" in err(missing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt", "other"]


def test_export_writes_a_tar_and_refuses_missing_paths(
    server: LocalServer, session_env: dict[str, str], tmp_path: Path
) -> None:
    _write(server, session_env, "mkdir -p /exp/sub && echo one > /exp/sub/a")
    plain = tmp_path / "exp.tar"
    result = contree(server, session_env, "export", "/exp", "-F", str(plain))
    assert result.returncode == 0, err(result)
    with tarfile.open(plain, "r:") as tar:
        names = tar.getnames()
        member = next(m for m in tar.getmembers() if m.name.endswith("sub/a"))
        assert tar.extractfile(member).read() == b"one\n"  # type: ignore[union-attr]
    assert any(n.endswith("sub/a") for n in names)
    gz = tmp_path / "exp.tar.gz"
    assert contree(server, session_env, "export", "/exp", "-F", str(gz)).returncode == 0
    assert gz.read_bytes()[:2] == b"\x1f\x8b"
    piped = contree(server, session_env, "export", "--decompress", "/exp")
    with tarfile.open(fileobj=io.BytesIO(piped.stdout), mode="r:") as tar:
        assert any(n.endswith("sub/a") for n in tar.getnames())
    missing = contree(server, session_env, "export", "/nope", "-F", str(tmp_path / "x.tar"))
    assert missing.returncode == 1
    assert "export: /nope: not found in image" in err(missing)
    assert not (tmp_path / "x.tar").exists()


def test_export_refuses_a_terminal_stdout(server: LocalServer, session_env: dict[str, str]) -> None:
    import os
    import pty
    import subprocess
    import sys

    primary, secondary = pty.openpty()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "contree_shell", "export", "/etc"], env=session_env,
            stdin=subprocess.DEVNULL, stdout=secondary, stderr=subprocess.PIPE,
            cwd=str(server.config), timeout=60,
        )
    finally:
        os.close(secondary)
        os.close(primary)
    assert result.returncode == 1
    assert b"refusing to write a binary archive to a terminal" in result.stderr
