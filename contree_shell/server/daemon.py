"""Running the local server: foreground `run_server`, and `start`/`stop`/`status` of a
background one. Everything lives in the server home:

    server.sock (0600)  server.pid  server.log  token (0600)  ops.db  store/  files/
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from contree_shell import __version__

log = logging.getLogger("contree.server")

SOCKET_NAME = "server.sock"
PID_NAME = "server.pid"
LOG_NAME = "server.log"
TOKEN_NAME = "token"
LOCK_NAME = "server.lock"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


class ServerError(Exception):
    """A one-line problem starting or controlling the server."""


class ServerStartError(ServerError):
    """The server could not be started; the message says why."""


class PreflightError(ServerError):
    """The host cannot run the sandbox engine."""


def server_home(explicit: str | os.PathLike[str] | None = None) -> Path:
    """--home, else CONTREE_SERVER_HOME, else $XDG_DATA_HOME/contree/server."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get("CONTREE_SERVER_HOME")
    if env:
        return Path(env).expanduser().resolve()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data).expanduser().resolve() / "contree" / "server"


def socket_path(home: Path) -> Path:
    return home / SOCKET_NAME


# --------------------------------------------------------------------------- preflight


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _userns_works() -> bool:
    try:
        out = subprocess.run(
            ["unshare", "--user", "--map-root-user", "true"], capture_output=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


def preflight() -> list[Check]:
    """What the engine needs from this host, each with a one-line result."""
    checks: list[Check] = []
    if os.geteuid() == 0:
        checks.append(Check("privileges", True, "running as root"))
    else:
        checks.append(
            Check(
                "privileges", False, "not root: sandboxes run rootless, in a user namespace"
            )
        )
    try:
        filesystems = Path("/proc/filesystems").read_text()
    except OSError:
        filesystems = ""
    has_overlay = any(line.split()[-1:] == ["overlay"] for line in filesystems.splitlines())
    checks.append(
        Check(
            "overlayfs",
            has_overlay,
            "overlay is available"
            if has_overlay
            else "overlayfs is not available in this kernel (no 'overlay' in /proc/filesystems)",
        )
    )
    busybox = Path("/bin/busybox")
    checks.append(
        Check(
            "busybox",
            busybox.exists(),
            "host busybox found (busybox: imports)"
            if busybox.exists()
            else "no /bin/busybox: `busybox:` imports will fail",
        )
    )
    network = _network_supported()
    checks.append(
        Check(
            "network",
            True,
            "slirp4netns found: runs with networking get outbound NAT"
            if network
            else "slirp4netns not usable: runs are offline (networking is ignored)",
        )
    )
    try:
        from contree_shell.sandbox import runtime

        fn = getattr(runtime, "preflight", None)
        if callable(fn):
            for item in fn() or []:
                if isinstance(item, Check):
                    checks.append(item)
                elif isinstance(item, tuple | list) and len(item) == 3:
                    checks.append(Check(str(item[0]), bool(item[1]), str(item[2])))
    except Exception as exc:  # the engine cannot even be imported
        checks.append(Check("runtime", False, f"sandbox runtime unavailable: {exc}"))
    return checks


def start_launcher() -> None:
    """Start the sandbox launcher now, so the first run does not wait for it."""
    from contree_shell.sandbox.launcher import LAUNCHER, LauncherError

    try:
        LAUNCHER.start()
    except LauncherError as e:
        raise ServerStartError(str(e)) from None


def require_preflight() -> list[Check]:
    """Raise PreflightError with the first blocking problem."""
    checks = preflight()
    for c in checks:
        if c.name == "privileges" and not c.ok and _userns_works():
            continue  # reported, but user namespaces may carry us later
        if not c.ok and c.name in ("privileges", "overlayfs", "runtime"):
            raise PreflightError(c.detail)
    return checks


# --------------------------------------------------------------------------- token


def ensure_token(home: Path) -> str:
    """The TCP bearer token, generated (mode 0600) on first use."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / TOKEN_NAME
    try:
        token = path.read_text().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    # Hex only: a token is pasted into command lines (`--token TOKEN`), where a urlsafe
    # token that happens to start with "-" is taken for an option.
    token = secrets.token_hex(32)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    os.replace(tmp, path)
    return token


# --------------------------------------------------------------------------- foreground


def _probe(sock: Path, timeout: float = 2.0) -> dict[str, Any] | None:
    """GET /v1/whoami over the unix socket; the JSON body, or None if nobody answers."""
    import httpx

    if not sock.exists():
        return None
    try:
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://contree", timeout=timeout
        ) as client:
            resp = client.get("/v1/whoami")
            if resp.status_code == 200:
                body: dict[str, Any] = resp.json()
                return body
    except (httpx.HTTPError, ValueError):
        return None
    return None


def _bind_unix(path: Path) -> socket.socket:
    if path.exists() or path.is_symlink():
        if _probe(path) is not None:
            raise ServerStartError(f"a server is already running on {path}")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket is created 0600: only its owner may connect
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        if len(os.fsencode(path)) >= 108:
            reason = "the path is too long for a unix socket (108 bytes); use a shorter --home"
        raise ServerStartError(f"cannot create the socket {path}: {reason}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _bind_tcp(listen: str) -> socket.socket:
    host, sep, port_s = listen.rpartition(":")
    if not sep or not port_s.isdigit():
        raise ServerStartError(f"--listen must be HOST:PORT, got {listen!r}")
    host = host.strip("[]") or "127.0.0.1"
    infos = socket.getaddrinfo(host, int(port_s), type=socket.SOCK_STREAM)
    family, _, _, _, addr = infos[0]
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says
    # TCP, and without it every request on a kept-alive connection waits ~40 ms (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        raise ServerStartError(f"cannot listen on {listen}: {exc.strerror}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


_SIZE_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    """ "512M", "2g", "1073741824", "1.5G" → bytes; ValueError otherwise."""
    raw = text.strip().lower().removesuffix("b").removesuffix("i")
    unit = raw[-1:] if raw[-1:] in _SIZE_SUFFIXES else ""
    number = raw[: len(raw) - len(unit)] if unit else raw
    value = int(float(number) * _SIZE_SUFFIXES[unit])
    if value <= 0:
        raise ValueError(text)
    return value


DEFAULT_PIDS = 4096
_NO_LIMIT = ("none", "off", "unlimited")


def default_memory_limit() -> int | None:
    """Half of this host's physical memory (at least 256 MiB): one run's memory hog is
    OOM-killed inside its own cgroup before it can take the host or the server down."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
    return max(256 << 20, total // 2)


def _limit_setting(value: str | None, env: str) -> str | None:
    """The setting, else the environment; None when neither is given."""
    text = value if value is not None else os.environ.get(env)
    return text.strip() if text and text.strip() else None


_T = TypeVar("_T")


def _limit(text: str | None, default: _T | None, parse: Callable[[str], _T]) -> _T | None:
    """A limit setting's value: the default when unset, None for "none", else parsed."""
    if text is None:
        return default
    return None if text.lower() in _NO_LIMIT else parse(text)


def server_limits(
    memory: str | None = None, pids: str | None = None, cpus: str | None = None
) -> Any:
    """The server-wide run limits (cgroups.Limits) from settings, else the environment
    (CONTREE_LIMIT_MEMORY, CONTREE_LIMIT_PIDS, CONTREE_LIMIT_CPUS), else the defaults:
    memory half of the host's RAM, 4096 processes, no CPU quota. "none" lifts a limit.
    None when no limit is left, or when the server is not root (no cgroups to use).

    A limit whose cgroup controller this host lacks is dropped with a one-line warning,
    so runs still start.
    """
    from contree_shell.sandbox import cgroups

    memory = _limit_setting(memory, "CONTREE_LIMIT_MEMORY")
    pids = _limit_setting(pids, "CONTREE_LIMIT_PIDS")
    cpus = _limit_setting(cpus, "CONTREE_LIMIT_CPUS")
    try:
        limits = cgroups.Limits(
            memory_bytes=_limit(memory, default_memory_limit(), parse_bytes),
            pids=_limit(pids, DEFAULT_PIDS, int),
            cpus=_limit(cpus, None, float),
        )
    except ValueError as exc:
        raise ServerStartError(f"invalid resource limit setting: {exc}") from None
    if (limits.pids is not None and limits.pids < 1) or (
        limits.cpus is not None and limits.cpus <= 0
    ):
        raise ServerStartError("resource limits must be positive")
    if not cgroups.limits_available():
        return None  # rootless or no cgroups: startup_report() says so once
    wanted = limits.controllers()
    if not wanted:
        return None
    layout = cgroups.detect()
    available = set(layout.v1) | set(layout.v2_controllers)
    missing = [c for c in wanted if c not in available]
    # A default that cannot apply is already in startup_report(); a setting gets its own.
    asked = {"memory": memory, "pids": pids, "cpu": cpus}
    if [c for c in missing if asked[c] is not None]:
        log.warning(
            "cgroup controller(s) %s not available: those run limits are not applied",
            ", ".join(c for c in missing if asked[c] is not None),
        )
        limits = cgroups.Limits(
            memory_bytes=None if "memory" in missing else limits.memory_bytes,
            pids=None if "pids" in missing else limits.pids,
            cpus=None if "cpu" in missing else limits.cpus,
        )
    return limits if limits.controllers() else None


SNAPSHOT_MTIME_POLICIES = ("ignore", "keep")
SETTINGS_NAME = "settings.json"


def snapshot_mtime_policy(value: str | None = None) -> str:
    """The snapshot mtime policy from the setting, else CONTREE_SNAPSHOT_MTIME, else
    "ignore".

    "ignore": a file whose only change is its mtime (e.g. `touch`) is not a change, so a
    run that only touches files keeps its parent's image uuid. "keep": an mtime-only
    change is committed like any other, giving a new image.
    """
    raw = value or os.environ.get("CONTREE_SNAPSHOT_MTIME") or "ignore"
    policy = raw.strip().lower()
    if policy not in SNAPSHOT_MTIME_POLICIES:
        raise ServerStartError(
            f"invalid snapshot mtime policy {raw!r}: expected one of "
            + ", ".join(SNAPSHOT_MTIME_POLICIES)
        )
    return policy


def build_state(
    home: Path, token: str | None, limits: Any = None, snapshot_mtime: str = "ignore"
) -> Any:
    """Open the databases and the store, recover from a previous crash, build managers."""
    from contree_shell.sandbox.files import FileStore
    from contree_shell.sandbox.imports import ImportManager
    from contree_shell.sandbox.instances import (
        InstanceManager,
        remove_abandoned_cgroups,
        remove_stale_cgroups,
    )
    from contree_shell.sandbox.operations import OperationsDB
    from contree_shell.sandbox.store import Store
    from contree_shell.server.app import ServerState

    ops = OperationsDB(home / "ops.db")
    failed = ops.fail_unfinished("server restarted")
    if failed:
        log.info("marked %d unfinished operation(s) FAILED", len(failed))
    store_root = home / "store"
    store = Store(store_root)
    # Runs of a killed server: their processes died with it (PDEATHSIG), their cgroups
    # did not; remove those before recover() drops the run dirs that name them.
    stale = remove_stale_cgroups(store.runs_dir) + remove_abandoned_cgroups()
    if stale:
        log.info("removed %d cgroup(s) left by runs of a previous server", stale)
    store.recover()
    freeze_at = os.environ.get("CONTREE_TEST_FREEZE_AT")
    if freeze_at:
        store._hook = _freeze_hook(home, freeze_at)
    store.start_background_squash()  # deep histories stay cheap to mount
    files = FileStore(home / "files")
    timeout = int(os.environ.get("CONTREE_DEFAULT_TIMEOUT", "600") or 600)
    # The API's default is networking on; the engine pays for a user-mode NAT per run
    # then, so a local user may flip the default (an explicit request always wins).
    default_network = os.environ.get("CONTREE_DEFAULT_NETWORKING", "1").strip().lower() not in (
        "0",
        "false",
        "no",
        "off",
    )
    instances = InstanceManager(
        store=store,
        ops=ops,
        files=files,
        default_timeout=timeout,
        network_supported=_network_supported(),
        default_network=default_network,
        limits=limits,
        keep_mtime_only=snapshot_mtime == "keep",
    )
    imports = ImportManager(store=store, store_root=store_root, ops=ops)
    return ServerState(
        home=home,
        store=store,
        ops=ops,
        files=files,
        instances=instances,
        imports=imports,
        token=token,
    )


def _freeze_hook(home: Path, spec: str) -> Any:
    """Fault injection for the crash tests (CONTREE_TEST_FREEZE_AT=<store point>[@N],
    e.g. commit:renamed@2): the thread reaching that point for the N-th time (default
    1st) writes the point's name to <home>/frozen-at and blocks forever, so a test can
    SIGKILL the server with the store half-way through that step."""
    import threading

    point, _, nth = spec.partition("@")
    wanted = int(nth) if nth.isdigit() else 1
    lock = threading.Lock()
    seen = 0

    def hook(at: str) -> None:
        nonlocal seen
        if at != point:
            return
        with lock:
            seen += 1
            if seen != wanted:
                return
        log.warning("CONTREE_TEST_FREEZE_AT: frozen at %s until killed", at)
        (home / "frozen-at").write_text(at + "\n")
        threading.Event().wait()

    return hook


def _network_supported() -> bool:
    """Whether the runtime can give a sandbox a network (else runs are offline)."""
    try:
        from contree_shell.sandbox import runtime
    except Exception:
        return False
    return bool(getattr(runtime, "NETWORK_SUPPORTED", False))


def run_server(
    home: Path | None = None,
    listen: str | None = None,
    log_level: str = "info",
    limits: dict[str, str | None] | None = None,
    snapshot_mtime: str | None = None,
) -> int:
    """Serve in the foreground until SIGTERM/SIGINT. Returns the exit status.

    `snapshot_mtime` ("ignore"/"keep", else CONTREE_SNAPSHOT_MTIME) is the commit mtime
    policy, see snapshot_mtime_policy().
    """
    import uvicorn

    from contree_shell.server.app import create_app

    home = server_home(home)
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    mtime_policy = snapshot_mtime_policy(snapshot_mtime)
    require_preflight()
    # Runs hop between threads (request loop, worker, sandbox I/O thread) several times;
    # with the default 5 ms GIL switch interval each hop can wait a whole interval, which
    # doubled the latency of a `true` run. A short interval keeps the hops cheap.
    sys.setswitchinterval(0.0005)
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    lock_fd = os.open(home / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ServerStartError(f"another server is already using {home}") from None
    sockets = [_bind_unix(socket_path(home))]
    token: str | None = None
    if listen:
        token = ensure_token(home)
        sockets.append(_bind_tcp(listen))
    run_limits = server_limits(**(limits or {}))
    state = build_state(home, token, run_limits, snapshot_mtime=mtime_policy)
    start_launcher()
    (home / PID_NAME).write_text(f"{os.getpid()}\n")
    # What this server runs with, for `contree server status` (the API has no place for it).
    _write_settings(home, {"snapshot_mtime": mtime_policy, "limits": _limits_dict(run_limits)})
    config = uvicorn.Config(
        create_app(state),
        log_level=log_level.lower(),
        lifespan="on",
        timeout_graceful_shutdown=5,
        access_log=False,
        # Nothing here reads the client address; skipping the middleware saves a layer
        # of wrapping on every ASGI message (each SSE chunk included).
        proxy_headers=False,
    )

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if not self.should_exit:
                log.info("stopping: cancelling running operations")
                # End every run now so followers get their completion and disconnect.
                state.instances.shutdown("server stopped", wait=False)
                state.imports.shutdown("server stopped")
            super().handle_exit(sig, frame)
            # uvicorn re-raises captured signals after shutdown; a requested stop that
            # completed cleanly should exit 0 instead of dying from SIGTERM.
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    server = _Server(config)
    log.info(
        "contree server %s listening on %s%s",
        __version__,
        socket_path(home),
        f" and {listen}" if listen else "",
    )
    try:
        server.run(sockets=sockets)
    finally:
        with contextlib.suppress(FileNotFoundError):
            socket_path(home).unlink()
        with contextlib.suppress(FileNotFoundError):
            (home / PID_NAME).unlink()
        with contextlib.suppress(FileNotFoundError):
            (home / SETTINGS_NAME).unlink()
        os.close(lock_fd)
    return 0


def _limits_dict(limits: Any) -> dict[str, Any]:
    if limits is None:
        return {}
    names = ("memory_bytes", "pids", "cpus")
    return {n: getattr(limits, n) for n in names if getattr(limits, n, None) is not None}


def _write_settings(home: Path, settings: dict[str, Any]) -> None:
    tmp = home / (SETTINGS_NAME + ".tmp")
    tmp.write_text(json.dumps(settings) + "\n")
    os.replace(tmp, home / SETTINGS_NAME)


def read_settings(home: Path) -> dict[str, Any]:
    """The settings the running server wrote at start; {} if there are none."""
    try:
        data = json.loads((home / SETTINGS_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------- background


def read_pid(home: Path) -> int | None:
    try:
        pid = int((home / PID_NAME).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


def _last_log_line(home: Path) -> str:
    try:
        lines = (home / LOG_NAME).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    for line in reversed(lines):
        text = line.strip()
        if not text or text.startswith(("Traceback", "File ", "^")):
            continue
        if "INFO" in text and "Waiting" in text:
            continue
        return text.removeprefix("[ERROR] ")
    return ""


def server_command(home: Path, listen: str | None = None) -> list[str]:
    """The argv that runs the server in the foreground (what `start` daemonizes)."""
    argv = [sys.executable, "-m", "contree_shell", "server", "run", "--home", str(home)]
    if listen:
        argv += ["--listen", listen]
    return argv


def start(
    home: Path | None = None, listen: str | None = None, timeout: float = START_TIMEOUT
) -> int:
    """Start a background server (if none answers) and return its pid."""
    home = server_home(home)
    sock = socket_path(home)
    if _probe(sock) is not None:
        pid = read_pid(home)
        return pid or 0
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    logfile = open(home / LOG_NAME, "ab")  # noqa: SIM115 - handed to the child
    with logfile:
        logfile.write(f"--- starting contree server {__version__}\n".encode())
        logfile.flush()
        proc = subprocess.Popen(
            server_command(home, listen),
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            cwd="/",
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            reason = _last_log_line(home) or f"exited with status {code}"
            raise ServerStartError(f"the local server did not start: {reason}")
        if _probe(sock, timeout=1.0) is not None:
            return proc.pid
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    reason = _last_log_line(home) or "no answer on its socket"
    raise ServerStartError(f"the local server did not start within {timeout:.0f}s: {reason}")


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait for `pid` to exit (pidfd, no polling). True if it is gone."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:
        fd = -1
    if fd < 0:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.05)
        return False
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(int(timeout * 1000)))
    finally:
        os.close(fd)


def stop(home: Path | None = None, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop the background server gracefully (SIGTERM, then SIGKILL). False if none ran."""
    home = server_home(home)
    pid = read_pid(home)
    if pid is None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, timeout):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 5.0)
        with contextlib.suppress(FileNotFoundError):
            socket_path(home).unlink()
        with contextlib.suppress(FileNotFoundError):
            (home / PID_NAME).unlink()
    return True


def status(home: Path | None = None) -> dict[str, Any]:
    """Whether a server runs for `home`, and what it holds."""
    home = server_home(home)
    sock = socket_path(home)
    answer = _probe(sock)
    pid = read_pid(home)
    info: dict[str, Any] = {
        "running": answer is not None,
        "pid": pid if answer is not None else None,
        "home": str(home),
        "socket": str(sock),
        "version": (answer or {}).get("server", {}).get("version") or __version__,
        "store": str(home / "store"),
        "images": _count_images(home),
        "operations": sum((answer or {}).get("operations_stat", {}).values())
        if answer
        else _count_ops(home),
        "preflight": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in preflight()],
    }
    # The running server's settings; without one, what a server started now would use.
    settings = read_settings(home) if answer is not None else {}
    mtime = settings.get("snapshot_mtime")
    if mtime not in SNAPSHOT_MTIME_POLICIES:
        try:
            mtime = snapshot_mtime_policy()
        except ServerStartError:
            mtime = os.environ.get("CONTREE_SNAPSHOT_MTIME", "")
    info["snapshot_mtime"] = mtime
    if "limits" in settings:
        info["limits"] = settings["limits"]
    else:
        try:
            info["limits"] = _limits_dict(server_limits())
        except ServerStartError:
            info["limits"] = {}
    return info


def _count_ops(home: Path) -> int:
    import sqlite3

    db = home / "ops.db"
    if not db.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM operations").fetchone()[0])
    except sqlite3.Error:
        return 0


def _count_images(home: Path) -> int:
    if not (home / "store").exists():
        return 0
    try:
        from contree_shell.sandbox.store import Store

        rows = Store(home / "store").list(limit=1000000)
        return len({rec.uuid for rec, _ in rows})
    except Exception:
        return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m contree_shell.server.daemon [--home DIR] [--listen HOST:PORT]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="contree-server")
    parser.add_argument("--home")
    parser.add_argument("--listen")
    args = parser.parse_args(argv)
    try:
        return run_server(server_home(args.home), args.listen)
    except ServerError as exc:
        sys.stderr.write(f"[ERROR] {exc}\n")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
