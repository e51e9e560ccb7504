"""The far side of the launcher socket: the launcher process, pid 1 and the command.

This module is the whole program of the launcher process (``python -m
contree_shell.sandbox.nsinit FD``), so it imports only small modules: every byte the
launcher holds is copied (page tables, copy-on-write) into each sandbox it forks.

Process tree of one run (host view)::

    launcher ──clone(new mnt pid uts ipc net [user])──► pid 1 "contree-init":
        joins the run's cgroups, unshares its cgroup namespace, mounts the overlay,
        /proc /sys /dev /etc binds, hostname, lo up, pivot_root; reaps until the
        command exits
          └─fork─► command: setsid, uid/gid, caps, no_new_privs, seccomp, execvpe

pid 1 is cloned straight into its namespaces, so a run costs one copy of the launcher
plus the command (which execs at once). The launcher answers each request with pid 1's
host pid and a pidfd of it, opened before the launcher can reap it.

Children report to the server on a status pipe (fd 3), one line each::

    U                              rootless with a full uid map: the user namespace
                                   exists; pid 1 waits on fd 5 while the server runs
                                   newuidmap/newgidmap
    N                              network without a pooled namespace: the namespace
                                   exists; the server attaches slirp4netns while pid 1 builds
                                   the root, and pid 1 waits on fd 4 before the command
    W <hex> <hex> ...              network runs, before the command: pid 1's view of
                                   /proc/net (NET_FILES, in order; "-" if unreadable)
    S <namespace pid of command>   once the command is forked
    R                              the command exec'd (or failed to, with its E line
                                   first): it holds a close-on-exec pipe until execve
    E <stage> <errno>              a setup step (or exec) failed
    X <wait status> <15 rusage counters>   when the command has exited

Protocol with the server, over a private AF_UNIX stream socketpair (the server
serializes requests, so a reply answers the last request)::

    server → launcher   8-byte length + marshal of a request, its descriptors as
                        SCM_RIGHTS on the length:
                        ("run", plan fields, has_netgo, has_usergo): a sandbox;
                        ("exec", argv): a host-side helper (slirp4netns), descriptors
                        [stderr, *passed as 3, 4, ...];
                        ("enter", cwd, argv, env, hardening, cgroup.procs files,
                        has_user, n_late): an extra process in a running sandbox,
                        descriptors [stdin, stdout, stderr, status, pid ns,
                        (user ns,) *mnt uts ipc net cgroup ns]
    launcher → server   8-byte length + marshal of (pid, errno, message),
                        a pidfd of the new process as SCM_RIGHTS

Lifetime: the launcher exits when its socket reaches EOF, which the kernel provides the
moment the server dies (even by SIGKILL). pid 1 and the helpers carry PR_SET_PDEATHSIG
against the launcher, so the kernel then kills every pid namespace, and each mount namespace (with
its overlay) goes with its last process. Nothing is mounted in the host's namespace.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import marshal
import os
import resource  # noqa: F401  # os.wait4 imports it lazily; pid 1 after pivot_root cannot
import select
import signal
import socket
import sys
from typing import Any

from contree_shell.sandbox import hardening
from contree_shell.sandbox import syscalls as sc

STATUS_FD = 3
NETGO_FD = 4  # network runs: pid 1 waits here until NAT is attached (or joins it)
USERGO_FD = 5  # rootless, full uid map: pid 1 waits here for newuidmap
EXEC_STAGE = b"exec"
_INIT_NAME = sc.make_name_buffer(b"contree-init")  # what `ps` in the sandbox shows as pid 1
_LAUNCHER_NAME = sc.make_name_buffer(b"contree-launch")
# What the `network` event reports, read by pid 1 inside the namespace before the
# command starts (a short run may be gone before the server could look).
NET_FILES = ("dev", "route", "fib_trie", "if_inet6", "ipv6_route")
_HEADER_SIZE = 8
_MAX_MESSAGE = 64 << 20
READY = b"R"


class Plan:
    """Every byte string and structure pid 1 and the command use, built by the server.

    Its fields are primitives, so :meth:`wire` crosses to the launcher with marshal;
    ``harden`` (ctypes structures) is built there from ``harden_args``.
    """

    def __init__(self, *, lowers: list[bytes], upper: bytes, work: bytes, target: bytes,
                 legacy_dir: bytes, legacy_data: bytes, hostname: bytes,
                 etc_files: list[tuple[bytes, bytes]], network: bool,
                 cgroup_procs: list[bytes], cwd: str, argv: list[str], env: dict[str, str],
                 harden_args: Any, clone_flags: int, rootless: bool, full_map: bool,
                 id_maps: list[tuple[bytes, bytes]], devpts_opts: bytes, net_pooled: bool,
                 new_mount_api: bool) -> None:  # fmt: skip
        self.lowers = lowers  # top first, scaffold last
        self.upper = upper
        self.work = work
        self.target = target
        self.legacy_dir = legacy_dir
        self.legacy_data = legacy_data
        self.hostname = hostname
        self.etc_files = etc_files  # (target, content)
        self.network = network
        self.cgroup_procs = cgroup_procs
        self.cwd = cwd
        self.argv = argv
        self.env = env
        self.harden_args = harden_args
        self.clone_flags = clone_flags
        self.rootless = rootless
        self.full_map = full_map  # rootless: the server runs newuidmap/newgidmap for us
        self.id_maps = id_maps  # (file, content), written by pid 1 itself otherwise
        self.devpts_opts = devpts_opts
        self.net_pooled = net_pooled  # join the namespace on fd 4 (NAT attached)
        self.new_mount_api = new_mount_api
        self.harden: hardening.Hardening | None = None

    def wire(self) -> dict[str, Any]:
        """The constructor's arguments (marshal-able)."""
        return {name: value for name, value in vars(self).items() if name != "harden"}

    @classmethod
    def from_wire(cls, wire: Any) -> Plan:
        plan = cls(**wire)
        plan.harden = hardening.Hardening.from_args(plan.harden_args)
        return plan


# ------------------------------------------------------------------------- framing


def exited(pidfd: int, timeout: float | None = 0) -> bool:
    """True when the process behind ``pidfd`` has exited (its pidfd turns readable),
    waiting up to ``timeout`` seconds for it (None: until it does)."""
    poll = select.poll()  # not select(): any descriptor number works
    poll.register(pidfd, select.POLLIN)
    return bool(poll.poll(None if timeout is None else int(timeout * 1000)))


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """Exactly ``n`` bytes from ``sock``; None at EOF."""
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def recv_message(sock: socket.socket, max_fds: int) -> tuple[Any, list[int]] | None:
    """One framed message and the descriptors sent with it; None at EOF."""
    head, fds, _flags, _addr = socket.recv_fds(sock, _HEADER_SIZE, max_fds)
    try:
        if not head:
            return None
        if len(head) < _HEADER_SIZE:
            rest = recv_exact(sock, _HEADER_SIZE - len(head))
            if rest is None:
                return None
            head += rest
        size = int.from_bytes(head, "big")
        if size > _MAX_MESSAGE:
            raise ValueError(f"message of {size} bytes")
        body = recv_exact(sock, size)
        if body is None:
            return None
        return marshal.loads(body), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def send_message(sock: socket.socket, obj: Any, fds: list[int]) -> None:
    """Send ``obj`` (marshal-able) framed, with ``fds`` attached."""
    body = marshal.dumps(obj)
    socket.send_fds(sock, [len(body).to_bytes(_HEADER_SIZE, "big")], fds)
    sock.sendall(body)


# ------------------------------------------------------------- pid 1 and the command


def _report(line: bytes) -> None:
    with contextlib.suppress(OSError):
        os.write(STATUS_FD, line)


def _mount_overlay(plan: Plan) -> None:
    fs = -1
    if plan.new_mount_api:
        with contextlib.suppress(OSError):
            fs = sc.fsopen(b"overlay")
    if fs >= 0:
        try:
            for layer in plan.lowers:
                sc.fsconfig(fs, sc.FSCONFIG_SET_STRING, b"lowerdir+", layer)
            sc.fsconfig(fs, sc.FSCONFIG_SET_STRING, b"upperdir", plan.upper)
            sc.fsconfig(fs, sc.FSCONFIG_SET_STRING, b"workdir", plan.work)
            if plan.rootless:  # trusted.* xattrs need CAP_SYS_ADMIN in the host userns
                sc.fsconfig(fs, sc.FSCONFIG_SET_FLAG, b"userxattr")
            sc.fsconfig(fs, sc.FSCONFIG_CMD_CREATE)
            mnt = sc.fsmount(fs)
            try:
                sc.move_mount(mnt, plan.target)
            finally:
                os.close(mnt)
            return
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
        finally:
            os.close(fs)
    os.chdir(plan.legacy_dir)  # kernels without lowerdir+: relative layer names
    data = plan.legacy_data + (b",userxattr" if plan.rootless else b"")
    sc.mount(b"overlay", plan.target, b"overlay", 0, data)


def _write_file(path: bytes, content: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, content)
    finally:
        os.close(fd)


def _map_user(plan: Plan) -> None:
    """Rootless: become root of the new user namespace (its maps written first)."""
    if plan.full_map:
        _report(b"U\n")
        if os.read(USERGO_FD, 1) != b"1":
            os._exit(1)  # the server reported why newuidmap failed
        os.close(USERGO_FD)
    else:
        for path, content in plan.id_maps:
            _write_file(path, content)
    # Become root of the namespace for real: the maps exist only now.
    os.setgid(0)
    os.setuid(0)


def _read_all(path: bytes) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _network_line() -> bytes:
    parts = []
    for name in NET_FILES:
        try:
            parts.append(_read_all(b"/proc/net/" + name.encode()).hex().encode() or b"-")
        except OSError:
            parts.append(b"-")
    return b"W " + b" ".join(parts) + b"\n"


def _leave_launcher(launcher_fd: int) -> None:
    """First thing in every child of the launcher: die with it (PDEATHSIG), or now if it
    died before that was armed; and drop its signal handlers and mask."""
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
    if exited(launcher_fd):
        os._exit(1)
    sc.reset_signals(hardening.RESET_SIGNALS)


def _take_stdio(fds: list[int]) -> None:
    """stdin, stdout, stderr and the status pipe onto 0..3. Every descriptor the launcher
    passes is >= 10 (see high_fd), so this cannot clobber one still to be moved."""
    for src, dst in zip(fds, (0, 1, 2, STATUS_FD), strict=True):
        os.dup2(src, dst, inheritable=dst < STATUS_FD)


def run_pid1(plan: Plan, fds: list[int], netgo: int, usergo: int, launcher_fd: int) -> None:
    """pid 1 of a fresh sandbox (cloned into its namespaces); never returns."""
    code = 1
    stage = b"setup"
    try:
        _leave_launcher(launcher_fd)
        sc.set_process_name(_INIT_NAME)
        _take_stdio(fds)
        for src, dst in ((netgo, NETGO_FD), (usergo, USERGO_FD)):
            if src >= 0:
                os.dup2(src, dst, inheritable=False)
            else:
                with contextlib.suppress(OSError):
                    os.close(dst)
        # Drop every other descriptor of the launcher (other runs' pipes among them).
        os.closerange(USERGO_FD + 1, 1 << 20)
        stage = b"cgroup"
        for procs in plan.cgroup_procs:  # before the cgroup namespace is unshared
            _write_file(procs, b"0")
        if plan.net_pooled:  # a namespace made ahead, with NAT already attached
            stage = b"network"
            sc.setns(NETGO_FD, sc.CLONE_NEWNET)
            os.close(NETGO_FD)
        if plan.rootless:
            stage = b"userns"
            _map_user(plan)
        stage = b"unshare"
        sc.unshare(sc.CLONE_NEWCGROUP)
        if plan.network and not plan.net_pooled:
            # The server attaches NAT to our namespace while we build the root; we wait
            # for its answer on fd 4 only before starting the command.
            _report(b"N\n")
        stage = b"mount-private"
        sc.mount(None, b"/", None, sc.MS_REC | sc.MS_PRIVATE)
        stage = b"mount-overlay"
        _mount_overlay(plan)
        os.umask(0o022)
        os.chdir(plan.target)
        stage = b"mount-proc"
        hardening.setup_proc(b"/dev/null")
        stage = b"mount-sys"
        hardening.setup_sys()
        stage = b"mount-dev"
        hardening.setup_dev(b"/dev", plan.devpts_opts)
        stage = b"mount-etc"
        for target, content in plan.etc_files:
            hardening.bind_private_file(b"dev/.contree-etc", target, content)
        stage = b"sethostname"
        sc.sethostname(plan.hostname)
        stage = b"loopback"
        sc.interface_up(sc.ifreq(b"lo"))
        stage = b"pivot_root"
        sc.pivot_root(b".", b".")
        sc.umount2(b".", sc.MNT_DETACH)
        os.chdir(b"/")
        stage = b"cwd"
        os.makedirs(plan.cwd, 0o755, exist_ok=True)
        os.chdir(plan.cwd)
        if plan.network and not plan.net_pooled:
            stage = b"network"
            if os.read(NETGO_FD, 1) != b"1":
                os._exit(1)  # the server knows why NAT failed
            os.close(NETGO_FD)
        if plan.network:
            _report(_network_line())
        stage = b"fork"
        # The command waits on ``go`` until the server has been told its pid, so a
        # signal() issued as soon as its first output arrives finds it. It holds
        # ``exec_w`` (close-on-exec) until execve succeeds: EOF on ``exec_r`` is the
        # "exec done" event (R) the server delivers queued signals on.
        go_r, go_w = os.pipe()
        exec_r, exec_w = os.pipe2(os.O_CLOEXEC)
        cmd = os.fork()
        if cmd == 0:
            os.close(go_w)
            os.close(exec_r)
            os.read(go_r, 1)
            os.close(go_r)
            _command(plan)
        os.close(go_r)
        os.close(exec_w)
        _report(b"S %d\n" % cmd)
        os.close(go_w)
        for fd in (0, 1, 2):
            os.close(fd)
        os.read(exec_r, 1)  # EOF: exec'd, or failed (its E line is already written)
        os.close(exec_r)
        _report(b"R\n")
        stage = b"wait"
        while True:
            pid, status, ru = os.wait4(-1, 0)
            if pid == cmd:
                break
        _report(hardening.exit_line(status, ru))
        code = 0
    except BaseException as e:
        _report(b"E %s %d\n" % (stage, getattr(e, "errno", None) or 0))
    finally:
        os._exit(code)


def _command(plan: Plan) -> None:
    """The command: new session, dropped privileges, exec; never returns."""
    try:
        os.setsid()
    except OSError as e:
        _report(b"E harden %d\n" % (e.errno or 0))
        os._exit(127)
    assert plan.harden is not None
    _exec_hardened(plan.argv, plan.env, plan.harden)


def _exec_hardened(argv: list[str], env: dict[str, str], harden: hardening.Hardening) -> None:
    """Drop privileges and exec (the main command and extra processes); never returns."""
    stage = b"harden"
    try:
        # Under memory pressure the OOM killer should pick the workload, not pid 1 (whose
        # death would lose the exit status) nor the server; raising needs no capability.
        with contextlib.suppress(OSError):
            _write_file(b"/proc/self/oom_score_adj", b"500")
        hardening.apply(harden)
        stage = EXEC_STAGE
        os.execvpe(argv[0], argv, env)
    except BaseException as e:
        err = getattr(e, "errno", None) or 0
        _report(b"E %s %d\n" % (stage, err))
        os._exit(127 if stage != EXEC_STAGE or err == errno.ENOENT else 126)
    os._exit(127)


# -------------------------------------------- extra processes in a running sandbox


def _enter_helper(fds: list[int], pid_fd: int, user_fd: int, late: list[int],
                  procs: list[bytes], cwd: bytes, argv: list[str], env: dict[str, str],
                  harden: hardening.Hardening, launcher_fd: int) -> None:  # fmt: skip
    """The helper of an extra process: joins the sandbox's pid namespace (setns only
    affects its children), forks the process, reaps it and reports; never returns.

    It stays outside the sandbox's mount namespace, so that namespace is only ever held
    by the sandbox's own processes."""
    code = 1
    stage = b"setup"
    try:
        _leave_launcher(launcher_fd)
        _take_stdio(fds)
        # Then drop everything else the launcher had open.
        low = STATUS_FD + 1
        for fd in sorted(f for f in (pid_fd, user_fd, *late) if f >= 0):
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, 1 << 20)
        stage = b"cgroup"
        for procs_file in procs:
            with contextlib.suppress(OSError):
                _write_file(procs_file, b"0")
        if user_fd >= 0:
            stage = b"setns-user"
            sc.setns(user_fd, 0)
        stage = b"setns-pid"
        sc.setns(pid_fd, 0)
        stage = b"fork"
        pid = os.fork()
        if pid == 0:
            _enter_process(late, cwd, argv, env, harden)
        _report(b"S %d\n" % pid)
        for fd in (0, 1, 2):
            os.close(fd)
        _pid, status, ru = os.wait4(pid, 0)
        _report(hardening.exit_line(status, ru))
        code = 0
    except BaseException as e:
        _report(b"E %s %d\n" % (stage, getattr(e, "errno", None) or 0))
    finally:
        os._exit(code)


def _enter_process(late: list[int], cwd: bytes, argv: list[str], env: dict[str, str],
                   harden: hardening.Hardening) -> None:  # fmt: skip
    """The extra process, inside the sandbox's pid namespace: join the rest, exec."""
    stage = b"setup"
    try:
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        stage = b"setns"
        for fd in late:
            sc.setns(fd, 0)
            os.close(fd)
        stage = b"cwd"
        os.chdir(b"/")
        with contextlib.suppress(OSError):
            os.makedirs(cwd, 0o755, exist_ok=True)
        os.chdir(cwd)
        stage = b"harden"
        os.setsid()
        _report(b"R\n")
    except BaseException as e:
        _report(b"E %s %d\n" % (stage, getattr(e, "errno", None) or 0))
        os._exit(127)
    _exec_hardened(argv, env, harden)


# ------------------------------------------------------------------- the launcher


def high_fd(fd: int) -> int:
    """``fd`` moved to 10 or above (close-on-exec), so a child's dup2 onto the low
    descriptors (0..5) cannot clobber it."""
    if fd >= 10:
        return fd
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return new


def _exec_helper(argv: list[str], err_fd: int, pass_fds: list[int], launcher_fd: int) -> None:
    """A host-side helper (slirp4netns): stdio on /dev/null and ``err_fd``, ``pass_fds`` as 3, 4,
    ...; dies with the launcher; never returns."""
    try:
        _leave_launcher(launcher_fd)
        for i, fd in enumerate(pass_fds):  # out of the way of 0..4 first
            os.dup2(fd, 100 + i)
        os.dup2(err_fd, 99)
        null = os.open("/dev/null", os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(99, 2)
        for i in range(len(pass_fds)):
            os.dup2(100 + i, 3 + i)  # inheritable: the helper opens /proc/self/fd/3 (and 4)
        os.closerange(3 + len(pass_fds), 1 << 20)
        os.execv(argv[0], argv)
    finally:
        os._exit(127)


def _spawn(request: Any, fds: list[int], launcher_fd: int
           ) -> tuple[tuple[int, int, str], list[int]]:  # fmt: skip
    kind = request[0]
    if kind == "exec":
        argv = [str(a) for a in request[1]]
        if not fds:
            raise ValueError("exec needs a stderr descriptor")
        try:
            pid = os.fork()
        except OSError as e:
            return (0, e.errno or 1, f"cannot start {argv[0]}: {e.strerror}"), []
        if pid == 0:
            _exec_helper(argv, fds[0], fds[1:], launcher_fd)  # never returns
    elif kind == "enter":
        _kind, cwd, argv, env, harden_args, procs, has_user, n_late = request
        harden = hardening.Hardening.from_args(harden_args)
        rest = fds[4:]
        pid_fd = rest.pop(0)
        user_fd = rest.pop(0) if has_user else -1
        late = rest[:n_late]
        try:
            pid = os.fork()
        except OSError as e:
            return (0, e.errno or 1, f"cannot start the process: {e.strerror}"), []
        if pid == 0:
            _enter_helper(fds[:4], pid_fd, user_fd, late, [bytes(p) for p in procs],
                          bytes(cwd), [str(a) for a in argv], dict(env), harden,
                          launcher_fd)  # fmt: skip
    elif kind == "run":
        _kind, plan_wire, has_netgo, has_usergo = request
        plan = Plan.from_wire(plan_wire)
        extra = fds[4:]
        netgo = extra.pop(0) if has_netgo else -1
        usergo = extra.pop(0) if has_usergo else -1
        try:
            pid = sc.clone(plan.clone_flags)
        except OSError as e:
            return (0, e.errno or 1, f"cannot start a sandbox: {e.strerror}"), []
        if pid == 0:
            run_pid1(plan, fds[:4], netgo, usergo, launcher_fd)  # never returns
    else:
        raise ValueError(f"unknown request {kind!r}")
    try:
        pidfd = sc.pidfd_open(pid)
    except OSError as e:  # cannot happen while the child is unreaped; do not leak it
        os.kill(pid, signal.SIGKILL)
        return (0, e.errno or 1, f"pidfd_open: {e.strerror}"), []
    return (pid, 0, ""), [pidfd]


def _reap() -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main() -> None:
    """The launcher process: fork sandboxes on request until the server goes away."""
    sock = socket.socket(fileno=high_fd(int(sys.argv[1])))
    sc.set_process_name(_LAUNCHER_NAME)
    # pid 1 checks this pidfd of ours right after arming PDEATHSIG: readable means we
    # died before it was armed. (getppid() is 0 across the pid namespace boundary.)
    launcher_fd = high_fd(sc.pidfd_open(os.getpid()))
    wake_r, wake_w = (high_fd(fd) for fd in os.pipe())
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda _sig, _frame: None)
    # Everything imported so far is shared, read-only, with every sandbox: keep the
    # collector from ever touching (and so copying) it in a child.
    gc.collect()
    gc.freeze()
    sock.sendall(READY)
    poll = select.poll()
    poll.register(sock.fileno(), select.POLLIN)
    poll.register(wake_r, select.POLLIN)
    while True:
        for fd, _event in poll.poll():
            if fd == wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
                _reap()
                continue
            try:
                message = recv_message(sock, 16)
            except (OSError, ValueError, EOFError, TypeError):
                return
            if message is None:
                return  # the server is gone; our sandboxes die with us (PDEATHSIG)
            request, fds = message
            fds = [high_fd(fd) for fd in fds]
            try:
                reply, send = _spawn(request, fds, launcher_fd)
            except (ValueError, TypeError, IndexError) as e:  # malformed: answer, go on
                reply, send = (0, errno.EINVAL, f"bad launcher request: {e}"), []
            finally:
                for fd in fds:
                    os.close(fd)
            try:
                send_message(sock, reply, send)
            except OSError:
                return
            finally:
                for fd in send:
                    os.close(fd)
            _reap()


if __name__ == "__main__":
    main()
