"""The sandbox launcher: a small single-threaded process that forks every sandbox.

Forking the server itself for each run is what limits throughput: the server holds tens
of megabytes and a dozen threads, so every fork copies its page tables, both sides then
take copy-on-write faults (with TLB shootdowns across the server's threads), and the
intermediate and pid 1, which stay alive as copies, tear all of it down again at exit.
The launcher is a fresh interpreter that imports only the runtime: a fork of it costs a
fraction of that, and so do the processes it leaves behind.

Protocol, over a private AF_UNIX stream socketpair (requests are serialized by a lock on
the server side, so a reply always answers the last request)::

    server → launcher   8-byte length + pickled (plan, has_netgo, has_usergo),
                        with the child's descriptors as SCM_RIGHTS on the length
    launcher → server   8-byte length + pickled (pid, errno, message),
                        with a pidfd of the new intermediate as SCM_RIGHTS

The pidfd is opened by the launcher before it can reap the child, so it always names
the right process; the server waits for the run's end and kills through it.

Lifetime: the launcher exits when its socket reaches EOF, which the kernel provides the
moment the server dies (even by SIGKILL). Intermediates carry PR_SET_PDEATHSIG against
the launcher, so a dead server takes every sandbox down with it, as before. The
launcher runs in its own session: a Ctrl-C at the server's terminal is the server's to
handle. A launcher that died is started again by the next spawn.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import pickle
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

_HEADER = struct.Struct("!Q")
_MAX_MESSAGE = 64 << 20
_READY = b"R"
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent.parent)


class LauncherError(OSError):
    """The launcher could not fork a sandbox (or is gone)."""


def _high(fd: int) -> int:
    """Move ``fd`` to 10 or above (close-on-exec): the children dup2 onto 0..5."""
    if fd >= 10:
        return fd
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return new


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _recv_message(sock: socket.socket, max_fds: int) -> tuple[Any, list[int]] | None:
    """One framed message and the descriptors sent with it; None at EOF."""
    head, fds, _flags, _addr = socket.recv_fds(sock, _HEADER.size, max_fds)
    try:
        if not head:
            return None
        if len(head) < _HEADER.size:
            rest = _recv_exact(sock, _HEADER.size - len(head))
            if rest is None:
                return None
            head += rest
        (size,) = _HEADER.unpack(head)
        if size > _MAX_MESSAGE:
            raise LauncherError(f"launcher message of {size} bytes")
        body = _recv_exact(sock, size)
        if body is None:
            return None
        return pickle.loads(body), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _send_message(sock: socket.socket, obj: Any, fds: list[int]) -> None:
    body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    socket.send_fds(sock, [_HEADER.pack(len(body))], fds)
    sock.sendall(body)


# ------------------------------------------------------------------------ server side


class Launcher:
    """The server's handle on its launcher process (started on first use)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None

    @property
    def pid(self) -> int | None:
        """pid of the running launcher process (None before the first start)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> None:
        """Start the launcher now if it is not running (spawn() would otherwise)."""
        with self._lock:
            self._ensure()

    def spawn(self, plan: Any, fds: tuple[int, int, int, int], netgo: int,
              usergo: int) -> tuple[int, int]:  # fmt: skip
        """Fork an intermediate for ``plan`` with the child's descriptors.

        ``fds`` are the child's stdin, stdout, stderr and status pipe ends; ``netgo`` and
        ``usergo`` are -1 when unused. Returns (pid, pidfd); the caller owns the pidfd.
        Raises LauncherError when the fork failed or the launcher is gone.
        """
        send = [*fds, *(fd for fd in (netgo, usergo) if fd >= 0)]
        request = (plan, netgo >= 0, usergo >= 0)
        with self._lock:
            for attempt in (1, 2):
                sock = self._ensure()
                try:
                    _send_message(sock, request, send)
                except OSError as e:  # the launcher died since the last spawn: restart once
                    self._stop()
                    if attempt == 2:
                        raise LauncherError(e.errno, f"sandbox launcher: {e.strerror}") from e
                    continue
                try:
                    reply = _recv_message(sock, 1)
                except OSError as e:
                    reply = None
                    why = e.strerror
                else:
                    why = "exited"
                if reply is None:
                    self._stop()
                    raise LauncherError(f"sandbox launcher {why} during a spawn")
                (pid, err, message), pidfds = reply
                if err:
                    for fd in pidfds:
                        os.close(fd)
                    raise LauncherError(err, message)
                return pid, pidfds[0]
        raise AssertionError("unreachable")

    def _ensure(self) -> socket.socket:
        if self._sock is not None and self._proc is not None and self._proc.poll() is None:
            return self._sock
        self._stop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p
        )
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "contree_shell.sandbox.launcher", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                env=env, start_new_session=True)  # fmt: skip
        except OSError as e:
            ours.close()
            raise LauncherError(e.errno, f"cannot start the sandbox launcher: {e.strerror}") from e
        finally:
            theirs.close()
        if _recv_exact(ours, len(_READY)) != _READY:
            ours.close()
            proc.wait()
            raise LauncherError(
                f"the sandbox launcher did not start (exit status {proc.returncode})"
            )
        self._proc, self._sock = proc, ours
        return ours

    def _stop(self) -> None:
        sock, proc, self._sock, self._proc = self._sock, self._proc, None, None
        if sock is not None:
            sock.close()  # EOF: the launcher exits
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        """Stop the launcher (its running sandboxes die with it)."""
        with self._lock:
            self._stop()


LAUNCHER = Launcher()
atexit.register(LAUNCHER.close)


# ---------------------------------------------------------------------- launcher side


def _fork(plan: Any, fds: list[int], has_netgo: bool, has_usergo: bool
          ) -> tuple[tuple[int, int, str], list[int]]:  # fmt: skip
    from contree_shell.sandbox import runtime

    child = (fds[0], fds[1], fds[2], fds[3])
    extra = fds[4:]
    netgo = extra.pop(0) if has_netgo else -1
    usergo = extra.pop(0) if has_usergo else -1
    plan.parent_pid = os.getpid()
    try:
        pid = os.fork()
    except OSError as e:
        return (0, e.errno or 1, f"cannot fork: {e.strerror}"), []
    if pid == 0:
        runtime.run_intermediate(plan, child, netgo, usergo)  # never returns
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as e:  # cannot happen while the child is unreaped; kill it to be safe
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
    sock = socket.socket(fileno=_high(int(sys.argv[1])))
    from contree_shell.sandbox import hardening, runtime  # noqa: F401  # imported before forking
    from contree_shell.sandbox import syscalls as sc

    sc.set_process_name(sc.make_name_buffer(b"contree-launch"))
    hardening.prepare(0, 0)  # compile the seccomp filter once, here
    wake_r, wake_w = (_high(fd) for fd in os.pipe())
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda _sig, _frame: None)
    sock.sendall(_READY)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "request")
    sel.register(wake_r, selectors.EVENT_READ, "wake")
    while True:
        for key, _mask in sel.select():
            if key.data == "wake":
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
                _reap()
                continue
            try:
                message = _recv_message(sock, 8)
            except (OSError, pickle.UnpicklingError):
                return
            if message is None:
                return  # the server is gone; our children die with us (PDEATHSIG)
            (plan, has_netgo, has_usergo), fds = message
            fds = [_high(fd) for fd in fds]
            try:
                reply, send = _fork(plan, fds, has_netgo, has_usergo)
            finally:
                for fd in fds:
                    os.close(fd)
            try:
                _send_message(sock, reply, send)
            except OSError:
                return
            finally:
                for fd in send:
                    os.close(fd)
            _reap()


if __name__ == "__main__":
    main()
