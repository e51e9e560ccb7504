"""Run one command in a fresh sandbox: the server's side of a run.

Process tree of one run (host view)::

    launcher ──clone(new namespaces)──► pid 1 "contree-init": cgroups, overlay root,
                                        /proc /sys /dev, pivot_root; reaps
                                          └─fork─► command: setsid, uid/gid, caps,
                                                   no_new_privs, seccomp, execvpe

Sandboxes are forked by the launcher (:mod:`launcher`, :mod:`nsinit`), a small process
the server starts once: forking the server itself costs several times more. This module
plans a run (every path and byte string pid 1 needs), hands the plan and the pipe ends
to the launcher, and runs the rest on the sandbox's own I/O thread: stdin, output, the
status lines of :mod:`nsinit` (pid, exec, exit status and rusage), signals, the
timeout, networking (slirp4netns) and the user-namespace maps of rootless runs. The server
holds a pidfd of pid 1: killing it kills the whole pid namespace, and its exit means
every process of the run is gone and the overlay unmounted.

Network (slirp4netns, user-mode NAT): a run takes a namespace from a small pool that
already has slirp4netns attached and configured (pid 1 setns()es into it); with the pool
empty it attaches slirp4netns while the root is being built (~2 ms to get ready). The
sandbox sees tap0 10.0.2.100/24 (and fd00::100/64), its gateway 10.0.2.2 and a resolver
at 10.0.2.3 that forwards to the host's; connections to the host's loopback are refused
(--disable-host-loopback). slirp4netns is started by the launcher and SIGKILLed through
its pidfd when the run ends; the launcher reaps it. (pasta, from passt 2023-03, was used
before: it lost the FIN of a peer that closes right after sending and then delivered
the data again and again, corrupting downloads, and cost ~19 ms of CPU per start.)

Rootless (server run by an unprivileged user): pid 1 is cloned into a new user namespace
too, whose root is that user; with newuidmap/newgidmap and an /etc/subuid + /etc/subgid range
the range is mapped from 1 ("full"), else only root is mapped ("single": setgroups is
denied, other uids are unusable, devpts has no tty gid). The overlay uses ``userxattr``:
its markers are ``user.overlay.*``, while the store's whiteout/opaque format is the
kernel's ``trusted.*`` (root); layers committed by one mode are not fully understood by
the other (opaque dirs), which is a known limitation. No cgroup limits (logged once);
network only if /dev/net/tun is usable by the user. :func:`mode` describes all this.

rusage: ``max_rss_kb`` from wait4 includes the forked launcher's pages the command held
before exec (a few MB); with a memory cgroup (limits on) the smaller of it and the
cgroup's peak is reported, otherwise it over-reports small programs by that much.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import os
import resource  # noqa: F401  # os.wait4 imports it lazily; a child after pivot_root cannot
import selectors
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from contree_shell.sandbox import hardening, nsinit
from contree_shell.sandbox import syscalls as sc
from contree_shell.sandbox.cgroups import CgroupError, Limits, RunCgroup
from contree_shell.sandbox.launcher import LAUNCHER

log = logging.getLogger(__name__)

RUSAGE_KEYS: tuple[str, ...] = (
    "user_time_us", "sys_time_us", "max_rss_kb", "shared_memory", "unshared_memory",
    "swaps", "minor_faults", "major_faults", "voluntary_ctx_switches",
    "involuntary_ctx_switches", "block_input_ops", "block_output_ops", "ipc_msgs_sent",
    "ipc_msgs_received", "signals_received",
)  # fmt: skip

# pid 1 is cloned into these (and a user namespace when rootless; the network namespace
# is joined instead when a pooled one is ready); it unshares its cgroup namespace itself,
# after joining the run's cgroups.
_CLONE_FLAGS = (sc.CLONE_NEWNS | sc.CLONE_NEWPID | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC
                | sc.CLONE_NEWNET)  # fmt: skip
_READ_CHUNK = 65536
# Network on: slirp4netns (user-mode NAT, Debian package slirp4netns) attaches a tap
# device to the sandbox's own network namespace; its resolver forwards to the host's.
SLIRP4NETNS = shutil.which("slirp4netns")
# Rootless, slirp4netns opens /dev/net/tun as this user: many hosts keep it root-only.
NETWORK_SUPPORTED = SLIRP4NETNS is not None and (
    os.geteuid() == 0 or os.access("/dev/net/tun", os.R_OK | os.W_OK))
SANDBOX_DNS = "10.0.2.3"
# Mount points the runtime covers. A scaffold layer at the bottom of every overlay
# provides them, so an image that lacks one still needs no write into upper.
_SCAFFOLD_DIRS = ("proc", "sys", "dev", "etc", "tmp")
_SCAFFOLD_FILES = ("etc/hostname", "etc/hosts", "etc/resolv.conf")


# Rootless: a server started by an unprivileged user runs each sandbox in a user namespace.
ROOTLESS = os.geteuid() != 0


def _subid_range(path: str, uid: int) -> tuple[int, int] | None:
    """The first (start, count) of /etc/subuid-style ``path`` for this user, if any."""
    import pwd  # deferred: only rootless servers need it

    try:
        names = {str(uid), pwd.getpwuid(uid).pw_name}
    except KeyError:
        names = {str(uid)}
    try:
        with open(path) as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[0] in names and parts[1].isdigit() \
                        and parts[2].isdigit() and int(parts[2]) > 0:
                    return int(parts[1]), int(parts[2])
    except OSError:
        pass
    return None


SUBUIDS = _subid_range("/etc/subuid", os.geteuid()) if ROOTLESS else None
SUBGIDS = _subid_range("/etc/subgid", os.geteuid()) if ROOTLESS else None


def _id_map_kind() -> str:
    """"host" (root, no user namespace), "full" (newuidmap + subuid range) or "single"."""
    if not ROOTLESS:
        return "host"
    if SUBUIDS and SUBGIDS and shutil.which("newuidmap") and shutil.which("newgidmap"):
        return "full"
    return "single"


_userns_checked: str | None = None


def userns_error() -> str | None:
    """Rootless only: why the kernel refuses user namespaces to this user (None: fine)."""
    global _userns_checked
    if not ROOTLESS:
        return None
    if _userns_checked is None:
        pid = os.fork()
        if pid == 0:  # only a pre-resolved syscall and _exit after fork
            try:
                sc.unshare(sc.CLONE_NEWUSER)
                os._exit(0)
            except OSError as e:
                os._exit(min(e.errno or 1, 255))
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        _userns_checked = "" if code == 0 else (
            f"the kernel refuses user namespaces to this user ({os.strerror(code)}): run the "
            "server as root or allow unprivileged user namespaces "
            "(sysctl user.max_user_namespaces, kernel.unprivileged_userns_clone)")  # fmt: skip
    return _userns_checked or None


def mode() -> dict[str, object]:
    """How this server runs sandboxes, for ``contree server status``.

    Keys: mode ("root"|"rootless"), uid_map ("host"|"full"|"single"), limits (cgroup
    limits usable), network (outbound NAT usable), cgroups (v1|v2|hybrid|none).
    """
    from contree_shell.sandbox import cgroups

    layout = cgroups.detect()
    return {"mode": "rootless" if ROOTLESS else "root", "uid_map": _id_map_kind(),
            "limits": cgroups.limits_available(layout), "network": NETWORK_SUPPORTED,
            "cgroups": layout.mode}  # fmt: skip


def preflight() -> list[tuple[str, bool, str]]:
    """Checks for the server's start: (name, ok, one-line detail); "runtime" blocks."""
    from contree_shell.sandbox import cgroups

    err = userns_error()
    m = mode()
    checks: list[tuple[str, bool, str]] = [
        ("runtime", err is None, err or f"sandbox runtime: {m['mode']}, uid map {m['uid_map']}")]
    checks += [("limits", True, line) for line in cgroups.startup_report()]
    return checks


class SandboxError(Exception):
    """The sandbox could not be started (bad spec or a host-side failure)."""


class StdinClosed(Exception):
    """write_stdin after close_stdin, or after the sandbox finished."""


@dataclass
class RunSpec:
    """What to run and how. ``argv`` is exec'd with execvpe semantics (PATH from env)."""

    argv: list[str]
    env: dict[str, str]
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    hostname: str = "linuxkit"
    timeout: float | None = None
    network: bool = False
    stdin_open: bool = False
    limits: Limits | None = None    # memory/pids/cpu via cgroups; None: no cgroup at all


@dataclass
class ExitInfo:
    """How a run ended. ``exit_code`` is None when the command was killed by a signal or
    the timeout; ``error`` carries spawn failures (exec failure: exit_code 127)."""

    exit_code: int | None
    signal: int | None
    timed_out: bool
    pid: int
    duration: float
    rusage: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    oom_killed: bool = False  # only known for runs with a memory limit


# ----------------------------------------------------------------------------- planning


_scaffold_lock = threading.Lock()
_scaffold_path: Path | None = None
_SCAFFOLD_NAME = "contree-scaffold-v1"


def _scaffold_ok(path: Path) -> bool:
    """True when ``path`` is a complete scaffold only this user can change."""
    uid = os.geteuid()
    try:
        top = os.lstat(path)
        if not stat.S_ISDIR(top.st_mode) or top.st_uid != uid or top.st_mode & 0o077:
            return False
        for rel in (*_SCAFFOLD_DIRS, *_SCAFFOLD_FILES):
            st = os.lstat(path / rel)
            if st.st_uid != uid or stat.S_ISLNK(st.st_mode):
                return False
    except OSError:
        return False
    return True


def _new_scaffold(base: Path) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f"{_SCAFFOLD_NAME}.", dir=base))  # mode 0700
    for d in _SCAFFOLD_DIRS:
        (path / d).mkdir(mode=0o755)
    os.chmod(path / "tmp", 0o1777)
    for f in _SCAFFOLD_FILES:
        (path / f).touch(mode=0o644)
    return path


def _scaffold() -> Path:
    """A lower layer holding only the mount points, shared by every run and server.

    It sits at the bottom of every overlay, so images that lack a mount point need no
    write into upper. Its top directory is private (0700): overlay reads lower layers
    with the mounter's credentials, and nobody else on the host may add files to it.
    """
    global _scaffold_path
    with _scaffold_lock:
        if _scaffold_path is not None and _scaffold_ok(_scaffold_path):
            return _scaffold_path
        base = Path(tempfile.gettempdir())
        shared = base / f"{_SCAFFOLD_NAME}-{os.geteuid()}"
        if not _scaffold_ok(shared):
            fresh = _new_scaffold(base)
            try:
                os.rename(fresh, shared)  # atomic; fails if another server got there first
            except OSError:
                shutil.rmtree(fresh, ignore_errors=True)
                if not _scaffold_ok(shared):  # squatted by someone else: keep a private one
                    shared = _new_scaffold(base)
                    atexit.register(shutil.rmtree, shared, True)
        _scaffold_path = shared
        return shared


def _hosts(hostname: str) -> bytes:
    return (f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
            f"127.0.1.1\t{hostname}\n").encode()  # fmt: skip


def _validate(spec: RunSpec) -> None:
    if not spec.argv or not spec.argv[0]:
        raise SandboxError("empty command")
    texts = [*spec.argv, *spec.env.keys(), *spec.env.values(), spec.cwd, spec.hostname]
    if any("\0" in t for t in texts):
        raise SandboxError("command, env, cwd and hostname must not contain NUL bytes")
    if any("=" in k or not k for k in spec.env):
        raise SandboxError("environment variable names must be non-empty and contain no '='")
    if not spec.cwd.startswith("/"):
        raise SandboxError(f"cwd must be absolute: {spec.cwd!r}")
    if not spec.hostname or len(spec.hostname.encode()) > 64:
        raise SandboxError("hostname must be 1..64 bytes")
    if spec.uid < 0 or spec.gid < 0:
        raise SandboxError("uid and gid must be >= 0")
    if spec.network and not NETWORK_SUPPORTED:
        raise SandboxError("network=True needs slirp4netns (Debian package slirp4netns)")


def _harden(spec: RunSpec) -> hardening.HardeningArgs:
    try:
        # A single-uid map denies setgroups(2) in the namespace (the kernel requires it).
        return hardening.prepare(spec.uid, spec.gid, set_groups=_id_map_kind() != "single")
    except (OSError, RuntimeError) as e:  # libseccomp missing or unloadable
        raise SandboxError(f"cannot prepare the seccomp filter: {e}") from e


def _plan(lowers: list[Path], upper: Path, work: Path, spec: RunSpec) -> nsinit.Plan:
    _validate(spec)
    if not lowers:
        raise SandboxError("an image needs at least one layer")
    layers = [os.fsencode(os.path.abspath(p)) for p in reversed(lowers)]
    layers.append(os.fsencode(_scaffold()))
    upper_b = os.fsencode(os.path.abspath(upper))
    work_b = os.fsencode(os.path.abspath(work))
    for p in (*layers, upper_b, work_b):
        if b"," in p or b":" in p:
            raise SandboxError(f"layer path contains ',' or ':': {os.fsdecode(p)}")
    # Legacy mount(2) fallback: chdir to the layers' common parent and name them relative
    # to it, which keeps deep chains under the one-page option limit.
    common = os.path.commonpath([os.fsdecode(p) for p in layers])
    rel = [os.fsencode(os.path.relpath(os.fsdecode(p), common)) for p in layers]
    legacy = b"lowerdir=" + b":".join(rel) + b",upperdir=" + upper_b + b",workdir=" + work_b
    hostname = spec.hostname.encode()
    return nsinit.Plan(
        lowers=layers,
        upper=upper_b,
        work=work_b,
        target=os.fsencode(os.path.abspath(upper.parent)),
        legacy_dir=os.fsencode(common),
        legacy_data=legacy,
        hostname=hostname,
        etc_files=[(b"etc/hostname", hostname + b"\n"), (b"etc/hosts", _hosts(spec.hostname)),
                   (b"etc/resolv.conf",
                    f"nameserver {SANDBOX_DNS}\n".encode() if spec.network else b"")],
        network=spec.network,
        cgroup_procs=[],
        cwd=spec.cwd,
        argv=list(spec.argv),
        env=dict(spec.env),
        harden_args=_harden(spec),
        clone_flags=_CLONE_FLAGS | (sc.CLONE_NEWUSER if ROOTLESS else 0),
        net_pooled=False,
        new_mount_api=USE_NEW_MOUNT_API,
        rootless=ROOTLESS,
        full_map=ROOTLESS and _id_map_kind() == "full",
        devpts_opts=(b"newinstance,ptmxmode=0666,mode=0620" if _id_map_kind() == "single"
                     else b"newinstance,ptmxmode=0666,mode=0620,gid=5"),
        id_maps=[(b"/proc/self/setgroups", b"deny"),
                 (b"/proc/self/uid_map", b"0 %d 1" % os.geteuid()),
                 (b"/proc/self/gid_map", b"0 %d 1" % os.getegid())],
    )


# Tests turn this off to exercise the legacy mount(2) path on kernels that have both.
USE_NEW_MOUNT_API = True


# ------------------------------------------------------------------------ server side


def _pipe() -> tuple[int, int]:
    r, w = os.pipe()
    return nsinit.high_fd(r), nsinit.high_fd(w)


def _host_pid_of(pid1: int, ns_pid: int) -> int | None:
    """Host pid of the child of ``pid1`` whose pid inside the namespace is ``ns_pid``."""
    try:
        with open(f"/proc/{pid1}/task/{pid1}/children") as f:
            children = f.read().split()
    except OSError:
        return None
    for child in children:
        try:
            with open(f"/proc/{child}/status") as f:
                for line in f:
                    if line.startswith("NSpid:"):
                        if int(line.split()[-1]) == ns_pid:
                            return int(child)
                        break
        except (OSError, ValueError):
            continue
    return None


class _NetPool:
    """Network namespaces with slirp4netns already attached and configured, made ahead.

    A run that finds one here only pays a setns(2). Each namespace serves exactly one
    run. The slirp4netns processes are the launcher's children and die with it (an entry
    whose process is gone is dropped). Root only: rootless runs need the namespace owned
    by their own user namespace.
    """

    SIZE = 2

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready: deque[tuple[int, int]] = deque()  # (netns fd, slirp4netns pidfd)
        self._want = threading.Event()
        self._thread: threading.Thread | None = None
        self._broken = False

    def take(self) -> tuple[int, int] | None:
        """A ready (netns fd, slirp4netns pidfd), now owned by the caller; None if none
        is ready (the caller then attaches its own). The first call starts the pool."""
        with self._lock:
            if self._broken:
                return None
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name="sandbox-netpool",
                                                daemon=True)  # fmt: skip
                self._thread.start()
            entry = None
            while self._ready and entry is None:
                ns_fd, nat = self._ready.popleft()
                if nsinit.exited(nat):
                    os.close(ns_fd)
                    os.close(nat)
                else:
                    entry = (ns_fd, nat)
        self._want.set()
        return entry

    def _main(self) -> None:
        try:
            host = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._broken = True
            return
        while True:
            with self._lock:
                full = len(self._ready) >= self.SIZE
                if full:
                    self._want.clear()
            if full:
                self._want.wait()
                continue
            try:
                entry = self._make(host)
            except OSError as e:
                entry, why = None, str(e)
            else:
                why = "slirp4netns did not start"
            if entry is None:
                log.warning("network pool disabled: %s", why)
                with self._lock:
                    self._broken = True
                return
            with self._lock:
                self._ready.append(entry)

    @staticmethod
    def _make(host: int) -> tuple[int, int] | None:
        # unshare(CLONE_NEWNET) affects this thread only; slirp4netns must start back in
        # the host's namespace (its outside sockets live where it starts).
        sc.unshare(sc.CLONE_NEWNET)
        try:
            sc.interface_up(sc.ifreq(b"lo"))
            ns_fd = nsinit.high_fd(os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC))
        finally:
            sc.setns(host, sc.CLONE_NEWNET)
        nat, _err = _start_nat(ns_fd, None)
        if nat < 0:
            os.close(ns_fd)
            return None
        return ns_fd, nat


_NET_POOL = _NetPool()
# Tests turn this off to exercise the attach-while-setting-up path.
USE_NETWORK_POOL = True
_warned_no_limits = False


def _warn_no_limits_once() -> None:
    global _warned_no_limits
    if not _warned_no_limits:
        _warned_no_limits = True
        log.warning("rootless mode: cgroup limits (memory, pids, cpu) are not applied; "
                    "only the timeout bounds a run")  # fmt: skip


def _start_nat(ns_fd: int, user_fd: int | None) -> tuple[int, str | None]:
    """Start slirp4netns on the network namespace ``ns_fd``; (pidfd, None) once ready.

    It runs as a child of the launcher (PDEATHSIG against it) and is SIGKILLed by its
    owner through the pidfd. It gets the namespaces as inherited descriptors (3, and 4
    for the user namespace of a rootless run) and says it is ready — interface, address,
    routes configured — by writing to its ready pipe: readiness is an event, not a poll.
    On failure: (-1, the reason).
    """
    assert SLIRP4NETNS is not None
    fds: list[int] = []
    pidfd = -1
    try:
        ready_r, ready_w = os.pipe()
        fds += [ready_r, ready_w]
        err_r, err_w = os.pipe()
        fds += [err_r, err_w]
        pass_fds = [ns_fd, *([user_fd] if user_fd is not None else []), ready_w]
        argv = [SLIRP4NETNS, "--configure", "--mtu=65520", "--enable-ipv6", "--enable-seccomp",
                # The host's loopback services stay out of reach (10.0.2.2 → 127.0.0.1).
                "--disable-host-loopback",
                f"--ready-fd={2 + len(pass_fds)}", "--netns-type=path",
                *(["--userns-path=/proc/self/fd/4"] if user_fd is not None else []),
                "/proc/self/fd/3", "tap0"]  # fmt: skip
        _pid, pidfd = LAUNCHER.exec_helper(argv, err_w, pass_fds)
        for fd in (err_w, ready_w):
            os.close(fd)
            fds.remove(fd)
        if _wait_ready(pidfd, ready_r):
            return pidfd, None
        os.set_blocking(err_r, False)
        reason = "slirp4netns did not start"
        with contextlib.suppress(OSError):
            lines = [line for line in
                     os.read(err_r, 8192).decode(errors="replace").strip().splitlines()
                     if not line.startswith("WARNING:")]  # fmt: skip
            reason = lines[-1] if lines else reason
    except OSError as e:  # LauncherError included
        reason = str(e)
    finally:
        for fd in fds:
            os.close(fd)
    if pidfd >= 0:
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        os.close(pidfd)
    return -1, reason


def _wait_ready(pidfd: int, ready_r: int) -> bool:
    """True once slirp4netns says it is ready; False if it exits or takes too long."""
    sel = selectors.DefaultSelector()
    try:
        sel.register(ready_r, selectors.EVENT_READ, "ready")
        sel.register(pidfd, selectors.EVENT_READ, "exit")
        deadline = time.monotonic() + 30
        while (left := deadline - time.monotonic()) > 0:
            for key, _mask in sel.select(left):
                if key.data == "exit":
                    return False
                return bool(os.read(ready_r, 64))  # EOF: it closed the pipe unready
        return False
    finally:
        sel.close()


class Sandbox:
    """One running sandbox. Thread-safe methods; callbacks run on the sandbox's I/O thread."""

    def __init__(self, plan: nsinit.Plan, spec: RunSpec, on_output: Callable[[str, bytes], None],
                 on_exit: Callable[[ExitInfo], None] | None) -> None:  # fmt: skip
        self._plan = plan
        self._spec = spec
        self._on_output = on_output
        self._on_exit = on_exit
        self._lock = threading.Lock()
        self._stdin_queue: deque[bytes] = deque()
        self._stdin_closing = not spec.stdin_open
        self._stdin_closed = False
        self._forked = threading.Event()
        self._done = threading.Event()
        self._spawned = threading.Event()
        self._execd = threading.Event()  # set on R (exec done or failed) and at the end
        self._exec_ok = False
        self._spawn_error: BaseException | None = None
        self._info: ExitInfo | None = None
        self._pid1 = 0  # host pid of pid 1 (the launcher's child; it reaps it)
        self._pid1_fd = -1  # pidfd of pid 1, from the launcher
        self._pid1_gone = False
        self._netns_fd = -1  # a pooled network namespace (NAT attached) for pid 1
        self._ns_pid = 0
        self._cmd_host_pid: int | None = None
        # Signals asked for before the command has exec'd; delivered right after exec so
        # they hit the real program, not the half-set-up child.
        self._pending_signals: list[int] = []
        self._killed = False
        self._timed_out = False
        self._t0 = 0.0
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = _pipe()
        os.set_blocking(self._wake_w, False)

    @classmethod
    def start(cls, *, lowers: list[Path], upper: Path, work: Path, spec: RunSpec,
              on_output: Callable[[str, bytes], None],
              on_exit: Callable[[ExitInfo], None] | None = None) -> Sandbox:  # fmt: skip
        """Start ``spec`` over the layers (bottom..top) with a fresh upper/work pair.

        Returns once the command is forked (so ``pid`` is known) or setup has failed;
        raises SandboxError when the spec is invalid, limits cannot be applied or the
        host cannot fork. Setup failures inside the sandbox are reported through
        ExitInfo.error. Callbacks must be quick: they run on the I/O thread, which also
        enforces the timeout.
        """
        if ROOTLESS and (err := userns_error()):
            raise SandboxError(err)
        plan = _plan(lowers, upper, work, spec)
        cgroup: RunCgroup | None = None
        if ROOTLESS and spec.limits is not None and spec.limits.controllers():
            _warn_no_limits_once()
        elif spec.limits is not None and spec.limits.controllers():
            try:
                cgroup = RunCgroup.create(spec.limits)
            except CgroupError as e:
                raise SandboxError(str(e)) from e
            plan.cgroup_procs = cgroup.procs_files
        try:
            sb = cls(plan, spec, on_output, on_exit)
        except OSError as e:
            if cgroup is not None:
                cgroup.remove()
            raise SandboxError(f"cannot start sandbox: {e}") from e
        sb._cgroup = cgroup
        if spec.network and not ROOTLESS and USE_NETWORK_POOL:
            entry = _NET_POOL.take()
            if entry is not None:
                sb._netns_fd, sb._nat_fd = entry
                plan.net_pooled = True
                plan.clone_flags &= ~sc.CLONE_NEWNET
        sb._thread = threading.Thread(target=sb._io_main, name="sandbox-io", daemon=True)
        sb._thread.start()
        sb._forked.wait()
        if sb._spawn_error is not None:
            sb._thread.join()
            sb._close_wake()
            if cgroup is not None:
                cgroup.remove()
            sb._stop_nat()
            raise SandboxError(f"cannot start sandbox: {sb._spawn_error}") from sb._spawn_error
        # Return once the command is forked (or setup failed), so ``pid`` is known.
        sb._spawned.wait()
        return sb

    # ------------------------------------------------------------------ public controls

    @property
    def pid(self) -> int:
        """pid of the main process inside the sandbox (0 if it never started)."""
        return self._ns_pid

    @property
    def started(self) -> bool:
        """True once the sandbox processes exist."""
        return self._forked.is_set() and self._spawn_error is None

    def done(self) -> bool:
        """True once the run has ended and every sandbox process is gone."""
        return self._done.is_set()

    def write_stdin(self, data: bytes) -> None:
        """Queue ``data`` for the command's stdin (never blocks)."""
        with self._lock:
            if self._stdin_closing or self._stdin_closed or self._done.is_set():
                raise StdinClosed("stdin is closed")
            if data:
                self._stdin_queue.append(bytes(data))
        self._wake()

    def close_stdin(self) -> None:
        """Close stdin once the queued data is written (idempotent)."""
        with self._lock:
            self._stdin_closing = True
        self._wake()

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the main process's process group (no-op once it has exited).

        A signal asked for before the command has exec'd is kept and delivered right
        after execve succeeds: a Ctrl-C pressed right after a run starts must neither be
        lost nor hit the child before it is the real program.
        """
        with self._lock:
            if self._done.is_set():
                return
            if not self._execd.is_set():
                self._pending_signals.append(sig)
                return
        self._deliver(sig)

    def wait_exec(self, timeout: float | None = None) -> bool:
        """Wait until the command has called execve. True when it succeeded; False when
        exec failed, setup failed, the run ended first, or ``timeout`` passed."""
        self._execd.wait(timeout)
        with self._lock:
            return self._exec_ok

    def _deliver(self, sig: int) -> None:
        with self._lock:
            if self._done.is_set() or not self._ns_pid:
                return
            if self._cmd_host_pid is None:
                self._cmd_host_pid = _host_pid_of(self._pid1, self._ns_pid)
            target = self._cmd_host_pid
        if target is None:
            return
        try:
            os.killpg(target, sig)
        except ProcessLookupError:
            # The command has not called setsid() yet, so its group does not exist:
            # signal the process itself (its dispositions are already the defaults).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(target, sig)
        except PermissionError:
            pass

    def kill(self) -> None:
        """SIGKILL everything in the sandbox at once."""
        with self._lock:
            self._kill_locked()

    def wait(self, timeout: float | None = None) -> ExitInfo | None:
        """The ExitInfo once done (after on_exit returned), or None on timeout."""
        if threading.current_thread() is self._thread:
            return self._info
        if not self._done.wait(timeout):
            return None
        return self._info

    # ------------------------------------------------------------------------ internals

    def _wake(self) -> None:
        with self._lock:  # the fd number must not be reused under us once closed
            if self._wake_w >= 0:
                with contextlib.suppress(BlockingIOError, OSError):
                    os.write(self._wake_w, b"!")

    def _close_wake(self) -> None:
        with self._lock:
            fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def _kill_locked(self) -> None:
        if self._pid1_gone:
            return
        self._killed = True  # before pid 1 exists: _io_main kills it as it arrives
        if self._pid1_fd >= 0:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._pid1_fd, signal.SIGKILL)

    def _io_main(self) -> None:
        made: list[int] = []
        pooled_fd = -1
        try:
            wait_net = self._plan.network and not self._plan.net_pooled
            for _ in range(4 + wait_net + self._plan.full_map):
                made.extend(_pipe())
            stdin_r, stdin_w, out_r, out_w, err_r, err_w, st_r, st_w = made[:8]
            extra = made[8:]
            go_r, self._netgo_w = (extra.pop(0), extra.pop(0)) if wait_net else (-1, -1)
            if self._plan.net_pooled:  # pid 1 setns()es into it on fd 4
                go_r = pooled_fd = self._netns_fd
                self._netns_fd = -1
            ugo_r, self._usergo_w = (extra.pop(0), extra.pop(0)) if extra else (-1, -1)
            child_ends = (stdin_r, out_w, err_w, st_w)
            self._t0 = time.monotonic()
            pid, pidfd = LAUNCHER.spawn(self._plan, child_ends, go_r, ugo_r)
        except BaseException as e:  # EMFILE, EAGAIN, no launcher...: start() raises it
            for fd in (*made, pooled_fd, self._netns_fd):
                if fd >= 0:
                    os.close(fd)
            self._netns_fd = -1
            self._netgo_w = self._usergo_w = -1
            self._spawn_error = e
            self._forked.set()
            return
        for fd in (*child_ends, go_r, ugo_r):
            if fd >= 0:
                os.close(fd)
        with self._lock:
            self._pid1, self._pid1_fd = pid, pidfd
            if self._killed:  # kill() or the timeout came first
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        self._forked.set()
        try:
            self._loop(stdin_w, out_r, err_r, st_r)
        finally:
            self._close_netgo(b"")
            self._answer_userns(b"")
            self._spawned.set()
            self._execd.set()
            self._finish()

    def _answer_userns(self, answer: bytes) -> None:
        if self._usergo_w >= 0:
            with contextlib.suppress(OSError):
                if answer:
                    os.write(self._usergo_w, answer)
            os.close(self._usergo_w)
            self._usergo_w = -1

    def _map_userns(self) -> None:
        """Full map: newuidmap/newgidmap (setuid helpers) write pid 1's maps."""
        uid, gid = os.geteuid(), os.getegid()
        answer = b"0"
        try:
            for tool, own, sub in (("newuidmap", uid, SUBUIDS), ("newgidmap", gid, SUBGIDS)):
                assert sub is not None
                argv = [tool, str(self._pid1), "0", str(own), "1",
                        "1", str(sub[0]), str(sub[1])]  # fmt: skip
                res = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
                if res.returncode != 0:
                    self._userns_error = (res.stderr.strip().splitlines() or [tool])[-1]
                    break
            else:
                answer = b"1"
        except (OSError, subprocess.SubprocessError) as e:
            self._userns_error = str(e)
        self._answer_userns(answer)

    def _close_netgo(self, answer: bytes) -> None:
        if self._netgo_w >= 0:
            with contextlib.suppress(OSError):
                if answer:
                    os.write(self._netgo_w, answer)
            os.close(self._netgo_w)
            self._netgo_w = -1

    def _attach_network(self) -> None:
        """Attach slirp4netns to pid 1's fresh network namespace (pid 1 waits for
        the answer on its go pipe before starting the command)."""
        answer = b"0"
        fds: list[int] = []
        try:
            fds.append(os.open(f"/proc/{self._pid1}/ns/net", os.O_RDONLY | os.O_CLOEXEC))
            if self._plan.rootless:  # join the sandbox's user namespace first
                fds.append(os.open(f"/proc/{self._pid1}/ns/user",
                                   os.O_RDONLY | os.O_CLOEXEC))  # fmt: skip
            nat, self._net_error = _start_nat(fds[0], fds[1] if len(fds) > 1 else None)
            if nat >= 0:
                self._nat_fd = nat
                answer = b"1"
        except OSError as e:
            self._net_error = str(e)
        finally:
            for fd in fds:
                os.close(fd)
        self._close_netgo(answer)


    def _stop_nat(self) -> None:
        # SIGKILL and move on: the launcher reaps it. Its exit closes the tap device, and
        # unregistering a network device waits for RCU grace periods (20-50 ms measured)
        # that the run's result need not wait for.
        if self._nat_fd >= 0:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._nat_fd, signal.SIGKILL)
            os.close(self._nat_fd)
            self._nat_fd = -1

    def _loop(self, stdin_w: int, out_r: int, err_r: int, st_r: int) -> None:
        sel = selectors.DefaultSelector()
        os.set_blocking(stdin_w, False)
        sel.register(out_r, selectors.EVENT_READ, "stdout")
        sel.register(err_r, selectors.EVENT_READ, "stderr")
        sel.register(st_r, selectors.EVENT_READ, "status")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        open_reads = {out_r, err_r, st_r}
        stdin_fd: int | None = stdin_w
        stdin_registered = False
        pending = b""  # stdin bytes taken from the queue but not yet written
        status_buf = b""
        timeout = self._spec.timeout
        deadline = self._t0 + timeout if timeout is not None else None
        try:
            while open_reads:
                # stdin: close when asked and drained; watch writability while data waits.
                if stdin_fd is not None:
                    with self._lock:
                        if not pending and self._stdin_queue:
                            pending = b"".join(self._stdin_queue)
                            self._stdin_queue.clear()
                        closing = self._stdin_closing
                    if not pending and closing:
                        if stdin_registered:
                            sel.unregister(stdin_fd)
                        os.close(stdin_fd)
                        stdin_fd, stdin_registered = None, False
                        with self._lock:
                            self._stdin_closed = True
                    elif pending and not stdin_registered:
                        sel.register(stdin_fd, selectors.EVENT_WRITE, "stdin")
                        stdin_registered = True
                wait_for: float | None = None
                if deadline is not None and not self._timed_out:
                    wait_for = max(0.0, deadline - time.monotonic())
                # Status lines first: a pid announced in the same round as output must be
                # known before on_output runs (it may call signal()).
                events = sorted(sel.select(wait_for), key=lambda ev: ev[0].data != "status")
                if deadline is not None and not self._timed_out and time.monotonic() >= deadline:
                    with self._lock:
                        self._timed_out = True
                        self._kill_locked()
                for key, _mask in events:
                    fd = int(key.fd)
                    what = key.data
                    if what == "wake":
                        with contextlib.suppress(BlockingIOError):
                            os.read(fd, 4096)
                    elif what == "stdin":
                        try:
                            n = os.write(fd, pending[:_READ_CHUNK * 4])
                            pending = pending[n:]
                        except BlockingIOError:
                            pass
                        except OSError:  # EPIPE: nobody reads stdin any more
                            pending = b""
                            with self._lock:
                                self._stdin_queue.clear()
                                self._stdin_closing = True
                        if not pending and stdin_registered:
                            sel.unregister(fd)
                            stdin_registered = False
                    else:
                        try:
                            chunk = os.read(fd, _READ_CHUNK)
                        except BlockingIOError:
                            continue
                        if not chunk:
                            sel.unregister(fd)
                            os.close(fd)
                            open_reads.discard(fd)
                        elif what == "status":
                            status_buf += chunk
                            *lines, status_buf = status_buf.split(b"\n")
                            for line in lines:
                                self._status_line(line)
                        else:
                            try:
                                self._on_output(what, chunk)
                            except Exception:
                                log.exception("sandbox on_output callback failed")
        finally:
            sel.close()
            for fd in open_reads:
                os.close(fd)
            if stdin_fd is not None:
                os.close(stdin_fd)
            with self._lock:
                self._stdin_closed = True

    def _status_line(self, line: bytes) -> None:
        parts = line.split()
        if not parts:
            return
        kind = parts[0]
        if kind == b"W":
            texts = [b"" if part == b"-" else bytes.fromhex(part.decode()) for part in parts[1:]]
            self.network_files = {name: text.decode(errors="replace")
                                  for name, text in zip(nsinit.NET_FILES, texts, strict=False)}  # fmt: skip
        elif kind == b"N":
            self._attach_network()
        elif kind == b"U":
            self._map_userns()
        elif kind == b"S":
            with self._lock:
                self._ns_pid = int(parts[1])
            self._spawned.set()
        elif kind == b"R":
            with self._lock:
                self._exec_ok = self._error is None
                pending, self._pending_signals = self._pending_signals, []
                self._execd.set()
            for sig in pending:
                self._deliver(sig)
        elif kind == b"E":
            if self._error is None:
                self._error = (parts[1].decode(errors="replace"), int(parts[2]))
        elif kind == b"X":
            self._status = int(parts[1])
            self._rusage = dict(zip(RUSAGE_KEYS, (int(p) for p in parts[2:]), strict=False))

    # Network runs: pid 1's /proc/net files (nsinit.NET_FILES), read before the command.
    network_files: dict[str, str] | None = None
    _error: tuple[str, int] | None = None
    _cgroup: RunCgroup | None = None
    _net_error: str | None = None
    _nat_fd = -1
    _netgo_w = -1
    _usergo_w = -1
    _userns_error: str | None = None
    _status: int | None = None
    _rusage: dict[str, int] | None = None

    def _finish(self) -> None:
        # pid 1 exits (its pidfd turns readable) only after every process of its pid
        # namespace is gone, and with them the mount namespace holding the overlay.
        nsinit.exited(self._pid1_fd, None)
        with self._lock:
            self._pid1_gone = True
            pid1_fd, self._pid1_fd = self._pid1_fd, -1
        os.close(pid1_fd)
        self._stop_nat()
        duration = time.monotonic() - self._t0
        self._info = self._exit_info(duration)
        if self._cgroup is not None:
            self._info.oom_killed = self._cgroup.oom_killed()
            # ru_maxrss counts the forked launcher's pages the command held before exec
            # (a few MB); the run's memory cgroup only charges what the run allocated.
            # Take the smaller: exact for big programs, far closer for small ones.
            peak = self._cgroup.peak_memory()
            if peak is not None and self._info.rusage.get("max_rss_kb"):
                self._info.rusage["max_rss_kb"] = min(self._info.rusage["max_rss_kb"],
                                                      peak // 1024)  # fmt: skip
            self._cgroup.remove()
            if self._info.oom_killed and self._status is None and not self._timed_out:
                # pid 1 itself was the OOM victim: the run died of SIGKILL all the same.
                self._info.signal, self._info.error = signal.SIGKILL, None
        self._close_wake()
        if self._on_exit is not None:
            try:
                self._on_exit(self._info)
            except Exception:
                log.exception("sandbox on_exit callback failed")
        self._done.set()

    def _exit_info(self, duration: float) -> ExitInfo:
        rusage = self._rusage or dict.fromkeys(RUSAGE_KEYS, 0)
        exit_code: int | None = None
        sig: int | None = None
        error: str | None = None
        if self._timed_out:
            sig = signal.SIGKILL
        elif self._status is not None:
            if os.WIFEXITED(self._status):
                exit_code = os.WEXITSTATUS(self._status)
            elif os.WIFSIGNALED(self._status):
                sig = os.WTERMSIG(self._status)
        elif self._killed:
            sig = signal.SIGKILL
        if self._error is not None:
            stage, err = self._error
            reason = os.strerror(err) if err else "failed"
            if self._userns_error is not None:
                error = f"user namespace setup failed: {self._userns_error}"
            elif stage == nsinit.EXEC_STAGE.decode():
                error = f"exec {self._spec.argv[0]}: {reason}"
                if not self._timed_out:
                    exit_code = 127 if err == errno.ENOENT else 126
            else:
                error = f"sandbox setup failed at {stage}: {reason}"
        elif self._userns_error is not None:
            error = f"user namespace setup failed: {self._userns_error}"
        elif self._net_error is not None:
            error = f"network setup failed: {self._net_error}"
        elif self._status is None and not self._killed and not self._timed_out:
            error = "sandbox exited without a status"
        return ExitInfo(exit_code=exit_code, signal=sig, timed_out=self._timed_out,
                        pid=self._ns_pid, duration=duration, rusage=rusage, error=error)  # fmt: skip
