"""Thin ctypes wrappers for the Linux syscalls the sandbox runtime needs.

Every function here is resolved at import time so that a forked child (of a multi-threaded
server) only calls already-resolved foreign functions: no imports, no locks, no lookups.
All path arguments are ``bytes``; callers prepare them before forking. Failures raise
``OSError`` with the errno set by the kernel.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

# --- clone / unshare flags
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080

# --- mount(2) flags
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_STRICTATIME = 0x1000000
MNT_DETACH = 0x2

# --- new mount API
FSOPEN_CLOEXEC = 0x1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 0x1
MOVE_MOUNT_F_EMPTY_PATH = 0x4

# --- prctl
PR_SET_PDEATHSIG = 1
PR_SET_SECCOMP = 22
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2

# --- capabilities
LINUX_CAPABILITY_VERSION_3 = 0x20080522

# --- network ioctls
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
AF_INET = 2
SOCK_DGRAM = 2
SOCK_CLOEXEC = 0o2000000

# Syscall numbers glibc has no wrapper for. The mount-API numbers are shared by every
# architecture (they were added after the syscall table unification); pivot_root is not.
_SYSCALL_NUMBERS: dict[str, dict[str, int]] = {
    "x86_64": {"pivot_root": 155, "pidfd_open": 434, "clone": 56},
    "aarch64": {"pivot_root": 41, "pidfd_open": 434, "clone": 220},
}
_NR = _SYSCALL_NUMBERS.get(os.uname().machine, _SYSCALL_NUMBERS["x86_64"])
NR_PIVOT_ROOT = _NR["pivot_root"]
NR_CLONE = _NR["clone"]
NR_PIDFD_OPEN = _NR["pidfd_open"]
NR_MOVE_MOUNT = 429
NR_FSOPEN = 430
NR_FSCONFIG = 431
NR_FSMOUNT = 432

_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

_mount = _libc.mount
_mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                   ctypes.c_char_p]  # fmt: skip
_mount.restype = ctypes.c_int
_umount2 = _libc.umount2
_umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_umount2.restype = ctypes.c_int
_unshare = _libc.unshare
_unshare.argtypes = [ctypes.c_int]
_unshare.restype = ctypes.c_int
_setns = _libc.setns
_setns.argtypes = [ctypes.c_int, ctypes.c_int]
_setns.restype = ctypes.c_int
_sethostname = _libc.sethostname
_sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_sethostname.restype = ctypes.c_int
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int
_capset = _libc.capset
_capset.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_capset.restype = ctypes.c_int
_capget = _libc.capget
_capget.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_capget.restype = ctypes.c_int
_socket = _libc.socket
_socket.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
_socket.restype = ctypes.c_int
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int
_signal = _libc.signal
_signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
_signal.restype = ctypes.c_void_p
_sigprocmask = _libc.sigprocmask
_sigprocmask.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_sigprocmask.restype = ctypes.c_int


def _check(res: int) -> int:
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return res


def unshare(flags: int) -> None:
    """unshare(2)."""
    _check(_unshare(flags))


def setns(fd: int, nstype: int) -> None:
    """setns(2): join the namespace ``fd`` refers to (this thread only)."""
    _check(_setns(fd, nstype))


def mount(source: bytes | None, target: bytes, fstype: bytes | None, flags: int = 0,
          data: bytes | None = None) -> None:  # fmt: skip
    """mount(2); ``target`` is resolved against the current directory when relative."""
    _check(_mount(source, target, fstype, flags, data))


def umount2(target: bytes, flags: int = 0) -> None:
    """umount2(2)."""
    _check(_umount2(target, flags))


def pivot_root(new_root: bytes, put_old: bytes) -> None:
    """pivot_root(2); ``pivot_root(b".", b".")`` stacks the old root on the new one."""
    _check(_syscall(NR_PIVOT_ROOT, ctypes.c_char_p(new_root), ctypes.c_char_p(put_old)))


def fsopen(fstype: bytes, flags: int = FSOPEN_CLOEXEC) -> int:
    """fsopen(2): a filesystem context fd."""
    return _check(_syscall(NR_FSOPEN, ctypes.c_char_p(fstype), ctypes.c_uint(flags)))


def fsconfig(fd: int, cmd: int, key: bytes | None = None, value: bytes | None = None,
             aux: int = 0) -> None:  # fmt: skip
    """fsconfig(2), e.g. ``fsconfig(fd, FSCONFIG_SET_STRING, b"lowerdir+", path)``."""
    _check(_syscall(NR_FSCONFIG, ctypes.c_int(fd), ctypes.c_uint(cmd), ctypes.c_char_p(key),
                    ctypes.c_char_p(value), ctypes.c_int(aux)))  # fmt: skip


def fsmount(fd: int, flags: int = FSMOUNT_CLOEXEC, attr_flags: int = 0) -> int:
    """fsmount(2): a detached mount fd for a created context."""
    return _check(_syscall(NR_FSMOUNT, ctypes.c_int(fd), ctypes.c_uint(flags),
                           ctypes.c_uint(attr_flags)))  # fmt: skip


def move_mount(from_fd: int, to_path: bytes, from_path: bytes = b"",
               flags: int = MOVE_MOUNT_F_EMPTY_PATH, to_dfd: int = -100) -> None:  # fmt: skip
    """move_mount(2): attach the detached mount ``from_fd`` at ``to_path`` (AT_FDCWD-relative)."""
    _check(_syscall(NR_MOVE_MOUNT, ctypes.c_int(from_fd), ctypes.c_char_p(from_path),
                    ctypes.c_int(to_dfd), ctypes.c_char_p(to_path), ctypes.c_uint(flags)))  # fmt: skip


# clone(2) through PyDLL: the GIL stays held across the call, so the child resumes holding
# it, as after os.fork().
_raw_syscall = ctypes.PyDLL(None, use_errno=True).syscall
_raw_syscall.restype = ctypes.c_long
_SIGCHLD = 17


def clone(flags: int) -> int:
    """A fork whose child starts in new namespaces (``flags``: CLONE_NEW*): 0 in the child.

    The raw syscall skips the C library's and Python's fork handlers, which is only safe
    in a single-threaded process (no lock can be held by a thread that is not copied).
    """
    zero = ctypes.c_long(0)
    return _check(_raw_syscall(ctypes.c_long(NR_CLONE), ctypes.c_ulong(flags | _SIGCHLD),
                               zero, zero, zero, zero))  # fmt: skip


def pidfd_open(pid: int) -> int:
    """pidfd_open(2): an fd that becomes readable when ``pid`` has exited."""
    return _check(_syscall(NR_PIDFD_OPEN, ctypes.c_int(pid), ctypes.c_uint(0)))


PR_SET_NAME = 15


def make_name_buffer(name: bytes) -> ctypes.Array[ctypes.c_char]:
    """A NUL-terminated buffer for :func:`set_process_name` (at most 15 bytes kept)."""
    return ctypes.create_string_buffer(name[:15], 16)


def set_process_name(buf: ctypes.Array[ctypes.c_char]) -> None:
    """prctl(PR_SET_NAME): the name ps and /proc/PID/comm show."""
    _check(_prctl(PR_SET_NAME, ctypes.addressof(buf), 0, 0, 0))


def sethostname(name: bytes) -> None:
    """sethostname(2) (of the current UTS namespace)."""
    _check(_sethostname(name, len(name)))


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl(2)."""
    return _check(_prctl(option, arg2, arg3, arg4, arg5))


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]  # fmt: skip


CapDataPair = CapData * 2


def capget() -> tuple[int, int, int]:
    """capget(2) for this thread: (effective, permitted, inheritable) as 64-bit masks."""
    header = CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = CapDataPair()
    _check(_capget(ctypes.byref(header), ctypes.byref(data)))
    return (data[0].effective | data[1].effective << 32,
            data[0].permitted | data[1].permitted << 32,
            data[0].inheritable | data[1].inheritable << 32)  # fmt: skip


def capset_prepared(header: CapHeader, data: ctypes.Array[CapData]) -> None:
    """capset(2) with structures built before forking."""
    _check(_capset(ctypes.byref(header), ctypes.byref(data)))


def make_capset_args(effective: int, permitted: int,
                     inheritable: int) -> tuple[CapHeader, ctypes.Array[CapData]]:  # fmt: skip
    """Build the capset(2) arguments for 64-bit capability masks."""
    data = CapDataPair()
    for i in (0, 1):
        shift = 32 * i
        data[i].effective = (effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    return CapHeader(LINUX_CAPABILITY_VERSION_3, 0), data


class IfReq(ctypes.Structure):
    # struct ifreq is 40 bytes on 64-bit: a 16-byte name and a 24-byte union; only the
    # flags member of the union is used here.
    _fields_ = [("name", ctypes.c_char * 16), ("flags", ctypes.c_short),
                ("_pad", ctypes.c_char * 22)]  # fmt: skip


def ifreq(name: bytes) -> IfReq:
    """A struct ifreq naming interface ``name`` (for :func:`interface_up`)."""
    req = IfReq()
    req.name = name
    return req


def interface_up(ifreq: IfReq) -> None:
    """Set IFF_UP on the interface named in ``ifreq`` (prepared before forking)."""
    fd = _check(_socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0))
    try:
        _check(_ioctl(fd, SIOCGIFFLAGS, ctypes.addressof(ifreq)))
        ifreq.flags |= IFF_UP
        _check(_ioctl(fd, SIOCSIFFLAGS, ctypes.addressof(ifreq)))
    finally:
        os.close(fd)


SIG_DFL = 0
SIG_SETMASK = 2
_EMPTY_SIGSET = ctypes.create_string_buffer(128)


def reset_signals(signums: tuple[int, ...]) -> None:
    """Restore default dispositions and an empty signal mask before exec.

    Python ignores SIGPIPE and SIGXFSZ, and an ignored disposition survives execve.
    """
    for signum in signums:
        _signal(signum, SIG_DFL)
    _sigprocmask(SIG_SETMASK, ctypes.addressof(_EMPTY_SIGSET), None)


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_set_filter(prog: SockFprog) -> None:
    """Install a classic-BPF seccomp filter (needs no_new_privs or CAP_SYS_ADMIN)."""
    _check(_prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0))
