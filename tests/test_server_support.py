"""A real local server for the server tests, driven with plain httpx over its socket.

The `api_server` fixture starts `python -m contree_shell server run --home <tmp>` as its
own process (one per test module) and imports `busybox:latest` through the API.
Waiting is always done on the server's event stream, never by sleeping.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
TERMINAL = ("SUCCESS", "FAILED", "CANCELLED")


def _die_with_parent() -> None:
    """A test server gets SIGTERM (a graceful stop) if the test process dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


@dataclass
class ApiServer:
    """One running server process and its home."""

    home: Path
    process: subprocess.Popen[bytes] | None = None
    busybox: str = ""
    extra_args: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def socket(self) -> Path:
        return self.home / "server.sock"

    def http(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)),
                            base_url="http://contree", timeout=timeout)

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONTREE_", "XDG_"))}
        env["PYTHONPATH"] = str(REPO)
        env.update(self.extra_env)
        log = open(self.home.parent / "server-test.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "contree_shell.server.cli", "run", "--home", str(self.home),
             "--log-level", "warning", *self.extra_args],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.close()
        # The socket appearing is a filesystem event with nothing to await on; the
        # short poll is bounded and also notices a crashed server at once.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                text = (self.home.parent / "server-test.log").read_text(errors="replace")
                raise RuntimeError(f"server exited {self.process.returncode}: {text[-2000:]}")
            if self.socket.exists():
                try:
                    with self.http(timeout=2) as c:
                        if c.get("/v1/whoami").status_code == 200:
                            return
                except httpx.HTTPError:
                    pass
            time.sleep(0.02)
        raise RuntimeError("server did not answer within 30 s")

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        code = self.process.returncode
        self.process = None
        return code


def start_api_server(base: Path, *extra_args: str,
                     env: dict[str, str] | None = None) -> ApiServer:
    home = base / "home"
    home.mkdir(parents=True, exist_ok=True)
    srv = ApiServer(home=home, extra_args=list(extra_args), extra_env=dict(env or {}))
    srv.start()
    return srv


def sse_events(http: httpx.Client, op: str, *, follow: bool = True,
               headers: dict[str, str] | None = None, **params: Any) -> Iterator[dict[str, Any]]:
    """Parse the SSE stream of `op` into event dicts (frames checked on the way)."""
    query = {k: str(v) for k, v in params.items()}
    if follow:
        query["follow"] = "1"
    with http.stream("GET", f"/v1/operations/{op}/events", params=query,
                     headers=headers or {}) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        frame: dict[str, str] = {}
        for line in resp.iter_lines():
            if line == "":
                if "data" in frame:
                    ev = json.loads(frame["data"])
                    assert frame["event"] == ev["type"]
                    assert int(frame["id"]) == ev["id"]
                    yield ev
                frame = {}
                continue
            if line.startswith(":"):
                continue
            key, _, value = line.partition(": ")
            frame[key] = value


def wait_done(http: httpx.Client, op: str) -> dict[str, Any]:
    """Follow the event stream to `completion`, then return the operation."""
    for ev in sse_events(http, op):
        if ev["type"] == "completion":
            break
    body: dict[str, Any] = http.get(f"/v1/operations/{op}").json()
    assert body["status"] in TERMINAL, body
    return body


def spawn(http: httpx.Client, image: str, command: str, **fields: Any) -> str:
    """POST /v1/instances (shell mode unless told) and return the operation uuid."""
    payload = {"image": image, "command": command, "shell": True, **fields}
    resp = http.post("/v1/instances", json=payload)
    assert resp.status_code == 201, resp.text
    assert resp.headers["location"] == f"/v1/operations/{resp.json()['uuid']}"
    return str(resp.json()["uuid"])


def run(http: httpx.Client, image: str, command: str, **fields: Any) -> dict[str, Any]:
    return wait_done(http, spawn(http, image, command, **fields))


def import_busybox(http: httpx.Client, tag: str = "busybox:latest") -> str:
    resp = http.post("/v1/images/import", json={"registry": {"url": "busybox:"}, "tag": tag})
    assert resp.status_code == 201, resp.text
    op = wait_done(http, resp.json()["uuid"])
    assert op["status"] == "SUCCESS", op
    return str(op["result"]["image"])


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """A real server for one test module, with busybox:latest imported."""
    if os.geteuid() != 0:
        pytest.skip("the sandbox engine needs root")
    srv = start_api_server(tmp_path_factory.mktemp("api"))
    try:
        with srv.http() as http:
            srv.busybox = import_busybox(http)
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def http(api_server: ApiServer) -> Iterator[httpx.Client]:
    with api_server.http() as client:
        yield client


def test_support_server_answers_whoami_with_every_permission(http: httpx.Client) -> None:
    body = http.get("/v1/whoami").json()
    assert {"token_uuid", "token_expiration", "permissions", "operations_stat"} <= set(body)
    assert body["permissions"]["list"] is True
    assert all(body["permissions"].values())
