"""Shared fixtures: a real local server on a temporary socket, with a tiny busybox image.

The server runs as its own process (`python -m contree_shell server run`), exactly as
users start it, and the tests talk to it over its unix socket. Nothing here is mocked.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from contree_shell.sandbox.bootstrap import build_busybox_rootfs

REPO = Path(__file__).resolve().parent.parent


def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the sandbox engine tests run as root")


@pytest.fixture(scope="session")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox root filesystem, built once per session, for the engine tests (the
    runs mount it read-only as their bottom layer)."""
    _needs_root()
    if not Path("/bin/busybox").exists():
        pytest.skip("busybox-static is not installed")
    root = tmp_path_factory.mktemp("image") / "rootfs"
    build_busybox_rootfs(root)
    return root


@dataclass
class LocalServer:
    """A running `contree server` and the environment that points clients at it."""

    home: Path
    config: Path
    process: subprocess.Popen[bytes]
    busybox: str = ""
    env: dict[str, str] = field(default_factory=dict)

    @property
    def socket(self) -> Path:
        return self.home / "server.sock"

    @property
    def output(self) -> Path:
        """What the server printed (its stdout and stderr)."""
        return self.home.parent / "server-output.log"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def http(self) -> httpx.Client:
        """A plain httpx client on the server's socket (for assertions on the raw API)."""
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)),
            base_url="http://contree",
            timeout=60.0,
        )

    def session_env(self, **extra: str) -> dict[str, str]:
        """The server env plus a fresh session key, so tests never share a session."""
        env = dict(self.env)
        env["CONTREE_SESSION"] = f"test-{uuid.uuid4().hex[:12]}"
        env.update(extra)
        return env

    def contree(
        self, *args: str, env: dict[str, str] | None = None, input: bytes | None = None,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run the real `contree` command against this server."""
        return subprocess.run(
            [sys.executable, "-m", "contree_shell", *args],
            env=env or self.env,
            input=input if input is not None else b"",
            capture_output=True,
            timeout=timeout,
            cwd=str(self.config),
        )


def _wait_for_socket(server: LocalServer, deadline: float) -> None:
    last_error = "socket never appeared"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            log = (server.home / "server.log").read_text(errors="replace") if (
                server.home / "server.log"
            ).exists() else ""
            out = server.output.read_text(errors="replace") if server.output.exists() else ""
            raise RuntimeError(f"server exited with {server.process.returncode}: {out}{log}")
        if server.socket.exists():
            try:
                with server.http() as http:
                    if http.get("/v1/whoami").status_code == 200:
                        return
            except httpx.HTTPError as exc:
                last_error = str(exc)
        time.sleep(0.05)
    raise RuntimeError(f"server did not answer: {last_error}")


def wait_operation(http: httpx.Client, op: str, timeout: float = 120.0) -> dict:
    """Poll an operation until it is terminal (used only by fixtures)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = http.get(f"/v1/operations/{op}").json()
        if body["status"] in ("SUCCESS", "FAILED", "CANCELLED"):
            return body
        time.sleep(0.05)
    raise TimeoutError(op)


def start_server(base: Path) -> LocalServer:
    """Start a real server with its home and client config under `base`."""
    home = base / "server"
    config = base / "config"
    home.mkdir(parents=True)
    config.mkdir(parents=True)
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("CONTREE_", "XDG_"))
    }
    env.update(
        CONTREE_SERVER_HOME=str(home),
        CONTREE_HOME=str(config),
        XDG_CONFIG_HOME=str(base / "xdg-config"),
        XDG_DATA_HOME=str(base / "xdg-data"),
        XDG_CACHE_HOME=str(base / "xdg-cache"),
        CONTREE_NO_UPDATE_CHECK="1",
        PYTHONPATH=str(REPO),
    )
    # Its output goes to a file: a pipe nobody drains would block the server's logging
    # (and with it the background squasher) once 64 KiB of log lines piled up.
    with open(base / "server-output.log", "ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "contree_shell", "server", "run"],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = LocalServer(home=home, config=config, process=process, env=env)
    try:
        _wait_for_socket(server, time.monotonic() + 30)
    except Exception:
        stop_server(server)
        raise
    return server


def import_busybox(server: LocalServer) -> str:
    """Import the tiny test image through the API and return its uuid."""
    with server.http() as http:
        resp = http.post(
            "/v1/images/import",
            json={"registry": {"url": "busybox:"}, "tag": "busybox:latest"},
        )
        assert resp.status_code == 201, resp.text
        op = wait_operation(http, resp.json()["uuid"])
        assert op["status"] == "SUCCESS", op
        return str(op["result"]["image"])


def stop_server(server: LocalServer) -> None:
    """Stop the server gracefully, then make sure nothing of it is left."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(timeout=10)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """A real local server shared by the whole test session, with `busybox:latest`."""
    _needs_root()
    srv = start_server(tmp_path_factory.mktemp("contree"))
    try:
        srv.busybox = import_busybox(srv)
        yield srv
    finally:
        stop_server(srv)


@pytest.fixture
def session_env(server: LocalServer) -> dict[str, str]:
    """Environment for one test's own session on the shared server, using busybox."""
    env = server.session_env()
    result = server.contree("use", "tag:busybox:latest", env=env)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return env
