"""Imports from a real local registry through the real CLI and server.

Debian's `docker-registry` runs on a free loopback port (filesystem storage in tmp, no
auth unless a test asks for htpasswd); a small multi-layer image with a whiteout is built
by hand and pushed over the v2 API (helpers from test_sandbox_oci), then imported with
`contree images import`, used and run.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LocalServer
from tests.test_import_archives import RUN_CONFIG, runnable_image, runnable_layers
from tests.test_sandbox_oci import (
    DOCKER_MANIFEST,
    OCI_MANIFEST,
    Registry,
    build_image,
    run_registry,
)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with run_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg
    assert reg.process.poll() is not None  # stopped: no orphan registry


def rows_of(stdout: bytes) -> list[dict[str, str]]:
    # `-o json` prints one JSON object per row, one per line
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def cli_ok(server: LocalServer, *args: str, env: dict[str, str] | None = None) -> bytes:
    result = server.contree(*args, env=env)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def test_registry_image_imports_runs_and_reimports_as_the_same_image(
    server: LocalServer, registry: Registry
) -> None:
    image = runnable_image()
    registry.push("contree/app", "v1", image.manifest, OCI_MANIFEST, image.blobs)
    ref = f"docker://{registry.url}/contree/app:v1"
    result = server.contree("-o", "json", "images", "import", ref, "--tag", "reg/app:v1")
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    (row,) = rows_of(result.stdout)
    assert row["status"] == "SUCCESS"
    assert row["registry_url"] == ref
    assert row["tag"] == "reg/app:v1"
    first = row["image"]
    err = result.stderr.decode()
    assert "layer 1/2" in err and "layer 2/2" in err  # progress followed live on stderr

    env = server.session_env()
    cli_ok(server, "use", "tag:reg/app:v1", env=env)
    assert cli_ok(server, "run", "--", "cat", "/etc/greeting", env=env) == b"hello v2\n"
    listing = cli_ok(server, "run", "--", "ls", "/etc", env=env).decode().split()
    assert "greeting" in listing and "doomed" not in listing  # whited out by layer 2
    assert cli_ok(server, "run", "--", "pwd", env=env) == b"/srv/app\n"  # WORKDIR kept

    again = server.contree("-o", "json", "images", "import", ref, "--tag", "reg/app:v1")
    assert again.returncode == 0, again.stderr.decode(errors="replace")
    (row2,) = rows_of(again.stdout)
    assert row2["image"] == first
    assert row2["uuid"] != row["uuid"]
    assert "is unchanged" in again.stderr.decode()


def test_short_refs_are_normalised_and_tags_derived(
    server: LocalServer, registry: Registry
) -> None:
    name = f"contree/short-{uuid.uuid4().hex[:8]}"
    image = build_image(runnable_layers(uuid.uuid4().hex), RUN_CONFIG, docker=True)
    registry.push(name, "1.0", image.manifest, DOCKER_MANIFEST, image.blobs)
    # No scheme, no tag → docker://HOST/NAME:latest would 404; {1.0,1.0} covers braces
    # and importing the same image twice in one command.
    result = server.contree("-o", "json", "images", "import", f"{registry.url}/{name}:{{1.0,1.0}}")
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    rows = rows_of(result.stdout)
    assert [r["registry_url"] for r in rows] == [f"docker://{registry.url}/{name}:1.0"] * 2
    assert [r["tag"] for r in rows] == [f"{name}:1.0"] * 2
    assert rows[0]["image"] == rows[1]["image"]
    with server.http() as http:
        loc = http.get("/v1/inspect/", params={"tag": f"{name}:1.0"}).headers["location"]
    assert loc == f"/v1/inspect/{rows[0]['image']}/"

    missing = server.contree("-o", "json", "images", "import", f"{registry.url}/{name}")
    assert missing.returncode == 1
    assert rows_of(missing.stdout)[0]["status"] == "FAILED"
    assert "Traceback" not in missing.stderr.decode()


def test_registry_with_basic_auth_takes_credentials_and_masks_them(
    server: LocalServer, tmp_path: Path
) -> None:
    with run_registry(tmp_path, htpasswd=("alice", "wonderland")) as reg:
        image = runnable_image()
        reg.push("private/app", "v1", image.manifest, OCI_MANIFEST, image.blobs)
        ref = f"docker://{reg.url}/private/app:v1"

        anonymous = server.contree("images", "import", ref)
        assert anonymous.returncode == 1
        assert "Traceback" not in anonymous.stderr.decode()

        ok = server.contree(
            "-o", "json", "images", "import", ref, "--username", "alice", "--password",
            "wonderland",
        )
        assert ok.returncode == 0, ok.stderr.decode(errors="replace")
        (row,) = rows_of(ok.stdout)
        with server.http() as http:
            op = http.get(f"/v1/operations/{row['uuid']}").json()
        assert op["metadata"]["registry"]["credentials"] == {
            "username": "alice",
            "password": "<MASKED>",
        }
        assert "wonderland" not in json.dumps(op)
    assert reg.process.poll() is not None
