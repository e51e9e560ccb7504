"""What a sandboxed process may do: capabilities, no_new_privs, seccomp, /proc and /dev.

Two halves, kept apart on purpose:

- ``prepare(...)`` runs in the server (any thread) and works out what a run gets:
  capability masks and the compiled seccomp program (built once per process with
  pyseccomp and exported as classic BPF), as primitives that cross to the launcher.
- :class:`Hardening` builds the ctypes structures from them, in the launcher, before
  forking.
- ``setup_proc`` / ``setup_sys`` / ``setup_dev`` (pid 1, before pivot_root) and
  ``apply`` (the command, just before exec) run in a forked child and only call the
  pre-resolved wrappers of :mod:`syscalls` and ``os`` functions.
"""

from __future__ import annotations

import _thread
import ctypes
import errno
import functools
import os
import signal
import stat
from typing import Any

from contree_shell.sandbox import syscalls as sc

# Capabilities kept in the bounding/effective/permitted sets: the usual container default
# minus MKNOD. Everything else, notably SYS_ADMIN, SYS_MODULE, SYS_PTRACE, SYS_TIME,
# NET_ADMIN, SYS_RAWIO, SYS_BOOT and MKNOD, is dropped.
CAP_NAMES: dict[str, int] = {
    "CHOWN": 0, "DAC_OVERRIDE": 1, "FOWNER": 3, "FSETID": 4, "KILL": 5, "SETGID": 6,
    "SETUID": 7, "SETPCAP": 8, "NET_BIND_SERVICE": 10, "NET_RAW": 13, "SYS_CHROOT": 18,
    "AUDIT_WRITE": 29, "SETFCAP": 31,
}  # fmt: skip
ALLOWED_CAPS = sum(1 << bit for bit in CAP_NAMES.values())  # 0xa00425fb

# Syscalls that fail with EPERM inside the sandbox. Several are already refused for lack
# of a capability; the filter also covers the ones that need none (unshare of a user
# namespace, keyctl, bpf, userfaultfd, io_uring, ...).
DENIED_SYSCALLS: tuple[str, ...] = (
    "keyctl", "add_key", "request_key", "bpf", "kexec_load", "kexec_file_load",
    "open_by_handle_at", "name_to_handle_at", "init_module", "finit_module",
    "delete_module", "create_module", "mount", "umount", "umount2", "pivot_root",
    "unshare", "setns", "ptrace", "perf_event_open", "fsopen", "fsconfig", "fsmount",
    "fspick", "move_mount", "open_tree", "mount_setattr", "swapon", "swapoff", "reboot",
    "acct", "quotactl", "quotactl_fd", "userfaultfd", "lookup_dcookie", "nfsservctl",
    "uselib", "_sysctl", "vhangup", "iopl", "ioperm", "syslog", "settimeofday",
    "clock_settime", "clock_adjtime", "adjtimex", "stime", "io_uring_setup",
    "io_uring_enter", "io_uring_register", "get_kernel_syms", "query_module",
)  # fmt: skip

_NS_CLONE_FLAGS = (sc.CLONE_NEWNS, sc.CLONE_NEWCGROUP, sc.CLONE_NEWUTS, sc.CLONE_NEWIPC,
                   sc.CLONE_NEWUSER, sc.CLONE_NEWPID, sc.CLONE_NEWNET, sc.CLONE_NEWTIME)  # fmt: skip

# /proc entries hidden behind /dev/null, directories hidden behind an empty read-only
# tmpfs, and entries made read-only.
PROC_MASKED_FILES = (b"kcore", b"keys", b"timer_list", b"sched_debug", b"latency_stats",
                     b"timer_stats")  # fmt: skip
PROC_MASKED_DIRS = (b"acpi", b"scsi")
PROC_READONLY = (b"sys", b"irq", b"bus", b"fs", b"sysrq-trigger")

DEV_NODES = (b"null", b"zero", b"full", b"random", b"urandom", b"tty")
DEV_LINKS = ((b"fd", b"/proc/self/fd"), (b"stdin", b"/proc/self/fd/0"),
             (b"stdout", b"/proc/self/fd/1"), (b"stderr", b"/proc/self/fd/2"),
             (b"ptmx", b"pts/ptmx"))  # fmt: skip

_MNT_PROC = sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC
# Dispositions restored to the default in the children (Python ignores SIGPIPE/SIGXFSZ,
# and a server installs handlers for the others).
RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM,
                 signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD, signal.SIGUSR1,
                 signal.SIGUSR2, signal.SIGALRM)  # fmt: skip


class UnsafeMountPoint(OSError):
    """A mount point of the image is a symlink (or sits below one)."""


class Hardening:
    """Everything the command child needs, built before forking.

    A plain class (no dataclass): the launcher process imports this module and stays
    small. It is built there by :meth:`from_args` from what :func:`prepare` returned.
    """

    __slots__ = (
        "_bpf_buffer",
        "bpf",
        "cap_data",
        "cap_header",
        "caps",
        "drop_bounding",
        "gid",
        "seccomp",
        "set_groups",
        "uid",
    )  # fmt: skip

    def __init__(self, uid: int, gid: int, drop_bounding: tuple[int, ...], caps: int,
                 bpf: bytes, set_groups: bool = True) -> None:  # fmt: skip
        self.uid = uid
        self.gid = gid
        self.drop_bounding = drop_bounding
        self.caps = caps
        self.bpf = bpf
        self.set_groups = set_groups  # False in a user namespace with setgroups denied
        self.cap_header, self.cap_data = sc.make_capset_args(caps, caps, 0)
        self._bpf_buffer = ctypes.create_string_buffer(bpf, len(bpf))
        self.seccomp = sc.SockFprog(len(bpf) // 8, ctypes.addressof(self._bpf_buffer))

    @classmethod
    def from_args(cls, args: Any) -> Hardening:
        """Build from :func:`prepare`'s result (after its trip through marshal)."""
        uid, gid, drop, caps, bpf, set_groups = args
        return cls(int(uid), int(gid), tuple(drop), int(caps), bytes(bpf), bool(set_groups))


_seccomp_lock = _thread.allocate_lock()
_seccomp_cache: bytes | None = None


@functools.cache
def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def build_seccomp_program() -> bytes:
    """Compile the deny-list to classic BPF for the native ABI and its 32-bit compat ABI."""
    import tempfile  # deferred, as pyseccomp: the launcher process never compiles

    import pyseccomp as seccomp

    filt = seccomp.SyscallFilter(seccomp.ALLOW)
    # 32-bit programs stay usable (with the same rules); any other ABI is killed.
    compat = {seccomp.Arch.X86_64: seccomp.Arch.X86,
              seccomp.Arch.AARCH64: seccomp.Arch.ARM}.get(seccomp.system_arch())  # fmt: skip
    if compat is not None:
        try:
            filt.add_arch(compat)
        except (OSError, ValueError, RuntimeError):
            pass
    eperm = seccomp.ERRNO(errno.EPERM)
    for name in DENIED_SYSCALLS:
        try:
            filt.add_rule(eperm, name)
        except (OSError, ValueError, RuntimeError):
            continue  # unknown on this architecture or libseccomp version
    # clone(2) creating namespaces (the flags are argument 0 on the supported arches).
    for flag in _NS_CLONE_FLAGS:
        filt.add_rule(eperm, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    # clone3 passes its flags in memory, where a filter cannot look: answer ENOSYS so that
    # libc falls back to clone(2), which is filtered above.
    try:
        filt.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    except (OSError, ValueError, RuntimeError):
        pass
    with tempfile.TemporaryFile() as f:
        filt.export_bpf(f)
        f.seek(0)
        return f.read()


def _seccomp_bpf() -> bytes:
    global _seccomp_cache
    with _seccomp_lock:
        if _seccomp_cache is None:
            _seccomp_cache = build_seccomp_program()
        return _seccomp_cache


HardeningArgs = tuple[int, int, list[int], int, bytes, bool]


def prepare(uid: int, gid: int, *, set_groups: bool = True) -> HardeningArgs:
    """What a command running as uid:gid gets, as primitives (marshal-able):
    (uid, gid, capabilities to drop from the bounding set, capabilities kept, seccomp
    program, set_groups). :meth:`Hardening.from_args` builds the structures."""
    drop = [c for c in range(_last_cap() + 1) if not ALLOWED_CAPS >> c & 1]
    # A non-root uid loses every capability at setuid(); asking for more would fail.
    caps = ALLOWED_CAPS if uid == 0 else 0
    return (uid, gid, drop, caps, _seccomp_bpf(), set_groups)


# ----------------------------------------------------------------- child side (after fork)


def apply(h: Hardening) -> None:
    """In the command child, just before exec: identity, capabilities, nnp, seccomp."""
    for cap in h.drop_bounding:
        try:
            sc.prctl(sc.PR_CAPBSET_DROP, cap)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: a capability this kernel does not know
                raise
    sc.prctl(sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_CLEAR_ALL)
    if h.set_groups:
        os.setgroups([])
    os.setgid(h.gid)
    os.setuid(h.uid)
    sc.capset_prepared(h.cap_header, h.cap_data)
    sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
    sc.seccomp_set_filter(h.seccomp)
    sc.reset_signals(RESET_SIGNALS)


def check_plain(rel: bytes) -> bool:
    """True when every component of ``rel`` (relative to cwd) exists and is no symlink.

    Mounts happen before pivot_root, so a symlink in the image would resolve against the
    host's root; such mount points are refused instead of followed.
    """
    path = b""
    for part in rel.split(b"/"):
        path = path + b"/" + part if path else part
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeMountPoint(errno.ELOOP, "mount point is a symlink", path)
    return True


def ensure_dir(rel: bytes) -> None:
    """Create a missing mount-point directory (this one write does show up in upper)."""
    if not check_plain(rel):
        os.makedirs(rel, 0o755, exist_ok=True)
        check_plain(rel)


def ensure_file(rel: bytes) -> None:
    """Create a missing mount-point file (this one write does show up in upper)."""
    if not check_plain(rel):
        parent = rel.rpartition(b"/")[0]
        if parent:
            ensure_dir(parent)
        os.close(os.open(rel, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644))


def setup_proc(devnull: bytes) -> None:
    """Mount /proc (cwd = new root) with the sensitive entries masked or read-only."""
    ensure_dir(b"proc")
    sc.mount(b"proc", b"proc", b"proc", _MNT_PROC)
    for name in PROC_MASKED_FILES:
        try:
            sc.mount(devnull, b"proc/" + name, None, sc.MS_BIND)
        except FileNotFoundError:
            pass
    for name in PROC_MASKED_DIRS:
        try:
            sc.mount(b"tmpfs", b"proc/" + name, b"tmpfs", sc.MS_RDONLY | _MNT_PROC, b"size=0")
        except FileNotFoundError:
            pass
    for name in PROC_READONLY:
        path = b"proc/" + name
        try:
            sc.mount(path, path, None, sc.MS_BIND | sc.MS_REC)
        except FileNotFoundError:
            continue
        sc.mount(None, path, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | _MNT_PROC)


def setup_sys() -> None:
    """Mount a read-only sysfs (of the sandbox's own network namespace)."""
    ensure_dir(b"sys")
    sc.mount(b"sysfs", b"sys", b"sysfs", sc.MS_RDONLY | _MNT_PROC)


def setup_dev(host_dev: bytes, devpts_opts: bytes = b"newinstance,ptmxmode=0666,mode=0620,gid=5"
              ) -> None:  # fmt: skip
    """A tmpfs /dev with a handful of host device nodes bound in, devpts and /dev/shm.

    ``host_dev`` is the host's /dev (as seen before pivot_root). ``devpts_opts`` drops
    ``gid=5`` (tty) in a user namespace that maps only one gid. No MS_NODEV here: the
    bound nodes must stay usable, and without CAP_MKNOD nothing new can appear.
    """
    ensure_dir(b"dev")
    sc.mount(b"tmpfs", b"dev", b"tmpfs", sc.MS_NOSUID | sc.MS_STRICTATIME, b"mode=755,size=65536k")
    for name in DEV_NODES:
        target = b"dev/" + name
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666))
        try:
            sc.mount(host_dev + b"/" + name, target, None, sc.MS_BIND)
        except FileNotFoundError:
            os.unlink(target)
    os.mkdir(b"dev/pts", 0o755)
    sc.mount(b"devpts", b"dev/pts", b"devpts", sc.MS_NOSUID | sc.MS_NOEXEC, devpts_opts)
    os.mkdir(b"dev/shm", 0o1777)
    sc.mount(b"shm", b"dev/shm", b"tmpfs", sc.MS_NOSUID | sc.MS_NODEV,
             b"mode=1777,size=65536k")  # fmt: skip
    for name, target in DEV_LINKS:
        os.symlink(target, b"dev/" + name)


def bind_private_file(scratch: bytes, target: bytes, content: bytes) -> None:
    """Bind a run-private file with ``content`` over ``target`` (e.g. etc/hosts).

    The source lives in the sandbox's /dev tmpfs under ``scratch`` and is unlinked right
    after the bind, so it is invisible there and writes never reach the image. A target
    that is a symlink in the image is left alone.
    """
    try:
        ensure_file(target)
    except UnsafeMountPoint:
        return
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, content)
    finally:
        os.close(fd)
    sc.mount(scratch, target, None, sc.MS_BIND)
    os.unlink(scratch)


def exit_line(status: int, ru: Any) -> bytes:
    """The status-pipe record of a reaped process: `X <wait status> <15 rusage counters>`.

    Called in forked children (pid 1, the exec helper): bytes formatting only.
    """
    counters = (int(ru.ru_utime * 1e6), int(ru.ru_stime * 1e6), ru.ru_maxrss, ru.ru_ixrss,
                ru.ru_idrss + ru.ru_isrss, ru.ru_nswap, ru.ru_minflt, ru.ru_majflt,
                ru.ru_nvcsw, ru.ru_nivcsw, ru.ru_inblock, ru.ru_oublock, ru.ru_msgsnd,
                ru.ru_msgrcv, ru.ru_nsignals)  # fmt: skip
    return b"X %d " % status + b" ".join(b"%d" % c for c in counters) + b"\n"
