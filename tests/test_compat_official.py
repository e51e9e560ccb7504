"""The official clients, unchanged, against our server over TCP with a bearer token.

A virtualenv with the pinned official packages (contree-cli, contree-sdk, contree-mcp)
is created once and cached under $CONTREE_TEST_CACHE (default: the temp dir); without
PyPI the whole module is skipped with the reason. Every item drives the real client
program or library from that venv: the CLI as a subprocess with its own CONTREE_HOME,
the SDK and the MCP tools through small scripts run by the venv's python.
"""


from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_server_support import ApiServer, import_busybox, start_api_server

PINS = ["contree-cli==0.9.4", "contree-sdk==0.3.6", "contree-mcp==0.5.0"]
# contree-mcp 0.5.0 imports mcp.server.fastmcp, which mcp 2.x renamed; it does not pin.
EXTRA_PINS = ["mcp<2"]


def _cache_root() -> Path:
    base = os.environ.get("CONTREE_TEST_CACHE") or tempfile.gettempdir()
    key = hashlib.sha256(" ".join(PINS + EXTRA_PINS + [sys.version]).encode()).hexdigest()[:12]
    return Path(base) / f"contree-official-clients-{key}"


@pytest.fixture(scope="session")
def official_venv() -> Path:
    """A venv holding the official clients (built once, reused across sessions)."""
    root = _cache_root()
    venv = root / "venv"
    done = root / "complete"
    if done.exists() and (venv / "bin" / "contree").exists():
        return venv
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True,
                   capture_output=True)
    try:
        proc = subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
             "--disable-pip-version-check", *PINS, *EXTRA_PINS],
            capture_output=True, text=True, timeout=600,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("cannot install the official clients: PyPI did not answer within 10 min")
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        pytest.skip(f"cannot install the official clients from PyPI: {tail[0]}")
    done.write_text("\n".join(PINS + EXTRA_PINS) + "\n")
    return venv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Compat:
    server: ApiServer
    url: str
    token: str
    venv: Path
    home: Path  # the CLI's CONTREE_HOME
    busybox: str

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("CONTREE_", "NEBIUS_", "XDG_"))}
        env.update(CONTREE_HOME=str(self.home), CONTREE_SESSION="compat-tests",
                   URL=self.url, TOKEN=self.token, NO_COLOR="1", HOME=str(self.home))
        return env

    def cli(self, *args: str, input: str | None = None, ok: bool = True,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(self.venv / "bin" / "contree"), "-L", "warning", *args],
                              input=input if input is not None else "", capture_output=True,
                              text=True, env=self.env(), timeout=120, cwd=cwd)
        if ok:
            assert proc.returncode == 0, (args, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def json_lines(self, *args: str) -> list[dict[str, Any]]:
        out = self.cli("-o", "json", *args).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def script(self, code: str) -> str:
        proc = subprocess.run([str(self.venv / "bin" / "python"), "-c", textwrap.dedent(code)],
                              capture_output=True, text=True, env=self.env(), timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout


@pytest.fixture(scope="module")
def compat(official_venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Compat]:
    if os.geteuid() != 0:
        pytest.skip("the sandbox engine needs root")
    port = _free_port()
    base = tmp_path_factory.mktemp("compat")
    srv = start_api_server(base, "--listen", f"127.0.0.1:{port}",
                           env={"CONTREE_DEFAULT_NETWORKING": "0"})
    try:
        with srv.http() as http:
            busybox = import_busybox(http)
        token = (srv.home / "token").read_text().strip()
        home = base / "cli-home"
        home.mkdir()
        c = Compat(srv, f"http://127.0.0.1:{port}", token, official_venv, home, busybox)
        c.cli("auth", "--token", token, "-u", c.url, "--type", "jwt")
        c.cli("use", "busybox:latest")
        yield c
    finally:
        srv.stop()


# --------------------------------------------------------------------------- auth


def test_tcp_needs_the_exact_token_and_project_header_is_optional(compat: Compat) -> None:
    with httpx.Client(base_url=compat.url) as http:
        assert http.get("/v1/whoami").status_code == 401
        bad = http.get("/v1/whoami", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["status"] == 401
        assert http.get("/v1/whoami", headers={"Authorization": compat.token}).status_code == 401
        good = {"Authorization": f"Bearer {compat.token}"}
        assert http.get("/v1/whoami", headers=good).status_code == 200
        with_project = dict(good, Project="some-project-id")
        assert http.get("/v1/whoami", headers=with_project).status_code == 200


def test_cli_auth_iam_with_a_project_is_accepted(compat: Compat, tmp_path: Path) -> None:
    home = tmp_path / "iam"
    home.mkdir()
    env = dict(compat.env(), CONTREE_HOME=str(home))
    proc = subprocess.run(
        [str(compat.venv / "bin" / "contree"), "-L", "warning", "auth", "--token", compat.token,
         "-u", compat.url, "--type", "iam", "-P", "project-1", "-p", "iam"],
        capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(
        [str(compat.venv / "bin" / "contree"), "-L", "warning", "-p", "iam", "images"],
        capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0 and "busybox:latest" in proc.stdout, proc.stderr
    proc = subprocess.run(
        [str(compat.venv / "bin" / "contree"), "-L", "warning", "auth", "--token", "wrong",
         "-u", compat.url, "--type", "jwt", "-p", "bad"],
        capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode != 0


# --------------------------------------------------------------------------- cli run


def test_cli_run_output_exit_code_and_stdin(compat: Compat) -> None:
    proc = compat.cli("run", "--", "sh", "-c", "echo out; echo err >&2; exit 3", ok=False)
    assert proc.returncode == 3
    assert proc.stdout == "out\n" and "err" in proc.stderr
    assert compat.cli("run", "--", "cat", input="piped input\n").stdout == "piped input\n"


def test_cli_run_file_env_cwd(compat: Compat, tmp_path: Path) -> None:
    src = tmp_path / "hello.txt"
    src.write_text("from the host\n")
    out = compat.cli("run", "-F", f"{src}:/data/hello.txt", "-D", "--", "cat", "/data/hello.txt")
    assert out.stdout == "from the host\n"
    out = compat.cli("run", "-e", "FOO=bar", "-C", "/tmp", "-D", "--", "sh", "-c", "echo $FOO; pwd")
    assert out.stdout == "bar\n/tmp\n"


def test_cli_run_disposable_keeps_nothing_and_plain_run_advances(compat: Compat) -> None:
    compat.cli("run", "-D", "--", "sh", "-c", "echo gone > /tmp/disposable")
    compat.cli("run", "--", "sh", "-c", "echo kept > /tmp/kept")
    out = compat.cli("run", "-D", "--", "ls", "/tmp").stdout.split()
    assert "kept" in out and "disposable" not in out


def test_cli_run_interpreter_mode(compat: Compat, tmp_path: Path) -> None:
    script = tmp_path / "s.sh"
    script.write_text("#!/bin/sh\necho script says $0\n")
    assert "script says" in compat.cli("run", "-D", "-I", str(script)).stdout


def test_cli_detach_ps_show_kill_and_op_wait(compat: Compat) -> None:
    started = compat.json_lines("run", "-D", "-d", "--", "sleep", "60")
    op = started[0]["uuid"]
    active = [row["uuid"] for row in compat.json_lines("ps")]
    assert op in active
    assert op in compat.cli("show", op).stdout
    compat.cli("kill", op)
    waited = compat.cli("op", "wait", op, ok=False)
    assert op in waited.stdout
    assert "CANCELLED" in compat.cli("show", op).stdout
    done = compat.json_lines("run", "-D", "-d", "--", "true")[0]["uuid"]
    assert "SUCCESS" in compat.cli("op", "wait", done).stdout


# --------------------------------------------------------------------------- inspect


def test_cli_ls_cat_cp_grep(compat: Compat, tmp_path: Path) -> None:
    assert "passwd" in compat.cli("ls", "/etc").stdout
    assert compat.cli("cat", "/etc/passwd").stdout.startswith("root:")
    dest = tmp_path / "pw"
    compat.cli("cp", "/etc/passwd", str(dest))
    assert dest.read_text().startswith("root:")
    found = compat.cli("grep", "root", "/etc").stdout
    assert "/etc/passwd:1:root" in found
    missing = compat.cli("cat", "/no/such/file", ok=False)
    assert missing.returncode != 0


def test_cli_export_gzip_and_plain(compat: Compat, tmp_path: Path) -> None:
    gz = tmp_path / "etc.tgz"
    compat.cli("export", "-F", str(gz), "/etc")
    with tarfile.open(gz, "r:gz") as tar:
        names = tar.getnames()
    assert "etc/passwd" in names
    plain = tmp_path / "pw.tar"
    compat.cli("export", "--decompress", "-F", str(plain), "/etc/passwd")
    with tarfile.open(plain, "r:") as tar:
        assert tar.getnames() == ["passwd"]
        member = tar.extractfile("passwd")
        assert member is not None and member.read().startswith(b"root:")


def test_cli_images_and_tag(compat: Compat) -> None:
    assert "busybox:latest" in compat.cli("images").stdout
    compat.cli("tag", compat.busybox, "compat/tagged:1")
    rows = compat.json_lines("images")
    assert any(r["tag"] == "compat/tagged:1" and r["uuid"] == compat.busybox for r in rows)


# --------------------------------------------------------------------------- sessions


def test_cli_session_branch_checkout_rollback(compat: Compat) -> None:
    env_session = ["-S", "compat-branches"]
    compat.cli(*env_session, "use", "busybox:latest")
    compat.cli(*env_session, "run", "--", "sh", "-c", "echo main > /which")
    compat.cli(*env_session, "session", "branch", "side")
    compat.cli(*env_session, "session", "checkout", "side")
    compat.cli(*env_session, "run", "--", "sh", "-c", "echo side > /which")
    assert compat.cli(*env_session, "cat", "/which").stdout == "side\n"
    compat.cli(*env_session, "session", "checkout", "main")
    assert compat.cli(*env_session, "cat", "/which").stdout == "main\n"
    compat.cli(*env_session, "session", "rollback", "-1")
    assert compat.cli(*env_session, "cat", "/which", ok=False).returncode != 0


# --------------------------------------------------------------------------- sdk + mcp


SDK_SYNC = """
import os, tempfile
from pathlib import Path
from contree_sdk import ContreeSync

client = ContreeSync(base_url=os.environ["URL"], token=os.environ["TOKEN"])
img = client.images.use("busybox:latest")
r = img.run(shell="echo hello; echo err >&2; exit 3").wait()
assert r.exit_code == 3 and r.stdout == "hello\\n" and r.stderr == "err\\n", r
r2 = img.run(shell="echo one > /f1", disposable=False).wait()
r3 = r2.run(shell="cat /f1; echo two >> /f1", disposable=False).wait()
assert r3.stdout == "one\\n", r3.stdout
assert r3.read("/f1") == b"one\\ntwo\\n"
assert img.run(shell="cat", stdin="piped\\n").wait().stdout == "piped\\n"
assert any("bin" in str(getattr(e, "name", e)) for e in img.ls("/"))
assert img.read("/etc/passwd").startswith(b"root:")
with tempfile.TemporaryDirectory() as d:
    img.download("/etc/passwd", Path(d) / "pw")
    assert (Path(d) / "pw").read_bytes().startswith(b"root:")
s = img.session()
s.run(shell="echo s1 > /sess", disposable=False).wait()
assert s.run(shell="cat /sess", disposable=False).wait().stdout == "s1\\n"
out, err = img.popen("echo popen-out", shell=True).communicate()
assert out == "popen-out\\n", out
print("SDK SYNC OK")
"""

SDK_ASYNC_AND_CLIENT = """
import asyncio, os, time
from contree_sdk import Contree

async def main():
    client = Contree(base_url=os.environ["URL"], token=os.environ["TOKEN"])
    img = await client.images.use("busybox:latest")
    r = await img.run(shell="echo async; exit 4")
    assert r.exit_code == 4 and r.stdout == "async\\n", (r.exit_code, r.stdout)
    a = await img.run(shell="echo x > /chain", disposable=False)
    b = await a.run(shell="cat /chain")
    assert b.stdout == "x\\n" and (await a.read("/chain")) == b"x\\n"
    assert await img.ls("/etc")

asyncio.run(main())
print("SDK ASYNC OK")

# Extra processes through the official low-level client (no CLI/SDK feature uses them).
from contree_client.httpx import ContreeClient
from contree_client.models import ClosableStreamRepr

c = ContreeClient(os.environ["TOKEN"], base_url=os.environ["URL"], project="any-project")
assert c.whoami()
op = str(c.spawn_instance("sleep 60", str(c.resolve_image("busybox:latest")), shell=True).uuid)
deadline = time.monotonic() + 30
while str(c.get_operation_status(op).status).split(".")[-1].upper() != "EXECUTING":
    assert time.monotonic() < deadline
    time.sleep(0.05)
spid = c.operation_subprocess_create(op, "cat", stdin=ClosableStreamRepr(value="a\\n", close=False))
assert spid == 2, spid
c.operation_subprocess_stdin(op, spid, "b\\n", close=True)
while (res := c.operation_subprocess(op, spid)).state.exit_code == -1:
    assert time.monotonic() < deadline
    time.sleep(0.05)
assert res.stdout.value == "a\\nb\\n", res.stdout
spid2 = c.operation_subprocess_create(op, "sleep", args=["100"])
c.operation_subprocess_kill(op, spid2, signal="TERM")
while c.operation_subprocess(op, spid2).state.signal != 15:
    assert time.monotonic() < deadline
    time.sleep(0.05)
c.cancel_operation(op)
print("CLIENT SUBPROCESSES OK")
"""

MCP_TOOLS = """
import asyncio, os, tempfile
from pathlib import Path
from contree_mcp.cache import Cache
from contree_mcp.client import ContreeClient
from contree_mcp.context import CLIENT, FILES_CACHE
from contree_mcp.file_cache import FileCache
from contree_mcp.tools.download import download
from contree_mcp.tools.get_image import get_image
from contree_mcp.tools.list_files import list_files
from contree_mcp.tools.read_file import read_file
from contree_mcp.tools.rsync import rsync
from contree_mcp.tools.run import run
from contree_mcp.tools.set_tag import set_tag
from contree_mcp.tools.upload import upload
from contree_mcp.tools.wait_operations import wait_operations

def dump(x):
    return x.model_dump() if hasattr(x, "model_dump") else x

async def main():
    work = Path(tempfile.mkdtemp())
    async with FileCache(db_path=work / "f.db") as fc, Cache(db_path=work / "c.db") as cache:
        client = ContreeClient(token=os.environ["TOKEN"], cache=cache, base_url=os.environ["URL"])
        async with client:
            CLIENT.set(client)
            FILES_CACHE.set(fc)
            uuid = dump(await get_image("tag:busybox:latest"))["uuid"]
            out = dump(await run(command="echo hi; cat /etc/hostname", image=uuid))
            assert out["stdout"] == "hi\\nlinuxkit\\n" and out["exit_code"] == 0, out
            up = dump(await upload(content="uploaded\\n"))
            out = dump(await run(command="cat /u.txt", image=uuid, files={"/u.txt": up["uuid"]}))
            assert out["stdout"] == "uploaded\\n", out
            src = work / "proj"
            (src / "sub").mkdir(parents=True)
            (src / "a.txt").write_text("alpha\\n")
            (src / "sub" / "b.txt").write_text("beta\\n")
            state = await rsync(source=str(src), destination="/app")
            out = dump(await run(command="cat /app/a.txt /app/sub/b.txt", image=uuid,
                                 directory_state_id=state, disposable=False))
            assert out["stdout"] == "alpha\\nbeta\\n", out
            new = out["result_image_uuid"]
            listing = dump(await list_files(image=new, path="/app"))
            assert {f["name"] for f in listing["files"]} == {"a.txt", "sub"}, listing
            assert dump(await read_file(image=new, path="/app/a.txt"))["content"] == "alpha\\n"
            dest = work / "dl" / "a.txt"
            assert dump(await download(image=new, path="/app/a.txt", destination=str(dest)))["success"]
            assert dest.read_text() == "alpha\\n"
            assert dump(await set_tag(image_uuid=new, tag="mcp/test/busybox"))["tag"] == "mcp/test/busybox"
            assert dump(await get_image("tag:mcp/test/busybox"))["uuid"] == new
            started = dump(await run(command="sleep 1; echo late", image=uuid, wait=False))
            op = started["operation_id"]
            waited = dump(await wait_operations(operation_ids=[op], timeout=60))
            assert waited["completed"] == [op], waited
            assert waited["results"][op]["stdout"] == "late\\n", waited

asyncio.run(main())
print("MCP OK")
"""


def test_sdk_sync_run_chain_session_popen_ls_read_download(compat: Compat) -> None:
    assert "SDK SYNC OK" in compat.script(SDK_SYNC)


def test_sdk_async_and_client_subprocesses(compat: Compat) -> None:
    out = compat.script(SDK_ASYNC_AND_CLIENT)
    assert "SDK ASYNC OK" in out and "CLIENT SUBPROCESSES OK" in out


def test_mcp_tools_run_rsync_upload_download_list_read_tag_wait(compat: Compat) -> None:
    assert "MCP OK" in compat.script(MCP_TOOLS)


# --------------------------------------------------------------------------- import


def test_cli_images_import_from_a_local_registry(compat: Compat,
                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.test_import_archives import runnable_image
    from tests.test_sandbox_oci import OCI_MANIFEST, run_registry

    with run_registry(tmp_path_factory.mktemp("registry")) as registry:
        image = runnable_image()
        registry.push("compat/app", "v1", image.manifest, OCI_MANIFEST, image.blobs)
        ref = f"docker://{registry.url}/compat/app:v1"
        proc = compat.cli("images", "import", ref, ok=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        tags = [r["tag"] for r in compat.json_lines("images")]
        imported = [t for t in tags if t and "compat/app" in t]
        assert imported, tags
        out = compat.cli("run", "-D", "--use", f"tag:{imported[0]}", "--", "cat", "/etc/greeting")
        assert out.stdout == "hello v2\n"
