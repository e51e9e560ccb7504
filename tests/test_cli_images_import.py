"""`contree images import`: reference handling, and imports through the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from contree_shell.cli.errors import CliError
from contree_shell.cli.images import (
    derive_import_tag,
    expand_braces,
    normalize_import_ref,
    split_tag_query,
)
from tests.conftest import LocalServer
from tests.test_import_archives import (
    RUN_CONFIG,
    blocked_layout,
    release,
    runnable_image,
    runnable_layers,
    write_oci_archive,
)
from tests.test_sandbox_oci import write_docker_archive
from tests.test_server_support import wait_done


@pytest.mark.parametrize(
    "ref, url",
    [
        ("ubuntu", "docker://docker.io/library/ubuntu:latest"),
        ("ubuntu:24.04", "docker://docker.io/library/ubuntu:24.04"),
        ("docker://alpine", "docker://docker.io/library/alpine:latest"),
        ("bitnami/redis:7", "docker://docker.io/bitnami/redis:7"),
        ("ghcr.io/o/app:1.2", "docker://ghcr.io/o/app:1.2"),
        ("localhost:5000/app", "docker://localhost:5000/app:latest"),
        ("127.0.0.1:5000/a/b:v1", "docker://127.0.0.1:5000/a/b:v1"),
        ("alpine@sha256:" + "a" * 64, "docker://docker.io/library/alpine@sha256:" + "a" * 64),
        ("oci-archive:/srv/img.tar:v1", "oci-archive:/srv/img.tar:v1"),
        ("docker-archive:/srv/saved.tar", "docker-archive:/srv/saved.tar"),
        ("oci:/srv/layout", "oci:/srv/layout"),
        ("busybox:", "busybox:"),
        ("debootstrap:bookworm", "debootstrap:bookworm"),
    ],
)
def test_refs_are_normalised_like_the_official_cli(ref: str, url: str) -> None:
    assert normalize_import_ref(ref) == url


def test_relative_local_paths_become_absolute_on_the_client() -> None:
    assert normalize_import_ref("oci-archive:img.tar:v1", cwd="/home/u") == (
        "oci-archive:/home/u/img.tar:v1"
    )
    assert normalize_import_ref("oci:./layout", cwd="/w") == "oci:/w/./layout"
    assert normalize_import_ref("docker-archive:x.tar").startswith(f"docker-archive:{os.getcwd()}/")


@pytest.mark.parametrize("ref", ["", "ftp://x/y", "oci:", "docker://"])
def test_bad_refs_are_usage_errors(ref: str) -> None:
    with pytest.raises(CliError) as info:
        normalize_import_ref(ref)
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    "url, tag",
    [
        ("docker://docker.io/library/ubuntu:24.04", "ubuntu:24.04"),
        ("docker://docker.io/bitnami/redis:7", "bitnami/redis:7"),
        ("docker://ghcr.io/o/app:1.2", "o/app:1.2"),
        ("docker://127.0.0.1:5000/a/b:v1", "a/b:v1"),
        ("docker://docker.io/library/alpine@sha256:" + "a" * 64, "alpine"),
        ("oci-archive:/srv/img.tar:v1", None),
    ],
)
def test_tags_are_derived_from_registry_refs(url: str, tag: str | None) -> None:
    assert derive_import_tag(url) == tag


def test_one_brace_group_expands() -> None:
    assert expand_braces("ubuntu:{22.04,24.04}") == ["ubuntu:22.04", "ubuntu:24.04"]
    assert expand_braces("{a,b}/x:{1,2}") == ["a/x:{1,2}", "b/x:{1,2}"]
    assert expand_braces("plain:tag") == ["plain:tag"]
    assert expand_braces("odd{x}") == ["odd{x}"]


def test_tag_query_is_split_off() -> None:
    assert split_tag_query("ubuntu:24.04?tag=mine:1") == ("ubuntu:24.04", "mine:1")
    assert split_tag_query("ubuntu") == ("ubuntu", None)
    with pytest.raises(CliError):
        split_tag_query("ubuntu?foo=1")


# --------------------------------------------------------------------------- real CLI


def rows_of(stdout: bytes) -> list[dict[str, str]]:
    # `-o json` prints one JSON object per row, one per line
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_import_archives_through_the_cli_prints_rows_and_progress(
    server: LocalServer, tmp_path: Path
) -> None:
    archive = write_oci_archive(tmp_path, runnable_image(), "v1")
    saved = write_docker_archive(
        tmp_path / "saved.tar", runnable_layers(uuid.uuid4().hex), RUN_CONFIG
    )
    env = server.session_env()
    # Relative paths: the CLI makes them absolute against its own cwd.
    result = subprocess_in(
        server, tmp_path, env,
        "-o", "json", "images", "import",
        "oci-archive:image.oci.tar:v1?tag=cli-import/oci:1", "docker-archive:saved.tar",
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    rows = rows_of(result.stdout)
    assert [r["status"] for r in rows] == ["SUCCESS", "SUCCESS"]
    assert rows[0]["registry_url"] == f"oci-archive:{archive}:v1"
    assert rows[0]["tag"] == "cli-import/oci:1"
    assert rows[1]["registry_url"] == f"docker-archive:{saved}"
    assert rows[1]["tag"] == ""
    assert set(rows[0]) == {"uuid", "status", "registry_url", "image", "tag"}
    err = result.stderr.decode()
    assert "[cli-import/oci:1] " in err and "layer 2/2" in err

    use = server.contree("use", "tag:cli-import/oci:1", env=env)
    assert use.returncode == 0, use.stderr.decode(errors="replace")
    run = server.contree("run", "--", "cat", "/etc/greeting", env=env)
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    assert run.stdout == b"hello v2\n"


def test_failed_import_exits_1_with_the_reason(server: LocalServer, tmp_path: Path) -> None:
    result = server.contree(
        "-o", "json", "images", "import", f"oci-archive:{tmp_path / 'missing.tar'}"
    )
    assert result.returncode == 1
    rows = rows_of(result.stdout)
    assert rows[0]["status"] == "FAILED"
    assert "no such file or directory" in result.stderr.decode()
    assert "Traceback" not in result.stderr.decode()


def test_tag_flag_needs_a_single_ref(server: LocalServer) -> None:
    result = server.contree("images", "import", "--tag", "x:1", "a:{1,2}")
    assert result.returncode == 2
    assert b"--tag needs exactly one REF" in result.stderr


def test_username_without_password_reads_it_from_stdin_when_not_a_tty(
    server: LocalServer, tmp_path: Path
) -> None:
    archive = write_oci_archive(tmp_path, runnable_image(), "v1")
    result = server.contree(
        "-o", "json", "images", "import", "--username", "bob", f"oci-archive:{archive}:v1",
        input=b"pw-from-stdin\n",
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    op = rows_of(result.stdout)[0]["uuid"]
    with server.http() as http:
        creds = http.get(f"/v1/operations/{op}").json()["metadata"]["registry"]["credentials"]
    assert creds == {"username": "bob", "password": "<MASKED>"}
    empty = server.contree("images", "import", "--username", "bob", f"oci-archive:{archive}")
    assert empty.returncode == 2
    assert b"needs a password" in empty.stderr


def subprocess_in(
    server: LocalServer, cwd: Path, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[bytes]:
    """Run `contree` with `cwd` as its working directory (for relative local paths)."""
    return subprocess.run(
        [sys.executable, "-m", "contree_shell", *args],
        env=env, input=b"", capture_output=True, timeout=120, cwd=str(cwd),
    )



def test_ctrl_c_cancels_every_pending_import(server: LocalServer, tmp_path: Path) -> None:
    blocked = [blocked_layout(tmp_path / name) for name in ("one", "two")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "contree_shell", "-o", "json", "images", "import",
         *(f"oci:{layout}:v1" for layout, _, _ in blocked)],
        env=server.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, cwd=str(server.config),
    )
    assert proc.stderr is not None and proc.stdout is not None
    ops: list[str] = []
    seen = b""
    for line in proc.stderr:  # wait until the CLI follows the first import, blocked
        seen += line
        if b"(operation " in line:
            ops.append(line.split(b"(operation ")[1].split(b")")[0].decode())
        if b"layer 1/2" in line:
            break
    assert len(ops) == 2, seen.decode(errors="replace")
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, (seen + rest).decode(errors="replace")
    proc.stdout.close()
    proc.stderr.close()
    assert b"Cancelled 2 imports" in rest
    with server.http() as http:
        for op in ops:
            assert wait_done(http, op)["status"] == "CANCELLED"
    for _, fifo, data in blocked:
        release(fifo, data, server)
