"""Extra processes in a running sandbox (subprocess spid >= 2), entered with setns(2).

The runtime has no exec-into API, and pid 1 of a sandbox only starts the main command,
so an extra process is started by the launcher (:mod:`launcher`; the code that runs
there is :mod:`nsinit`'s): a helper joins the sandbox's pid namespace (setns only affects
its children) and forks the process, which joins the mount, uts, ipc, net and cgroup
namespaces (the mount namespace's root is the pivoted overlay), changes directory,
hardens itself exactly like the main command (capabilities, no_new_privs, seccomp,
uid/gid) and execs. The helper stays outside the sandbox, reaps the process and reports
its wait status and rusage on a status pipe, so the mount namespace is never held by
anything but the sandbox's own processes. This module is the server's side: the pipes,
the status lines, signals and the result.

When pid 1 dies the kernel kills every process of the pid namespace, so an extra process
never outlives its instance; the helper carries PR_SET_PDEATHSIG against the launcher.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import selectors
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from contree_shell.sandbox import hardening, nsinit
from contree_shell.sandbox.launcher import LAUNCHER
from contree_shell.sandbox.nsinit import EXEC_STAGE, high_fd

_LATE_NS = ("mnt", "uts", "ipc", "net", "cgroup")
_READ_CHUNK = 65536


class ExecError(Exception):
    """The extra process could not be started."""


@dataclass
class ExecResult:
    """How an extra process ended (same conventions as runtime.ExitInfo)."""

    exit_code: int | None
    signal: int | None
    pid: int
    duration: float
    rusage: dict[str, int] = field(default_factory=dict)
    error: str | None = None


_RUSAGE_KEYS = ("user_time_us", "sys_time_us", "max_rss_kb", "shared_memory",
                "unshared_memory", "swaps", "minor_faults", "major_faults",
                "voluntary_ctx_switches", "involuntary_ctx_switches", "block_input_ops",
                "block_output_ops", "ipc_msgs_sent", "ipc_msgs_received",
                "signals_received")  # fmt: skip


def _ns_inode(path: str) -> int:
    return os.stat(path).st_ino


def _cgroup_procs(pid1: int) -> list[bytes]:
    """cgroup.procs files of pid 1's cgroups (v2 unified and v1 hierarchies), host view."""
    from contree_shell.sandbox import cgroups

    try:
        text = Path(f"/proc/{pid1}/cgroup").read_text()
        own = Path("/proc/self/cgroup").read_text()
    except OSError:
        return []
    if text == own:
        return []
    v1, v2 = cgroups.parse_proc_cgroup(text)
    layout = cgroups.detect()
    out: list[bytes] = []
    if v2 is not None and layout.v2 is not None:
        out.append(os.fsencode(layout.v2 / v2.lstrip("/") / "cgroup.procs"))
    for ctrl, rel in v1.items():
        mount = layout.v1.get(ctrl)
        if mount is not None:
            path = os.fsencode(mount / rel.lstrip("/") / "cgroup.procs")
            if path not in out:
                out.append(path)
    return [p for p in out if os.path.exists(p)]


def _cloexec_pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    return high_fd(r), high_fd(w)


class NsProcess:
    """One extra process inside a running sandbox. Thread-safe; callbacks on its I/O thread."""

    def __init__(self, on_output: Callable[[str, bytes], None],
                 on_exit: Callable[[ExecResult], None] | None) -> None:  # fmt: skip
        self._on_output = on_output
        self._on_exit = on_exit
        self._lock = threading.Lock()
        self._helper = 0
        self._helper_fd = -1  # pidfd of the helper (the launcher's child; it reaps it)
        self._host_pid = 0
        self.pid = 0  # pid inside the sandbox's pid namespace
        self._ready = threading.Event()  # the process has called setsid()
        self._spawned = threading.Event()
        self._done = threading.Event()
        self._stdin_w = -1
        self._result: ExecResult | None = None
        self._error: str | None = None
        self._status: bytes | None = None
        self._counters: list[int] = []
        self._started_at = time.monotonic()

    @classmethod
    def start(cls, *, pid1: int, argv: list[str], env: dict[str, str], cwd: str, uid: int,
              gid: int, stdin_open: bool, on_output: Callable[[str, bytes], None],
              on_exit: Callable[[ExecResult], None] | None = None) -> NsProcess:  # fmt: skip
        """Start `argv` in the sandbox whose pid 1 has host pid `pid1`; ExecError if not."""
        if not argv or not argv[0]:
            raise ExecError("empty command")
        try:
            harden_args = hardening.prepare(uid, gid)
        except (OSError, RuntimeError) as e:
            raise ExecError(f"cannot prepare the seccomp filter: {e}") from e
        opened: list[int] = []
        try:
            ns_dir = f"/proc/{pid1}/ns"
            pid_fd = high_fd(os.open(f"{ns_dir}/pid", os.O_RDONLY | os.O_CLOEXEC))
            opened.append(pid_fd)
            user_fd = -1
            if _ns_inode(f"{ns_dir}/user") != _ns_inode("/proc/self/ns/user"):
                user_fd = high_fd(os.open(f"{ns_dir}/user", os.O_RDONLY | os.O_CLOEXEC))
                opened.append(user_fd)
            late: list[int] = []
            for name in _LATE_NS:
                fd = high_fd(os.open(f"{ns_dir}/{name}", os.O_RDONLY | os.O_CLOEXEC))
                opened.append(fd)
                late.append(fd)
        except OSError as e:
            for fd in opened:
                os.close(fd)
            raise ExecError(f"the sandbox is gone ({e.strerror})") from e
        procs = _cgroup_procs(pid1)
        self = cls(on_output, on_exit)
        self._argv0 = argv[0]
        in_r, in_w = _cloexec_pipe()
        out_r, out_w = _cloexec_pipe()
        err_r, err_w = _cloexec_pipe()
        st_r, st_w = _cloexec_pipe()
        if stdin_open:
            self._stdin_w = in_w
        else:
            os.close(in_w)
        for fd in (out_r, err_r, st_r):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        try:
            self._helper, self._helper_fd = LAUNCHER.enter(
                fds=(in_r, out_w, err_w, st_w), pid_ns=pid_fd, user_ns=user_fd, late_ns=late,
                procs=procs, cwd=os.fsencode(cwd or "/"), argv=list(argv), env=dict(env),
                harden_args=harden_args)  # fmt: skip
        except OSError as e:
            self._error = f"cannot start the process: {e.strerror or e}"
            for fd in (out_r, err_r, st_r):
                os.close(fd)
            self._finish()
            raise ExecError(self._error) from e
        finally:
            for fd in (*opened, in_r, out_w, err_w, st_w):
                os.close(fd)
        threading.Thread(target=self._loop, args=(out_r, err_r, st_r), name="nsexec-io",
                         daemon=True).start()  # fmt: skip
        if not self._spawned.wait(timeout=10):
            self.kill()
            raise ExecError("the process did not start in time")
        if self._error is not None and not self._host_pid:
            self._done.wait(timeout=5)
            raise ExecError(self._error)
        return self

    # -- control ----------------------------------------------------------------

    def write_stdin(self, data: bytes) -> None:
        """Write all of `data` (blocking); BrokenPipeError/OSError when it cannot."""
        with self._lock:
            fd = self._stdin_w
        if fd < 0:
            raise BrokenPipeError("stdin is closed")
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]

    def close_stdin(self) -> None:
        with self._lock:
            fd, self._stdin_w = self._stdin_w, -1
        if fd >= 0:
            os.close(fd)

    @property
    def stdin_open(self) -> bool:
        return self._stdin_w >= 0

    def signal(self, sig: int) -> None:
        """Signal the process group; ProcessLookupError when it is gone."""
        if self._done.is_set() or not self._host_pid:
            raise ProcessLookupError("the process has exited")
        self._ready.wait(timeout=2)
        try:
            os.killpg(self._host_pid, sig)
        except ProcessLookupError:
            os.kill(self._host_pid, sig)

    def kill(self) -> None:
        """Kill the process group and the helper; never raises."""
        if self._host_pid:
            with contextlib.suppress(OSError):
                os.killpg(self._host_pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.kill(self._host_pid, signal.SIGKILL)
        with self._lock:
            if self._helper_fd >= 0:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(self._helper_fd, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> ExecResult | None:
        if not self._done.wait(timeout):
            return None
        return self._result

    def done(self) -> bool:
        return self._done.is_set()

    # -- I/O thread ---------------------------------------------------------------

    def _loop(self, out_r: int, err_r: int, st_r: int) -> None:
        sel = selectors.DefaultSelector()
        names = {out_r: "stdout", err_r: "stderr", st_r: "status"}
        for fd in names:
            sel.register(fd, selectors.EVENT_READ)
        pending = b""
        try:
            while names:
                for key, _ in sel.select():
                    fd = int(key.fd)
                    try:
                        chunk = os.read(fd, _READ_CHUNK)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        sel.unregister(fd)
                        os.close(fd)
                        del names[fd]
                        continue
                    if names[fd] == "status":
                        pending += chunk
                        while b"\n" in pending:
                            line, pending = pending.split(b"\n", 1)
                            self._status_line(line)
                    else:
                        try:
                            self._on_output(names[fd], chunk)
                        except Exception:  # a callback bug must not hang the process
                            pass
        finally:
            sel.close()
            self._finish()

    def _status_line(self, line: bytes) -> None:
        parts = line.split()
        if not parts:
            return
        if parts[0] == b"S" and len(parts) == 2:
            self._host_pid = int(parts[1])
            self.pid = _ns_pid(self._host_pid) or self._host_pid
            self._spawned.set()
        elif parts[0] == b"R":
            self._ready.set()
        elif parts[0] == b"X":
            self._status = parts[1]
            self._counters = [int(p) for p in parts[2:]]
        elif parts[0] == b"E" and len(parts) == 3:
            stage, err = parts[1].decode(), int(parts[2])
            what = os.strerror(err) if err else "failed"
            if stage == EXEC_STAGE.decode():
                self._error = f"exec {self._argv0}: {what}"
            else:
                self._error = f"{stage}: {what}"

    _argv0 = ""

    def _finish(self) -> None:
        if self._helper_fd >= 0:
            nsinit.exited(self._helper_fd, None)  # wait: the helper has reported, it exits
            with self._lock:
                fd, self._helper_fd = self._helper_fd, -1
            os.close(fd)
        self.close_stdin()
        self._spawned.set()
        self._ready.set()
        duration = time.monotonic() - self._started_at
        code: int | None = None
        sig: int | None = None
        if self._status is not None:
            status = int(self._status)
            if os.WIFSIGNALED(status):
                sig = os.WTERMSIG(status)
            else:
                code = os.waitstatus_to_exitcode(status)
        elif self._error is None:
            self._error = "the process was lost (its sandbox ended)"
            sig = signal.SIGKILL
        rusage = dict(zip(_RUSAGE_KEYS, self._counters, strict=False))
        error = self._error if self._status is None or code in (126, 127) else None
        if error is not None and code is None and sig is None:
            code = 127
        self._result = ExecResult(code, sig, self.pid, duration, rusage, error)
        self._done.set()
        if self._on_exit is not None:
            with contextlib.suppress(Exception):
                self._on_exit(self._result)


def _ns_pid(host_pid: int) -> int | None:
    """The innermost pid of a host process (its pid inside the sandbox)."""
    try:
        with open(f"/proc/{host_pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError):
        return None
    return None


__all__ = ["ExecError", "ExecResult", "NsProcess"]
