"""The sandbox runtime, run for real as root over a busybox image (no mocks)."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from contree_shell.sandbox import runtime
from contree_shell.sandbox.runtime import ExitInfo, RunSpec, Sandbox, SandboxError, StdinClosed

pytestmark = pytest.mark.root

ENV = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/root"}
# Long sleeps are found again on the host by their argument: unique per test process, so
# parallel test runs never see each other's.
MARK = random.randrange(10**6, 10**7)


@dataclass
class Run:
    """One sandbox run: its dirs, collected output and the sandbox itself."""

    upper: Path
    work: Path
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    sandbox: Sandbox | None = None
    on_chunk: Callable[[str, bytes], None] | None = None

    def collect(self, stream: str, chunk: bytes) -> None:
        (self.stdout if stream == "stdout" else self.stderr).extend(chunk)
        if self.on_chunk is not None:
            self.on_chunk(stream, chunk)

    def wait(self) -> ExitInfo:
        assert self.sandbox is not None
        info = self.sandbox.wait(120)
        assert info is not None, "sandbox did not finish"
        return info

    def upper_entries(self) -> list[str]:
        return sorted(str(p.relative_to(self.upper)) for p in self.upper.rglob("*"))


@pytest.fixture
def runner(busybox_image: Path, tmp_path: Path) -> Iterator[Callable[..., Run]]:
    runs: list[Run] = []
    counter = itertools.count()

    def start(argv: list[str] | str, *, lowers: list[Path] | None = None,
              on_chunk: Callable[[str, bytes], None] | None = None, **spec: object) -> Run:  # fmt: skip
        n = next(counter)
        run = Run(upper=tmp_path / f"run{n}" / "upper", work=tmp_path / f"run{n}" / "work",
                  on_chunk=on_chunk)  # fmt: skip
        run.upper.mkdir(parents=True)
        run.work.mkdir()
        if isinstance(argv, str):
            argv = ["sh", "-c", argv]
        spec.setdefault("env", dict(ENV))
        run.sandbox = Sandbox.start(lowers=lowers or [busybox_image], upper=run.upper,
                                    work=run.work, spec=RunSpec(argv=argv, **spec),  # type: ignore[arg-type]
                                    on_output=run.collect)  # fmt: skip
        runs.append(run)
        return run

    yield start
    for run in runs:
        if run.sandbox is not None and not run.sandbox.done():
            run.sandbox.kill()
            run.sandbox.wait(30)


def host_processes_with(command: str) -> list[str]:
    """Host processes whose argv is exactly ``command`` split on spaces."""
    wanted = command.encode().split(b" ")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        except OSError:
            continue
        if argv == wanted:
            found.append(entry)
    return found


def poll_until(predicate: Callable[[], bool], tries: int = 200) -> bool:
    """For other processes' state, which offers nothing to wait on: bounded polling."""
    for _ in range(tries):
        if predicate():
            return True
        threading.Event().wait(0.05)
    return predicate()


def test_stdout_and_stderr_are_separate_streams(runner: Callable[..., Run]) -> None:
    run = runner("echo to-out; echo to-err >&2; echo more-out")
    info = run.wait()
    assert info.exit_code == 0 and info.error is None and not info.timed_out
    assert bytes(run.stdout) == b"to-out\nmore-out\n"
    assert bytes(run.stderr) == b"to-err\n"


def test_output_reaches_callback_before_the_command_exits(runner: Callable[..., Run]) -> None:
    seen = threading.Event()
    run = runner("echo first; read line; echo got $line", stdin_open=True,
                 on_chunk=lambda stream, chunk: seen.set())  # fmt: skip
    assert seen.wait(30)
    assert run.sandbox is not None and not run.sandbox.done()
    assert bytes(run.stdout) == b"first\n"
    run.sandbox.write_stdin(b"it\n")
    run.sandbox.close_stdin()
    assert run.wait().exit_code == 0
    assert bytes(run.stdout) == b"first\ngot it\n"


def test_exit_code_of_the_main_process_is_returned(runner: Callable[..., Run]) -> None:
    run = runner("exit 42")
    assert run.sandbox is not None and run.sandbox.started and run.sandbox.pid == 2
    info = run.wait()
    assert run.sandbox.done()
    assert info.exit_code == 42 and info.signal is None and info.error is None
    assert info.pid > 1
    assert set(info.rusage) >= {"user_time_us", "sys_time_us", "max_rss_kb", "minor_faults"}


def test_process_killed_by_signal_reports_signal_not_exit_code(runner: Callable[..., Run]) -> None:
    info = runner("kill -SEGV $$").wait()
    assert info.exit_code is None and info.signal == signal.SIGSEGV


def test_missing_binary_gives_127_and_exec_error(runner: Callable[..., Run]) -> None:
    info = runner(["no-such-binary", "x"]).wait()
    assert info.exit_code == 127
    assert info.error == "exec no-such-binary: No such file or directory"


def test_env_is_exactly_the_given_one_and_path_resolves_argv0(runner: Callable[..., Run]) -> None:
    run = runner(["env"], env={"PATH": "/bin", "FOO": "bar baz"})
    assert run.wait().exit_code == 0
    assert sorted(bytes(run.stdout).decode().splitlines()) == ["FOO=bar baz", "PATH=/bin"]


def test_cwd_is_created_and_used(runner: Callable[..., Run]) -> None:
    run = runner("pwd; ls -ld . | cut -c1-10", cwd="/srv/app/deep")
    assert run.wait().exit_code == 0
    assert bytes(run.stdout) == b"/srv/app/deep\ndrwxr-xr-x\n"
    assert "srv/app/deep" in run.upper_entries()


def test_uid_and_gid_are_applied(runner: Callable[..., Run]) -> None:
    run = runner("id -u; id -g; id -G; grep CapEff /proc/self/status", uid=1000, gid=1001)
    assert run.wait().exit_code == 0
    assert bytes(run.stdout).decode().split("\n")[:4] == ["1000", "1001", "1001",
                                                          "CapEff:\t0000000000000000"]  # fmt: skip


def test_hostname_is_set_in_uts_and_etc(runner: Callable[..., Run]) -> None:
    run = runner("hostname; cat /etc/hostname; grep -c box-7 /etc/hosts", hostname="box-7")
    assert run.wait().exit_code == 0
    assert bytes(run.stdout) == b"box-7\nbox-7\n1\n"
    assert run.upper_entries() == []


def test_stdin_is_at_eof_unless_opened(runner: Callable[..., Run]) -> None:
    run = runner("cat; echo done")
    assert run.wait().exit_code == 0
    assert bytes(run.stdout) == b"done\n"
    assert run.sandbox is not None
    with pytest.raises(StdinClosed):
        run.sandbox.write_stdin(b"late")


def test_five_megabytes_of_stdin_arrive_intact(runner: Callable[..., Run]) -> None:
    data = os.urandom(5 * 1024 * 1024)
    run = runner("sha256sum; wc -c < /dev/null", stdin_open=True)
    assert run.sandbox is not None
    for i in range(0, len(data), 300_000):
        run.sandbox.write_stdin(data[i:i + 300_000])
    run.sandbox.close_stdin()
    with pytest.raises(StdinClosed):
        run.sandbox.write_stdin(b"after close")
    assert run.wait().exit_code == 0
    assert bytes(run.stdout).split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_twenty_five_megabytes_of_stdout_stream_out(runner: Callable[..., Run]) -> None:
    run = runner("head -c 26214400 /dev/zero; echo tail >&2")
    assert run.wait().exit_code == 0
    assert len(run.stdout) == 26214400 and set(bytes(run.stdout)) == {0}
    assert bytes(run.stderr) == b"tail\n"


def test_timeout_kills_every_process_of_the_sandbox(runner: Callable[..., Run]) -> None:
    run = runner(f"sleep {MARK + 7} & sleep {MARK + 7} & (setsid sleep {MARK + 7} &); wait", timeout=1.0)
    info = run.wait()
    assert info.timed_out and info.exit_code is None and info.signal == signal.SIGKILL
    assert info.duration < 30  # not a timing check: it must not have waited for sleep
    assert host_processes_with(f"sleep {MARK + 7}") == []


def test_background_processes_die_with_the_main_process(runner: Callable[..., Run]) -> None:
    run = runner(f"sleep {MARK + 8} & (setsid sleep {MARK + 8} &); (trap '' TERM HUP; sleep {MARK + 8}) & echo ok")
    info = run.wait()
    assert info.exit_code == 0 and bytes(run.stdout) == b"ok\n"
    assert host_processes_with(f"sleep {MARK + 8}") == []


def test_signal_reaches_the_running_command(runner: Callable[..., Run]) -> None:
    ready = threading.Event()
    run = runner(f"echo ready; exec sleep {MARK + 9}", on_chunk=lambda s, c: ready.set())
    assert ready.wait(30)
    assert run.sandbox is not None
    run.sandbox.signal(signal.SIGINT)
    info = run.wait()
    assert info.signal == signal.SIGINT and info.exit_code is None and not info.timed_out
    assert host_processes_with(f"sleep {MARK + 9}") == []


def test_kill_ends_the_run_at_once(runner: Callable[..., Run]) -> None:
    ready = threading.Event()
    run = runner(f"echo ready; trap '' INT TERM; sleep {MARK + 10}", on_chunk=lambda s, c: ready.set())
    assert ready.wait(30)
    assert run.sandbox is not None
    run.sandbox.kill()
    info = run.wait()
    assert info.signal == signal.SIGKILL and info.exit_code is None
    assert host_processes_with(f"sleep {MARK + 10}") == []


def test_true_leaves_upper_empty(runner: Callable[..., Run]) -> None:
    run = runner(["true"])
    assert run.wait().exit_code == 0
    assert run.upper_entries() == []


def test_image_without_mount_points_still_leaves_upper_empty(
        runner: Callable[..., Run], busybox_image: Path, tmp_path: Path) -> None:  # fmt: skip
    bare = tmp_path / "bare"
    shutil.copytree(busybox_image, bare, symlinks=True)
    for name in ("proc", "sys", "dev", "tmp"):
        os.rmdir(bare / name)
    for name in ("hostname", "hosts", "resolv.conf"):
        os.unlink(bare / "etc" / name)
    run = runner("ls /proc/self/ > /dev/null && cat /etc/hostname", lowers=[bare])
    assert run.wait().exit_code == 0
    assert bytes(run.stdout) == b"linuxkit\n"
    assert run.upper_entries() == []


def test_writes_land_in_upper_and_layers_stay_untouched(
        runner: Callable[..., Run], busybox_image: Path) -> None:  # fmt: skip
    before = (busybox_image / "etc/passwd").read_bytes()
    run = runner("echo hi > /root/note; echo extra >> /etc/passwd; rm /bin/vi")
    assert run.wait().exit_code == 0
    assert (run.upper / "root/note").read_bytes() == b"hi\n"
    assert (run.upper / "etc/passwd").read_bytes() == before + b"extra\n"
    assert (busybox_image / "etc/passwd").read_bytes() == before
    assert os.path.lexists(busybox_image / "bin/vi")
    assert (run.upper / "bin/vi").lstat().st_rdev == 0  # a whiteout


def test_several_layers_stack_top_first(runner: Callable[..., Run], busybox_image: Path,
                                        tmp_path: Path) -> None:  # fmt: skip
    mid, top = tmp_path / "mid", tmp_path / "top"
    (mid / "srv").mkdir(parents=True)
    (top / "srv").mkdir(parents=True)
    (mid / "srv/a").write_text("mid\n")
    (mid / "srv/b").write_text("mid\n")
    (top / "srv/a").write_text("top\n")
    run = runner("cat /srv/a /srv/b", lowers=[busybox_image, mid, top])
    assert run.wait().exit_code == 0
    assert bytes(run.stdout) == b"top\nmid\n"


def test_an_image_of_the_store_s_maximum_depth_mounts_with_the_scaffold_below_it(
        runner: Callable[..., Run], busybox_image: Path, tmp_path: Path) -> None:  # fmt: skip
    from contree_shell.sandbox.store import MAX_LAYERS

    layers = [busybox_image]
    for i in range(MAX_LAYERS - 1):
        layer = tmp_path / "deep" / str(i)
        layer.mkdir(parents=True)
        (layer / "depth").write_text(f"{i}\n")
        layers.append(layer)
    run = runner("cat /depth", lowers=layers)
    info = run.wait()
    assert info.exit_code == 0, info
    assert bytes(run.stdout) == f"{MAX_LAYERS - 2}\n".encode()


def test_legacy_mount_fallback_stacks_layers_the_same(
        runner: Callable[..., Run], busybox_image: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(runtime, "USE_NEW_MOUNT_API", False)
    layers = [busybox_image]
    for i in range(3):
        layer = tmp_path / f"layer{i}"
        layer.mkdir()
        (layer / "f").write_text(f"{i}\n")
        layers.append(layer)
    run = runner("cat /f; touch /g", lowers=layers)
    assert run.wait().exit_code == 0
    assert bytes(run.stdout) == b"2\n"
    assert run.upper_entries() == ["g"]


def test_setup_failure_is_reported_as_error(runner: Callable[..., Run], tmp_path: Path) -> None:
    info = runner(["true"], lowers=[tmp_path / "no-such-layer"]).wait()
    assert info.exit_code is None
    assert info.error == "sandbox setup failed at mount-overlay: No such file or directory"


@pytest.mark.parametrize("spare_fds", [1, 6])
def test_start_raises_instead_of_hanging_when_out_of_descriptors(
        runner: Callable[..., Run], spare_fds: int) -> None:  # fmt: skip
    assert runner(["true"]).wait().exit_code == 0  # seccomp filter compiled, libs loaded
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = {int(fd) for fd in os.listdir("/proc/self/fd")}
    free = [fd for fd in range(soft) if fd not in used][:spare_fds]
    resource.setrlimit(resource.RLIMIT_NOFILE, (free[-1] + 1, hard))  # spare_fds left
    try:
        with pytest.raises(SandboxError, match="cannot start sandbox"):
            runner(["true"])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert runner(["true"]).wait().exit_code == 0


def test_on_exit_runs_on_the_io_thread_before_wait_returns(busybox_image: Path,
                                                         tmp_path: Path) -> None:  # fmt: skip
    (tmp_path / "u").mkdir()
    (tmp_path / "w").mkdir()
    seen: list[tuple[ExitInfo, str]] = []
    sb = Sandbox.start(lowers=[busybox_image], upper=tmp_path / "u", work=tmp_path / "w",
                       spec=RunSpec(argv=["sh", "-c", "exit 5"], env=ENV),
                       on_output=lambda s, c: None,
                       on_exit=lambda info: seen.append((info, threading.current_thread().name)))
    info = sb.wait(60)
    assert info is not None and seen == [(info, "sandbox-io")] and info.exit_code == 5


@pytest.mark.parametrize("spec", [
    RunSpec(argv=[], env={}),
    RunSpec(argv=["true"], env={"A=B": "x"}),
    RunSpec(argv=["tr\0ue"], env={}),
    RunSpec(argv=["true"], env={}, cwd="relative"),
    RunSpec(argv=["true"], env={}, hostname="h" * 65),
])
def test_invalid_specs_are_refused_before_anything_starts(busybox_image: Path, tmp_path: Path,
                                                          spec: RunSpec) -> None:  # fmt: skip
    with pytest.raises(SandboxError):
        Sandbox.start(lowers=[busybox_image], upper=tmp_path, work=tmp_path, spec=spec,
                      on_output=lambda s, c: None)


def test_runs_leave_no_mounts_on_the_host(runner: Callable[..., Run]) -> None:
    before = Path("/proc/self/mountinfo").read_text()
    for cmd in ("true", "exit 3", "sleep 100"):
        runner(cmd, timeout=0.5).wait()
    runner(["missing-binary"]).wait()
    assert Path("/proc/self/mountinfo").read_text() == before


def test_network_off_means_loopback_only(runner: Callable[..., Run]) -> None:
    run = runner("ls /sys/class/net; cat /proc/net/route | wc -l; "
                 "nc -w 2 127.0.0.1 9 < /dev/null; echo nc=$?")  # fmt: skip
    assert run.wait().exit_code == 0
    lines = bytes(run.stdout).decode().split()
    assert lines == ["lo", "1", "nc=1"]
    assert b"refused" in bytes(run.stderr).lower()


needs_nat = pytest.mark.skipif(not runtime.NETWORK_SUPPORTED,
                               reason="slirp4netns is not installed")


@needs_nat
def test_network_on_has_an_interface_route_and_dns_forwarder(runner: Callable[..., Run]) -> None:
    run = runner("ls /sys/class/net | grep -vx lo | wc -l; ip -4 route | grep -c '^default';"
                 " cat /etc/resolv.conf", network=True)  # fmt: skip
    info = run.wait()
    assert info.exit_code == 0 and info.error is None
    assert bytes(run.stdout).decode().split("\n") == ["1", "1", f"nameserver {runtime.SANDBOX_DNS}", ""]
    assert run.upper_entries() == []


@needs_nat
def test_network_on_does_not_reach_host_loopback_services(runner: Callable[..., Run]) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.1)
    port = listener.getsockname()[1]
    try:
        run = runner(f"gw=$(ip -4 route | awk '/^default/ {{print $3}}'); "
                     f"nc -w 2 $gw {port} < /dev/null; echo gw=$?; "
                     f"nc -w 2 127.0.0.1 {port} < /dev/null; echo lo=$?", network=True)  # fmt: skip
        assert run.wait().exit_code == 0
        assert bytes(run.stdout).split() == [b"gw=1", b"lo=1"]
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()


def holders_of(ns: str) -> list[str]:
    """Host processes in, or holding an fd to, the namespace ``ns`` ("net:[inode]")."""
    found = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{p}/ns/net") == ns or any(
                    os.readlink(f"/proc/{p}/fd/{fd}") == ns for fd in os.listdir(f"/proc/{p}/fd")):
                found.append(p)
        except OSError:
            continue
    return found


@needs_nat
def test_network_namespace_and_its_helper_are_gone_after_the_run(
        runner: Callable[..., Run]) -> None:  # fmt: skip
    run = runner("readlink /proc/self/ns/net", network=True)
    assert run.wait().exit_code == 0
    ns = bytes(run.stdout).decode().strip()
    assert ns.startswith("net:[")
    # slirp4netns is SIGKILLed when the run ends and reaped by the launcher (its tap
    # device teardown takes tens of ms the result does not wait for): bounded poll.
    assert poll_until(lambda: holders_of(ns) == [])


def test_concurrent_runs_from_many_threads(runner: Callable[..., Run]) -> None:
    lock = threading.Lock()
    runs: list[tuple[int, Run]] = []

    def worker(i: int) -> None:
        for j in range(3):
            with lock:
                run = runner(f"echo {i}-{j}; exit {i}", stdin_open=True)
                runs.append((i, run))
            assert run.sandbox is not None
            run.sandbox.close_stdin()
            run.wait()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(runs) == 12
    for i, run in runs:
        info = run.wait()
        assert info.exit_code == i
        assert bytes(run.stdout).startswith(f"{i}-".encode())


def test_killed_server_leaves_no_sandbox_process(busybox_image: Path, tmp_path: Path) -> None:
    script = f"""
import sys
from pathlib import Path
from contree_shell.sandbox.runtime import RunSpec, Sandbox
up, wk = Path({str(tmp_path)!r}) / "u", Path({str(tmp_path)!r}) / "w"
up.mkdir(); wk.mkdir()
def out(stream, chunk):
    sys.stdout.write("ready\\n"); sys.stdout.flush()
sb = Sandbox.start(lowers=[Path({str(busybox_image)!r})], upper=up, work=wk,
                   spec=RunSpec(argv=["sh", "-c", "sleep {MARK + 11} & echo x; sleep {MARK + 11}"],
                                env={ENV!r}), on_output=out)
sb.wait()
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        # The shell has forked, the sleeps may still be exec'ing: no event to wait on.
        assert poll_until(lambda: len(host_processes_with(f"sleep {MARK + 11}")) == 2)
    finally:
        proc.kill()
        proc.wait()
    # PDEATHSIG is delivered asynchronously: poll the process list for a bounded while.
    assert poll_until(lambda: host_processes_with(f"sleep {MARK + 11}") == [])


@needs_nat
def test_killed_server_leaves_no_network_helper(busybox_image: Path, tmp_path: Path) -> None:
    script = f"""
import sys
from pathlib import Path
from contree_shell.sandbox.runtime import RunSpec, Sandbox
up, wk = Path({str(tmp_path)!r}) / "u", Path({str(tmp_path)!r}) / "w"
up.mkdir(); wk.mkdir()
def out(stream, chunk):
    sys.stdout.write(chunk.decode()); sys.stdout.flush()
sb = Sandbox.start(lowers=[Path({str(busybox_image)!r})], upper=up, work=wk,
                   spec=RunSpec(argv=["sh", "-c", "readlink /proc/self/ns/net; sleep {MARK + 12}"],
                                env={ENV!r}, network=True), on_output=out)
sb.wait()
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        ns = proc.stdout.readline().decode().strip()
        assert ns.startswith("net:[") and holders_of(ns)
    finally:
        proc.kill()
        proc.wait()
    # PDEATHSIG chains are asynchronous: poll for a bounded while.
    assert poll_until(lambda: holders_of(ns) == [])


def test_wait_exec_returns_once_the_program_itself_runs(runner: Callable[..., Run]) -> None:
    run = runner(["sleep", str(MARK + 13)])
    assert run.sandbox is not None and run.sandbox.wait_exec(30) is True
    # No polling: "exec done" is an event, so the program is already there.
    assert len(host_processes_with(f"sleep {MARK + 13}")) == 1
    run.sandbox.kill()
    run.wait()


def test_wait_exec_is_false_when_exec_fails(runner: Callable[..., Run]) -> None:
    run = runner(["missing-binary"])
    assert run.sandbox is not None and run.sandbox.wait_exec(30) is False
    assert run.wait().exit_code == 127


def test_signal_asked_for_at_start_is_delivered_to_the_program(
        runner: Callable[..., Run]) -> None:  # fmt: skip
    run = runner(["sleep", str(MARK + 14)])
    assert run.sandbox is not None
    run.sandbox.signal(signal.SIGUSR1)  # most likely before exec: queued, then delivered
    info = run.wait()
    assert info.signal == signal.SIGUSR1 and not info.timed_out


PEER_LISTENER = """
import socket, sys
s = socket.socket()
s.bind(("169.254.77.2", 0))
s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
c.sendall(b"hello-from-peer\\n")
c.close()
"""


@pytest.fixture
def peer_netns() -> Iterator[str]:
    """A separate network namespace at 169.254.77.2, linked to the host by a veth /30."""
    if not shutil.which("ip"):
        pytest.skip("iproute2 is missing")
    name = f"contree-nat-{os.getpid()}"
    host_if, peer_if = f"cth{os.getpid() % 100000}", f"ctp{os.getpid() % 100000}"
    steps = [["ip", "netns", "add", name],
             ["ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if,
              "netns", name],
             ["ip", "addr", "add", "169.254.77.1/30", "dev", host_if],
             ["ip", "link", "set", host_if, "up"],
             ["ip", "-n", name, "addr", "add", "169.254.77.2/30", "dev", peer_if],
             ["ip", "-n", name, "link", "set", peer_if, "up"]]  # fmt: skip
    try:
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                pytest.skip(f"cannot build the peer namespace: {done.stderr.strip()}")
        yield name
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


@needs_nat
def test_network_on_reaches_another_host_through_nat_but_not_host_loopback(
        runner: Callable[..., Run], peer_netns: str) -> None:  # fmt: skip
    peer = subprocess.Popen(["ip", "netns", "exec", peer_netns, sys.executable, "-c",
                             PEER_LISTENER], stdout=subprocess.PIPE, text=True)  # fmt: skip
    local = socket.socket()
    local.bind(("127.0.0.1", 0))
    local.listen(1)
    local.settimeout(0.1)
    try:
        assert peer.stdout is not None
        port = int(peer.stdout.readline())
        run = runner(f"timeout 5 nc 169.254.77.2 {port} < /dev/null; echo peer=$?; "
                     f"nc -w 2 127.0.0.1 {local.getsockname()[1]} < /dev/null; echo lo=$?",
                     network=True)  # fmt: skip
        assert run.wait().exit_code == 0
        assert bytes(run.stdout).split() == [b"hello-from-peer", b"peer=0", b"lo=1"]
        with pytest.raises(TimeoutError):
            local.accept()
        assert peer.wait(30) == 0
    finally:
        local.close()
        peer.kill()
        peer.wait()


BULK_LISTENER = """
import socket
s = socket.socket()
s.bind(("169.254.77.2", 0))
s.listen(8)
print(s.getsockname()[1], flush=True)
data = bytes(range(256)) * 4096
for _ in range(3):
    c, _ = s.accept()
    c.sendall(data)
    c.close()
"""


@needs_nat
def test_a_download_whose_peer_closes_right_after_sending_arrives_whole(
        runner: Callable[..., Run], peer_netns: str) -> None:  # fmt: skip
    """1 MiB sent and closed at once, three times: every byte arrives once, then EOF.

    (pasta from passt 2023-03 lost the FIN here and delivered data again and again.)
    """
    peer = subprocess.Popen(["ip", "netns", "exec", peer_netns, sys.executable, "-c",
                             BULK_LISTENER], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert peer.stdout is not None
        port = int(peer.stdout.readline())
        want = hashlib.md5(bytes(range(256)) * 4096).hexdigest()
        run = runner(f"for i in 1 2 3; do timeout 10 nc 169.254.77.2 {port} < /dev/null"
                     f" | md5sum; done", network=True)  # fmt: skip
        assert run.wait().exit_code == 0
        assert bytes(run.stdout).decode().split()[::2] == [want] * 3
        assert peer.wait(30) == 0
    finally:
        peer.kill()
        peer.wait()


@needs_nat
@pytest.mark.parametrize("pool", [True, False])
def test_each_network_run_gets_a_fresh_namespace_with_or_without_the_pool(
        runner: Callable[..., Run], monkeypatch: pytest.MonkeyPatch, pool: bool) -> None:  # fmt: skip
    monkeypatch.setattr(runtime, "USE_NETWORK_POOL", pool)
    # All three runs stay alive (blocked on stdin) until each has reported: the kernel
    # reuses the inode number of a dead namespace, so only live ones prove freshness.
    runs = []
    for _ in range(3):
        reported = threading.Event()
        run = runner("readlink /proc/self/ns/net; ip -4 route | grep -c '^default'; read x; exit 0",
                     network=True, stdin_open=True,
                     on_chunk=lambda _s, _c, r=reported: r.set())  # fmt: skip
        runs.append((run, reported))
    seen = set()
    for run, reported in runs:
        deadline = time.monotonic() + 30
        while bytes(run.stdout).count(b"\n") < 2 and time.monotonic() < deadline:
            reported.wait(1)
            reported.clear()
        ns, routes = bytes(run.stdout).decode().split()
        assert routes == "1"
        seen.add(ns)
    for run, _ in runs:
        assert run.sandbox is not None
        run.sandbox.close_stdin()
        info = run.wait()
        assert info.exit_code == 0 and info.error is None
    assert len(seen) == 3
    assert ns != os.readlink("/proc/self/ns/net")
