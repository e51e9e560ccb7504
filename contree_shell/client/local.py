"""Start the local server on demand for the built-in `local` profile.

The client never imports the server: it runs `python -m contree_shell server start`,
which daemonizes the server and returns once the socket answers (or fails with a reason).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from contree_shell.client.errors import ServerStartError, one_line
from contree_shell.config import Profile

__all__ = ["ensure_local_server", "socket_answers", "socket_path"]

START_TIMEOUT = 20.0


def socket_path(profile: Profile) -> Path:
    """The unix socket of a `unix:///path` profile URL."""
    if not profile.url.startswith("unix://"):
        raise ValueError(f"not a unix socket URL: {profile.url}")
    return Path(profile.url[len("unix://"):])


def socket_answers(sock: Path, *, timeout: float = 2.0) -> bool:
    """True if a server is listening on `sock`.

    A plain connect() is enough: the kernel refuses it when nobody listens (a stale
    socket file left by a killed server), and it costs microseconds where an HTTP round
    trip through a fresh client costs tens of milliseconds on every `contree` call.
    """
    if not sock.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(timeout)
        try:
            probe.connect(str(sock))
        except OSError:
            return False
    return True


def _last_line(text: str) -> str:
    lines = [one_line(line) for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    last = lines[-1]
    return last.removeprefix("[ERROR] ").removeprefix("Error: ")


def ensure_local_server(profile: Profile, *, timeout: float = START_TIMEOUT) -> None:
    """Make sure the local server of a `local` profile answers, starting it if needed.

    No-op for remote profiles. Raises ServerStartError with the reason the server
    printed (one line) when it cannot be started within `timeout` seconds.
    """
    if not profile.is_local or not profile.url.startswith("unix://"):
        return  # remote, or `local` pointed elsewhere with --url: nothing to start
    sock = socket_path(profile)
    if socket_answers(sock):
        return
    home = sock.parent
    env = dict(os.environ)
    env["CONTREE_SERVER_HOME"] = str(home)
    deadline = time.monotonic() + timeout
    # Output goes to a file, not a pipe: the daemonized server may inherit the
    # descriptors and would keep a pipe open long after `server start` returned.
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "contree_shell", "server", "start"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        except OSError as exc:
            raise ServerStartError(f"Cannot start the local server: {one_line(exc)}") from exc
        try:
            code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        out.seek(0)
        printed = out.read().decode("utf-8", "replace")
    if code not in (0, None) and not socket_answers(sock):
        reason = _last_line(printed) or f"`contree server start` exited with status {code}"
        raise ServerStartError(f"Cannot start the local server: {reason}")
    while True:
        if socket_answers(sock):
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)  # the socket offers nothing to wait on until it exists
    log_hint = home / "server.log"
    reason = _last_line(printed) or f"no answer on {sock} within {timeout:.0f} s"
    raise ServerStartError(f"Cannot start the local server: {reason} (see {log_hint})")
