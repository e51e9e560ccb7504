"""The server's handle on the sandbox launcher, the small process every sandbox is forked from.

Forking the server itself for each run is what limited throughput: the server holds tens
of megabytes and a dozen threads, so every fork copied its page tables, both sides then
took copy-on-write faults (with TLB shootdowns across the server's threads), and the
processes left alive as copies tore all of it down again at exit. The launcher is a
fresh interpreter (no site, only :mod:`nsinit` and the small modules it needs): a fork
of it costs a fraction of that. The launcher's side and the protocol are in
:mod:`nsinit`.

The launcher is started on first use (the server starts it at start-up), runs in its own
session (a Ctrl-C at the server's terminal is the server's to handle), exits when the
server's end of the socket closes, and is started again by the next spawn if it died.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

from contree_shell.sandbox import nsinit

_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent.parent)


class LauncherError(OSError):
    """The launcher could not fork a sandbox (or is gone)."""


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

    def spawn(self, plan: nsinit.Plan, fds: tuple[int, int, int, int], netgo: int,
              usergo: int) -> tuple[int, int]:  # fmt: skip
        """Start pid 1 of a sandbox for ``plan`` with the child's descriptors.

        ``fds`` are the child's stdin, stdout, stderr and status pipe ends; ``netgo`` and
        ``usergo`` are -1 when unused. Returns (pid, pidfd); the caller owns the pidfd.
        Raises LauncherError when the fork failed or the launcher is gone.
        """
        send = [*fds, *(fd for fd in (netgo, usergo) if fd >= 0)]
        return self._call(("run", plan.wire(), netgo >= 0, usergo >= 0), send)

    def exec_helper(self, argv: list[str], err_fd: int, pass_fds: list[int]) -> tuple[int, int]:
        """Start a host-side helper (slirp4netns) that dies with the launcher: stdin and stdout
        on /dev/null, stderr on ``err_fd``, ``pass_fds`` as descriptors 3, 4, ...
        Returns (pid, pidfd); the launcher reaps it, the caller kills it by the pidfd."""
        return self._call(("exec", argv), [err_fd, *pass_fds])

    def enter(self, *, fds: tuple[int, int, int, int], pid_ns: int, user_ns: int,
              late_ns: list[int], procs: list[bytes], cwd: bytes, argv: list[str],
              env: dict[str, str], harden_args: object) -> tuple[int, int]:  # fmt: skip
        """Start an extra process in a running sandbox (see :mod:`nsexec`): its helper
        joins ``pid_ns`` (and ``user_ns`` unless -1) and forks the process, which joins
        ``late_ns``. ``fds`` are its stdin, stdout, stderr and status pipe ends.
        Returns the helper's (pid, pidfd)."""
        request = ("enter", cwd, argv, env, harden_args, procs, user_ns >= 0, len(late_ns))
        send = [*fds, pid_ns, *([user_ns] if user_ns >= 0 else []), *late_ns]
        return self._call(request, send)

    def _call(self, request: tuple[object, ...], send: list[int]) -> tuple[int, int]:
        with self._lock:
            for attempt in (1, 2):
                sock = self._ensure()
                try:
                    nsinit.send_message(sock, request, send)
                except OSError as e:  # the launcher died since the last call: restart once
                    self._stop()
                    if attempt == 2:
                        raise LauncherError(e.errno, f"sandbox launcher: {e.strerror}") from e
                    continue
                try:
                    reply = nsinit.recv_message(sock, 1)
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
                [sys.executable, "-S", "-m", "contree_shell.sandbox.nsinit", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                env=env, start_new_session=True)  # fmt: skip
        except OSError as e:
            ours.close()
            raise LauncherError(e.errno, f"cannot start the sandbox launcher: {e.strerror}") from e
        finally:
            theirs.close()
        if nsinit.recv_exact(ours, len(nsinit.READY)) != nsinit.READY:
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
