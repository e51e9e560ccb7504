"""The sandbox launcher: the small process every sandbox is forked from (run for real)."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from contree_shell.sandbox import nsinit
from contree_shell.sandbox.launcher import LAUNCHER
from contree_shell.sandbox.runtime import RunSpec, Sandbox

pytestmark = pytest.mark.root

ENV = {"PATH": "/bin"}
REPO = str(Path(__file__).resolve().parent.parent)


@pytest.fixture(scope="module")
def image(busybox_image: Path) -> Path:
    return busybox_image


def _start(image: Path, base: Path, command: str, out: bytearray | None = None) -> Sandbox:
    base.mkdir()
    (base / "u").mkdir()
    (base / "w").mkdir()
    sink = out if out is not None else bytearray()
    return Sandbox.start(lowers=[image], upper=base / "u", work=base / "w",
                         spec=RunSpec(argv=["sh", "-c", command], env=ENV, timeout=60,
                                      stdin_open=True),
                         on_output=lambda _s, c: sink.extend(c))  # fmt: skip


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _wait_gone(pids: list[int], timeout: float = 30) -> None:
    fds = []
    for pid in pids:
        try:
            fds.append(os.pidfd_open(pid))
        except ProcessLookupError:
            continue  # gone and reaped already
    try:
        waiting = set(fds)
        deadline = time.monotonic() + timeout
        while waiting:
            left = deadline - time.monotonic()
            assert left > 0, "still alive"
            ready, _, _ = select.select(list(waiting), [], [], left)
            waiting -= set(ready)
    finally:
        for fd in fds:
            os.close(fd)


def _command_pid(sb: Sandbox) -> int:
    """Host pid of the command of a running sandbox (a child of its pid 1)."""
    children = Path(f"/proc/{sb._pid1}/task/{sb._pid1}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def test_sandboxes_are_forked_by_the_launcher_not_by_the_server(
    image: Path, tmp_path: Path
) -> None:
    sb = _start(image, tmp_path / "r", "read x")
    try:
        assert sb.wait_exec(30)
        pid1 = sb._pid1
        assert _comm(pid1) == "contree-init"
        assert _ppid(_command_pid(sb)) == pid1
        owner = _ppid(pid1)
        assert owner == LAUNCHER.pid != os.getpid()
        assert _comm(owner) == "contree-launch"
        assert _ppid(owner) == os.getpid()
    finally:
        sb.close_stdin()
    info = sb.wait(30)
    assert info is not None and info.exit_code == 1


def test_a_killed_launcher_ends_its_runs_and_the_next_run_starts_a_new_one(
    image: Path, tmp_path: Path
) -> None:
    sb = _start(image, tmp_path / "a", "sleep 100")
    assert sb.wait_exec(30)
    old = LAUNCHER.pid
    assert old is not None
    pid1, command = sb._pid1, _command_pid(sb)
    os.kill(old, signal.SIGKILL)
    info = sb.wait(30)  # PDEATHSIG: the run is killed, and the server side notices
    assert info is not None
    assert info.exit_code is None and info.error is not None
    _wait_gone([pid1, command])

    out = bytearray()
    again = _start(image, tmp_path / "b", "echo fine", out)
    info = again.wait(30)
    assert info is not None and info.exit_code == 0, info
    assert out == b"fine\n"
    assert LAUNCHER.pid not in (None, old)


def test_the_launcher_and_its_sandboxes_die_with_the_server_process(
    image: Path, tmp_path: Path
) -> None:
    """A stand-in server (its own process) is SIGKILLed with a run in flight."""
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from contree_shell.sandbox.launcher import LAUNCHER
        from contree_shell.sandbox.runtime import RunSpec, Sandbox
        base = Path({str(tmp_path)!r})
        (base / "u").mkdir(); (base / "w").mkdir()
        sb = Sandbox.start(lowers=[Path({str(image)!r})], upper=base / "u", work=base / "w",
                           spec=RunSpec(argv=["sleep", "100"], env={{"PATH": "/bin"}},
                                        timeout=600),
                           on_output=lambda s, c: None)
        assert sb.wait_exec(30)
        print(LAUNCHER.pid, sb._pid1, flush=True)
        time.sleep(600)
    """)
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert len(line) == 2, line
        launcher_pid, pid1 = (int(x) for x in line)
        assert _ppid(pid1) == launcher_pid
        assert _ppid(launcher_pid) == proc.pid
        proc.kill()
        proc.wait(30)
        _wait_gone([launcher_pid, pid1])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_messages_keep_their_descriptors_and_survive_large_plans() -> None:
    """The framing: a payload far bigger than a socket buffer, with descriptors."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    payload = {"layers": [f"/store/layers/{i:040d}".encode() for i in range(30000)]}
    try:
        sender = threading.Thread(target=nsinit.send_message, args=(a, payload, [w]))
        sender.start()
        got = nsinit.recv_message(b, 4)
        sender.join()
        assert got is not None
        obj, fds = got
        assert obj == payload and len(fds) == 1
        os.write(fds[0], b"through")
        os.close(fds[0])
        os.close(w)
        assert os.read(r, 100) == b"through"
        a.close()
        assert nsinit.recv_message(b, 4) is None  # EOF
    finally:
        os.close(r)
        b.close()
        a.close()


def test_extra_processes_are_started_by_the_launcher_too(image: Path, tmp_path: Path) -> None:
    from contree_shell.sandbox.nsexec import NsProcess

    sb = _start(image, tmp_path / "r", "read x")
    try:
        assert sb.wait_exec(30)
        out = bytearray()
        extra = NsProcess.start(pid1=sb._pid1, argv=["sh", "-c", "echo $$; read y"],
                                env=ENV, cwd="/", uid=0, gid=0, stdin_open=True,
                                on_output=lambda _s, c: out.extend(c))  # fmt: skip
        try:
            helper = _ppid(extra._host_pid)
            assert _ppid(helper) == LAUNCHER.pid
            assert extra.pid == extra._host_pid or extra.pid < 100  # its namespace pid
        finally:
            extra.close_stdin()
        result = extra.wait(30)
        assert result is not None and result.exit_code == 1, result
        assert out.decode().strip() == str(extra.pid)
        _wait_gone([helper])
    finally:
        sb.close_stdin()
    info = sb.wait(30)
    assert info is not None and info.exit_code == 1
