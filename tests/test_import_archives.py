"""Image imports from local archives through the real server's API.

An OCI layout tar (`oci-archive:`) and a `docker save` tar (`docker-archive:`) are built
by hand here (the image and archive writers come from test_sandbox_oci), imported with
`POST /v1/images/import`, and the result is run. The image is runnable: its bottom layer
holds the host's static busybox, the top layer rewrites one file and whites out another.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from contree_shell.client.streams import decode_stream
from tests.conftest import LocalServer
from tests.test_sandbox_oci import (
    OCI_MANIFEST,
    Entry,
    Image,
    build_image,
    d,
    f,
    make_tar,
    write_docker_archive,
    write_layout,
)
from tests.test_server_support import sse_events, wait_done

BUSYBOX = "/bin/busybox"

pytestmark = pytest.mark.skipif(
    not os.path.exists(BUSYBOX), reason="needs the host's static busybox (busybox-static)"
)

RUN_CONFIG = {
    "Env": ["PATH=/bin", "GREETING=from-config"],
    "WorkingDir": "/srv/app",
    "Cmd": ["/bin/sh"],
}


def runnable_layers(nonce: str) -> list[bytes]:
    """Two layers: busybox + files, then a rewrite, a whiteout and a nonce (so each test
    image has its own digest on the shared server)."""
    busybox = Path(BUSYBOX).read_bytes()
    applets = ["sh", "cat", "ls", "test", "echo", "pwd", "id"]
    l1 = make_tar(
        [
            d("bin"),
            f("bin/busybox", busybox, mode=0o755),
            *[Entry(f"bin/{a}", "sym", target="busybox") for a in applets],
            d("etc"),
            f("etc/greeting", b"hello v1\n"),
            f("etc/doomed", b"delete me\n"),
            d("srv"),
            d("srv/app"),
        ]
    )
    l2 = make_tar(
        [
            d("etc"),
            f("etc/.wh.doomed", b""),
            f("etc/greeting", b"hello v2\n"),
            f("etc/nonce", nonce.encode()),
        ]
    )
    return [l1, l2]


def runnable_image(config: dict[str, Any] | None = None) -> Image:
    """A runnable two-layer OCI image with a fresh digest."""
    return build_image(runnable_layers(uuid.uuid4().hex), config or RUN_CONFIG)


def write_oci_archive(tmp: Path, image: Image, tag: str) -> Path:
    """An OCI layout tar holding `image` under `tag`."""
    layout = write_layout(tmp / "layout", image.blobs, image.manifest, OCI_MANIFEST, tag)
    archive = tmp / "image.oci.tar"
    with tarfile.open(archive, "w") as tf:
        for p in sorted(layout.rglob("*")):
            tf.add(p, arcname=str(p.relative_to(layout)), recursive=False)
    shutil.rmtree(layout)
    return archive


def start_import(http: httpx.Client, url: str, tag: str | None = None, **extra: Any) -> str:
    body: dict[str, Any] = {"registry": {"url": url}, **extra}
    if tag is not None:
        body["tag"] = tag
    resp = http.post("/v1/images/import", json=body)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["uuid"])


def import_and_wait(http: httpx.Client, url: str, tag: str | None = None) -> dict[str, Any]:
    return wait_done(http, start_import(http, url, tag))


def run_in(http: httpx.Client, image: str, command: str) -> dict[str, Any]:
    """Run a shell command in `image` and return the finished operation."""
    resp = http.post(
        "/v1/instances",
        json={"image": image, "command": command, "shell": True, "disposable": True},
    )
    assert resp.status_code == 201, resp.text
    return wait_done(http, str(resp.json()["uuid"]))


def stdout_of(op: dict[str, Any]) -> str:
    assert op["status"] == "SUCCESS", op
    return str(op["metadata"]["result"]["stdout"]["value"])


def store_tmp(server: LocalServer) -> list[str]:
    """What an import may have left in the store's scratch dir."""
    tmp = server.home / "store" / "tmp"
    return sorted(os.listdir(tmp)) if tmp.is_dir() else []


@pytest.fixture
def http(server: LocalServer) -> Any:
    with server.http() as client:
        yield client


def test_oci_archive_import_runs_with_layers_whiteouts_and_config(
    server: LocalServer, http: httpx.Client, tmp_path: Path
) -> None:
    image = runnable_image()
    archive = write_oci_archive(tmp_path, image, "v1")
    op = import_and_wait(http, f"oci-archive:{archive}:v1", "import-test/oci:v1")
    assert op["status"] == "SUCCESS", op
    assert op["kind"] == "image_import"
    assert op["result"]["tag"] == "import-test/oci:v1"
    uuid_ = op["result_image_uuid"]
    assert op["result"]["image"] == uuid_
    loc = http.get("/v1/inspect/", params={"tag": "import-test/oci:v1"}).headers["location"]
    assert loc == f"/v1/inspect/{uuid_}/"

    out = stdout_of(run_in(http, uuid_, 'cat /etc/greeting; test -e /etc/doomed || echo gone; '
                                        'pwd; echo "$GREETING"'))
    assert out == "hello v2\ngone\n/srv/app\nfrom-config\n"

    progress = [ev for ev in sse_events(http, op["uuid"]) if ev["type"] == "stderr"]
    assert {ev["spid"] for ev in progress} == {0}
    lines = b"".join(decode_stream(ev["data"]) for ev in progress).decode()
    assert "2 layers" in lines and "layer 2/2" in lines


def test_docker_archive_import_and_reimport_gives_the_same_uuid(
    server: LocalServer, http: httpx.Client, tmp_path: Path
) -> None:
    layers = runnable_layers(uuid.uuid4().hex)
    archive = write_docker_archive(tmp_path / "saved.tar", layers, RUN_CONFIG)
    first = import_and_wait(http, f"docker-archive:{archive}", "import-test/docker:1")
    assert first["status"] == "SUCCESS", first
    out = stdout_of(run_in(http, first["result_image_uuid"], "cat /etc/greeting; ls /etc"))
    assert out.startswith("hello v2\n")
    assert "doomed" not in out

    again = import_and_wait(http, f"docker-archive:{archive}", "import-test/docker:2")
    assert again["status"] == "SUCCESS", again
    assert again["result_image_uuid"] == first["result_image_uuid"]
    assert again["uuid"] != first["uuid"]
    loc = http.get("/v1/inspect/", params={"tag": "import-test/docker:2"}).headers["location"]
    assert loc == f"/v1/inspect/{first['result_image_uuid']}/"
    assert store_tmp(server) == []


def test_unsafe_archive_fails_with_one_line_and_leaves_no_scratch_files(
    server: LocalServer, http: httpx.Client, tmp_path: Path
) -> None:
    evil = make_tar([d("etc"), f("etc/ok", b"x"), f("../escape", b"pwned")])
    image = build_image([runnable_layers(uuid.uuid4().hex)[0], evil], RUN_CONFIG)
    archive = write_oci_archive(tmp_path, image, "latest")
    op = import_and_wait(http, f"oci-archive:{archive}", "import-test/evil:1")
    assert op["status"] == "FAILED", op
    assert op["error"].startswith("import failed: ")
    assert "'..' component" in op["error"]
    assert "\n" not in op["error"]
    assert op["result_image_uuid"] is None
    assert http.get("/v1/inspect/", params={"tag": "import-test/evil:1"}).status_code == 404
    assert store_tmp(server) == []
    assert not (tmp_path.parent / "escape").exists()
    events = list(sse_events(http, op["uuid"]))
    assert events[-1]["type"] == "completion"
    assert events[-1]["data"]["status"] == "FAILED"


def test_missing_archive_is_a_failed_operation(http: httpx.Client, tmp_path: Path) -> None:
    op = import_and_wait(http, f"oci-archive:{tmp_path / 'nope.tar'}")
    assert op["status"] == "FAILED"
    assert "no such file or directory" in op["error"]


@pytest.mark.parametrize(
    "url, message",
    [
        ("oci-archive:relative/image.tar", "must be absolute"),
        ("docker://Bad Name", "invalid"),
        ("ftp://example/x", "unsupported registry URL"),
    ],
)
def test_bad_urls_are_400_with_the_reason(http: httpx.Client, url: str, message: str) -> None:
    resp = http.post("/v1/images/import", json={"registry": {"url": url}})
    assert resp.status_code == 400
    assert message in resp.json()["error"]


def test_credentials_are_masked_in_metadata_and_absent_from_the_log(
    server: LocalServer, http: httpx.Client, tmp_path: Path
) -> None:
    archive = write_oci_archive(tmp_path, runnable_image(), "v1")
    secret = f"s3cret-{uuid.uuid4().hex}"
    op_uuid = start_import(
        http,
        f"oci-archive:{archive}:v1",
        None,
        timeout=60,
    )
    op = wait_done(http, op_uuid)
    assert op["metadata"]["timeout"] == 60
    resp = http.post(
        "/v1/images/import",
        json={
            "registry": {
                "url": f"oci-archive:{archive}:v1",
                "credentials": {"username": "alice", "password": secret},
            }
        },
    )
    op = wait_done(http, resp.json()["uuid"])
    assert op["status"] == "SUCCESS", op
    assert op["metadata"]["registry"]["credentials"] == {
        "username": "alice",
        "password": "<MASKED>",
    }
    assert secret not in json.dumps(op)
    # Nothing the server keeps (operations DB and its WAL, logs) holds the password.
    for path in server.home.iterdir():
        if path.is_file() and not path.is_socket():
            assert secret.encode() not in path.read_bytes(), path.name


def blocked_layout(tmp: Path) -> tuple[Path, Path, bytes]:
    """An OCI layout whose top layer blob is a FIFO: the importer converts the bottom
    layer, then blocks opening the top one until the test writes it. Returns the layout,
    the FIFO and the bytes to write into it."""
    image = runnable_image()
    layout = write_layout(tmp / "layout", image.blobs, image.manifest, OCI_MANIFEST, "v1")
    top = json.loads(image.manifest)["layers"][-1]["digest"]
    fifo = layout / "blobs" / "sha256" / top.split(":")[1]
    data = fifo.read_bytes()
    fifo.unlink()
    os.mkfifo(fifo)
    return layout, fifo, data


def wait_for_progress(http: httpx.Client, op: str, text: str) -> None:
    for ev in sse_events(http, op):
        if ev["type"] == "stderr" and text in decode_stream(ev["data"]).decode():
            return
        assert ev["type"] != "completion", ev
    raise AssertionError(f"no progress line with {text!r}")


def release(fifo: Path, data: bytes, server: LocalServer) -> None:
    """Feed the FIFO to a worker blocked on it; return at once if the worker already
    ended without opening it (its scratch dir is gone)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
            if not store_tmp(server):
                return
            time.sleep(0.05)
            continue
        os.set_blocking(fd, True)
        with os.fdopen(fd, "wb") as w:
            w.write(data)
        return
    raise AssertionError("the import worker never opened the blocked layer")


def wait_scratch_removed(server: LocalServer) -> None:
    # The worker notices at its next progress line, then removes its scratch dir; no
    # API reports that moment, so poll the directory with a deadline.
    deadline = time.monotonic() + 30
    while store_tmp(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store_tmp(server) == []


def test_cancel_ends_the_import_at_once_and_the_worker_cleans_up(
    server: LocalServer, http: httpx.Client, tmp_path: Path
) -> None:
    layout, fifo, data = blocked_layout(tmp_path)
    op_uuid = start_import(http, f"oci:{layout}:v1", "import-test/cancelled:1")
    wait_for_progress(http, op_uuid, "layer 1/2")
    resp = http.delete(f"/v1/operations/{op_uuid}")
    assert resp.status_code == 202, resp.text
    op = wait_done(http, op_uuid)
    assert op["status"] == "CANCELLED"
    assert op["result_image_uuid"] is None
    release(fifo, data, server)  # let the blocked worker go on: it must stop, not finish
    wait_scratch_removed(server)
    assert http.get("/v1/inspect/", params={"tag": "import-test/cancelled:1"}).status_code == 404
    assert http.get(f"/v1/operations/{op_uuid}").json()["status"] == "CANCELLED"


def test_timeout_fails_the_import_with_a_one_line_reason(
    server: LocalServer, http: httpx.Client, tmp_path: Path
) -> None:
    layout, fifo, data = blocked_layout(tmp_path)
    op_uuid = start_import(http, f"oci:{layout}:v1", "import-test/timeout:1", timeout=1)
    op = wait_done(http, op_uuid)
    assert op["status"] == "FAILED"
    assert op["error"] == "import timed out after 1s"
    release(fifo, data, server)
    wait_scratch_removed(server)
    assert http.get("/v1/inspect/", params={"tag": "import-test/timeout:1"}).status_code == 404
