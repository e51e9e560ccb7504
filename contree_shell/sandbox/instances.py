"""Instance operations: one `InstanceSpawnRequest` becomes one sandbox run.

`normalize_spawn_request` is the pure part (validation + defaults, echoed into the
operation's metadata). `InstanceManager` runs the request on a bounded worker pool and
records the event log init → [network] → spawn → stdout/stderr → exit → shutdown →
completion. The operation is EXECUTING from the moment the command has spawned.

Extra processes (spid >= 2, `exec`) enter the running sandbox through sandbox/nsexec.py
and share the event log; they end with the instance, their `exit` events recorded after
spid 1's and before `shutdown`. `resources_limits.max_layer_bytes` caps the run's upper
dir: watched during the run when set below the default, checked after it always; a run
over the cap ends FAILED with a `size_cap` event and nothing is kept.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import platform
import posixpath
import re
import shutil
import signal as signal_mod
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contree_shell.sandbox.files import FileNotFound, FileRecord, FileStore
from contree_shell.sandbox.operations import (
    TERMINAL,
    OperationNotFound,
    OperationsDB,
    iso_z,
    utcnow,
)

log = logging.getLogger("contree.instances")

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def compose_env(
    image_env: dict[str, str], request_env: dict[str, str | None], *, shell: bool, home: str
) -> dict[str, str]:
    """A process's environment (§4.2): shell mode starts from the image's env, the
    request's values win and a null unsets; PATH and HOME get defaults, as a login would."""
    env: dict[str, str] = dict(image_env) if shell else {}
    for key, value in request_env.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOME", home)
    return env


CGROUPS_RECORD = "cgroups"  # in a run dir: the run's cgroup dirs, one per line


def _record_cgroups(run_path: Path, sandbox: Any) -> None:
    """Note the run's cgroup dirs in its run dir, so a server killed mid-run can remove
    them at its next start (the kernel keeps an empty cgroup until someone rmdirs it)."""
    cgroup = getattr(sandbox, "_cgroup", None)
    procs = getattr(cgroup, "procs_files", None) if cgroup is not None else None
    if not procs:
        return
    dirs = sorted({os.path.dirname(os.fsdecode(p)) for p in procs})
    (run_path / CGROUPS_RECORD).write_text("".join(d + "\n" for d in dirs))


def remove_stale_cgroups(runs_dir: Path) -> int:
    """At server start, before the store drops leftover runs: remove the cgroups those
    runs recorded (their processes died with the previous server). Returns how many."""
    from contree_shell.sandbox.cgroups import RunCgroup

    removed = 0
    try:
        entries = list(os.scandir(runs_dir))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            text = (Path(entry.path) / CGROUPS_RECORD).read_text()
        except (FileNotFoundError, NotADirectoryError):
            continue
        dirs = [Path(line) for line in text.splitlines() if line.startswith("/sys/fs/cgroup/")]
        # A run's cgroups are leaves named contree-*; never touch anything else.
        dirs = [d for d in dirs if d.name.startswith("contree-")]
        if not dirs:
            continue
        RunCgroup({str(i): d for i, d in enumerate(dirs)}, None).remove()
        removed += sum(1 for d in dirs if not d.exists())
    return removed


ABANDONED_CGROUP_AGE = 600.0  # seconds


def remove_abandoned_cgroups(
    min_age: float = ABANDONED_CGROUP_AGE, parents: list[Path] | None = None
) -> int:
    """At server start: remove empty run cgroups (contree-*) older than ``min_age``
    where this server creates its own. Catches what no run dir recorded (a server killed
    between creating a run's cgroup and noting it). A live run's cgroup always holds its
    processes, and its server removes it as the run ends, so an empty one that old is
    abandoned, whichever server made it. ``parents`` overrides where to look (tests).
    Returns how many were removed."""
    import time

    from contree_shell.sandbox import cgroups

    if parents is None:
        layout = cgroups.detect()
        try:
            own_v1, _ = cgroups.parse_proc_cgroup(Path("/proc/self/cgroup").read_text())
        except OSError:
            return 0
        found = {layout.v1[c] / own_v1.get(c, "/").lstrip("/") for c in layout.v1}
        if layout.v2 is not None:
            found.add(layout.v2 / "contree")
        parents = sorted(found)
    removed = 0
    now = time.time()
    for parent in parents:
        for path in parent.glob("contree-*"):
            try:
                if now - path.stat().st_ctime < min_age:
                    continue
                if (path / "cgroup.procs").read_text().strip():
                    continue
                path.rmdir()
                removed += 1
            except OSError:
                continue
    return removed


def _read_passwd(view: Any) -> str:
    try:
        return bytes(view.read("/etc/passwd")).decode(errors="replace")
    except Exception:  # no passwd in the image: defaults below apply
        return ""


def home_of(passwd: str, uid: int) -> str:
    """The home directory of `uid` in an image's passwd text (root: /root; unknown: /)."""
    for line in passwd.splitlines():
        fields = line.split(":")
        if len(fields) >= 6 and fields[2] == str(uid):
            return fields[5] or "/"
    return "/root" if uid == 0 else "/"
DEFAULT_TIMEOUT = 600
MAX_TIMEOUT = 3600
DEFAULT_TRUNCATE = 1048576
MAX_TRUNCATE = 10485760
DEFAULT_MAX_LAYER_BYTES = 12884901888
_CHUNK = 32 * 1024
_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*(?:[:/.][A-Za-z0-9_-]+)*$")
_CWD_RE = re.compile(r"^((/[^/]*)+/?)?$")
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,62})$")
_SECRET_SUFFIXES = ("TOKEN", "SECRET", "PASSWORD", "API_KEY", "CREDENTIALS", "AUTHORIZATION")


def _args_field(body: dict[str, Any]) -> list[str]:
    """`args` of a spawn or exec request: a list of strings (absent or null: [])."""
    args = body.get("args")
    if args is None:
        return []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise RequestError(400, "'args' must be a list of strings")
    return args


def _env_field(body: dict[str, Any]) -> dict[str, str | None]:
    """`env` of a spawn or exec request: names to strings, null meaning "unset"."""
    env = body.get("env")
    if env is None:
        return {}
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in env.items()
    ):
        raise RequestError(400, "'env' must be an object of string values")
    if any(not k or "=" in k or "\0" in k for k in env):
        raise RequestError(400, "'env' names must be non-empty and contain no '='")
    return env


def _cwd_field(body: dict[str, Any]) -> str:
    """`cwd` of a spawn or exec request: an absolute path, or "" for the image default."""
    cwd = body.get("cwd")
    if cwd is None:
        return ""
    if not isinstance(cwd, str) or not _CWD_RE.match(cwd) or "\0" in cwd:
        raise RequestError(400, "'cwd' must be an absolute path or empty")
    return cwd


class RequestError(Exception):
    """A client error with its HTTP status (400 bad input, 404 unknown reference...)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def is_uuid(value: str) -> bool:
    return bool(_UUID_RE.match(value))


def encode_stream(data: bytes) -> tuple[str, str]:
    """(value, encoding): ascii when every byte is printable, TAB, LF or CR; else base64."""
    if all(32 <= b <= 126 or b in (9, 10, 13) for b in data):
        return data.decode("ascii"), "ascii"
    return base64.b64encode(data).decode("ascii"), "base64"


def parse_mode(value: Any) -> int:
    """A file mode from "0644", "0o100644", "644" or an int; permission bits only."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        return value & 0o7777
    if isinstance(value, str):
        text = value.strip().lower()
        if text.startswith("0o"):
            text = text[2:]
        if not text or not all(c in "01234567" for c in text):
            raise ValueError(value)
        return int(text, 8) & 0o7777
    raise ValueError(value)


def mask_env(env: dict[str, str]) -> dict[str, str]:
    """Env with secret-looking values replaced by <MASKED> (for the spawn event)."""
    return {k: ("<MASKED>" if k.upper().endswith(_SECRET_SUFFIXES) else v) for k, v in env.items()}


# --------------------------------------------------------------------------- validation


def _bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(400, f"'{key}' must be a boolean")
    return value


def _int(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise RequestError(400, f"'{name}' must be an integer")
    out = int(value)
    if minimum is not None and out < minimum:
        raise RequestError(400, f"'{name}' must be >= {minimum}")
    if maximum is not None and out > maximum:
        raise RequestError(400, f"'{name}' must be <= {maximum}")
    return out


def _stdin(value: Any) -> dict[str, Any]:
    if value is None:
        return {"value": "", "encoding": "ascii", "close": True}
    if not isinstance(value, dict):
        raise RequestError(400, "'stdin' must be an object {value, encoding, close}")
    raw = value.get("value", "")
    if not isinstance(raw, str):
        raise RequestError(400, "'stdin.value' must be a string")
    encoding = value.get("encoding") or "ascii"
    if encoding not in ("ascii", "base64"):
        raise RequestError(400, "'stdin.encoding' must be 'ascii' or 'base64'")
    close = value.get("close", True)
    if close is None:
        close = True
    if not isinstance(close, bool):
        raise RequestError(400, "'stdin.close' must be a boolean")
    decode_stream(raw, encoding, "stdin.value")
    return {"value": raw, "encoding": encoding, "close": close}


def decode_stream(value: str, encoding: str, name: str = "value") -> bytes:
    """Bytes of a StreamRepr value; RequestError(400) on bad input."""
    if encoding == "base64":
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RequestError(400, f"'{name}' is not valid base64") from exc
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(400, f"'{name}' is not valid text") from exc


def normalize_spawn_request(
    body: Any,
    resolve_image: Callable[[str], str],
    lookup_file: Callable[[str], object],
    *,
    default_timeout: int = DEFAULT_TIMEOUT,
    default_network: bool = True,
) -> dict[str, Any]:
    """Validate an InstanceSpawnRequest and return it fully defaulted.

    `resolve_image` maps a uuid or `tag:X` to an image uuid (RequestError 404 if unknown);
    `lookup_file` raises RequestError for an unknown file uuid. The result is what the
    operation's metadata echoes (with `result: None` added by the caller).
    """
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    command = body.get("command")
    if not isinstance(command, str) or not command:
        raise RequestError(400, "'command' is required and must be a non-empty string")
    image_ref = body.get("image")
    if not isinstance(image_ref, str) or not image_ref:
        raise RequestError(400, "'image' is required (an image uuid or tag:NAME)")
    if image_ref.startswith("tag:"):
        if not TAG_RE.match(image_ref[4:]):
            raise RequestError(400, f"invalid tag in 'image': {image_ref[4:]!r}")
    elif not is_uuid(image_ref):
        raise RequestError(400, f"'image' must be an image uuid or tag:NAME, got {image_ref!r}")
    shell = _bool(body, "shell", False)
    args = _args_field(body)
    env = _env_field(body)
    cwd = _cwd_field(body)
    hostname = body.get("hostname")
    if hostname is None or hostname == "":
        hostname = "linuxkit"
    if not isinstance(hostname, str) or not _HOSTNAME_RE.match(hostname):
        raise RequestError(400, "'hostname' must be a valid host name")
    uid = _int(body.get("uid", 0) or 0, "uid", minimum=0, maximum=2**32 - 2)
    gid = _int(body.get("gid", 0) or 0, "gid", minimum=0, maximum=2**32 - 2)
    limits = body.get("resources_limits")
    if limits is None:
        limits = {}
    if not isinstance(limits, dict):
        raise RequestError(400, "'resources_limits' must be an object")
    max_layer = limits.get("max_layer_bytes")
    max_layer = (
        DEFAULT_MAX_LAYER_BYTES
        if max_layer is None
        else _int(max_layer, "resources_limits.max_layer_bytes", minimum=1)
    )
    networking = body.get("networking")
    if networking is None:
        networking = {}
    if not isinstance(networking, dict):
        raise RequestError(400, "'networking' must be an object")
    net_enabled = _bool(networking, "enabled", default_network)
    timeout = body.get("timeout")
    timeout = default_timeout if timeout is None else _int(timeout, "timeout", minimum=1)
    timeout = min(timeout, MAX_TIMEOUT)
    truncate = body.get("truncate_output_at")
    truncate = (
        DEFAULT_TRUNCATE
        if truncate is None
        else _int(truncate, "truncate_output_at", minimum=0, maximum=MAX_TRUNCATE)
    )
    files_in = body.get("files")
    if files_in is None:
        files_in = {}
    if not isinstance(files_in, dict):
        raise RequestError(400, "'files' must be an object {absolute path: {uuid, uid, gid, mode}}")
    files: dict[str, dict[str, Any]] = {}
    for path, spec in files_in.items():
        if (
            not isinstance(path, str)
            or not path.startswith("/")
            or path.endswith("/")
            or "\0" in path
            or posixpath.normpath(path) in ("/", "//")
        ):
            raise RequestError(400, f"'files' key must be an absolute file path, got {path!r}")
        if isinstance(spec, str):
            spec = {"uuid": spec}
        if not isinstance(spec, dict) or not isinstance(spec.get("uuid"), str):
            raise RequestError(400, f"'files[{path}]' must be an object with a file 'uuid'")
        mode_raw = spec.get("mode")
        try:
            mode = 0o644 if mode_raw is None else parse_mode(mode_raw)
        except ValueError as exc:
            raise RequestError(
                400, f"'files[{path}].mode' must be an octal string like \"0644\", got {mode_raw!r}"
            ) from exc
        fuid = _int(spec.get("uid", 0) or 0, f"files[{path}].uid", minimum=0)
        fgid = _int(spec.get("gid", 0) or 0, f"files[{path}].gid", minimum=0)
        lookup_file(spec["uuid"])
        files[path] = {"uuid": spec["uuid"], "uid": fuid, "gid": fgid, "mode": f"{mode:04o}"}
    preserve_env = _bool(body, "preserve_env", False)
    preserve_cwd = _bool(body, "preserve_cwd", False)
    disposable = _bool(body, "disposable", False)
    stdin = _stdin(body.get("stdin"))
    image = resolve_image(image_ref)
    return {
        "command": command,
        "image": image,
        "args": list(args),
        "shell": shell,
        "env": {k: ("" if v is None else v) for k, v in env.items()},
        "preserve_env": preserve_env,
        "preserve_cwd": preserve_cwd,
        "cwd": cwd,
        "uid": uid,
        "gid": gid,
        "hostname": hostname,
        "disposable": disposable,
        "resources_limits": {"max_layer_bytes": max_layer},
        "networking": {"enabled": net_enabled},
        "stdin": stdin,
        "timeout": timeout,
        "truncate_output_at": truncate,
        "files": files,
    }


# --------------------------------------------------------------------------- results


_RESOURCE_KEYS = (
    "user_time_us",
    "sys_time_us",
    "max_rss_kb",
    "shared_memory",
    "unshared_memory",
    "swaps",
    "minor_faults",
    "major_faults",
    "voluntary_ctx_switches",
    "involuntary_ctx_switches",
    "block_input_ops",
    "block_output_ops",
    "ipc_msgs_sent",
    "ipc_msgs_received",
    "signals_received",
)


def event_resources(rusage: dict[str, int] | None) -> dict[str, int]:
    """The 15 counters of an `exit` event, zero when unknown."""
    rusage = rusage or {}
    return {k: int(rusage.get(k, 0) or 0) for k in _RESOURCE_KEYS}


def result_resources(rusage: dict[str, int] | None, elapsed: float) -> dict[str, Any]:
    """The 16 InstanceResult.resources keys mapped from the exit counters."""
    r = event_resources(rusage)
    return {
        "block_input": r["block_input_ops"],
        "block_output": r["block_output_ops"],
        "cost": 0.0,
        "elapsed_time": float(elapsed),
        "involuntary_switches": r["involuntary_ctx_switches"],
        "max_rss": r["max_rss_kb"],
        "monotonic_time": float(elapsed),
        "page_faults": r["minor_faults"],
        "page_faults_io": r["major_faults"],
        "shared_memory": r["shared_memory"],
        "signals": r["signals_received"],
        "swaps": r["swaps"],
        "system_cpu_time": r["sys_time_us"] / 1e6,
        "unshared_memory": r["unshared_memory"],
        "user_cpu_time": r["user_time_us"] / 1e6,
        "voluntary_switches": r["voluntary_ctx_switches"],
    }


def empty_result() -> dict[str, Any]:
    """A complete InstanceResult for a run that produced nothing (yet)."""
    return {
        "stdout": {"value": "", "encoding": "ascii", "truncated": False},
        "stderr": {"value": "", "encoding": "ascii", "truncated": False},
        "state": {
            "exit_code": -1,
            "signal": -1,
            "timed_out": False,
            "pid": 0,
            "core_dump": False,
            "stopped": False,
            "continued": False,
        },
        "resources": result_resources(None, 0.0),
    }


# --------------------------------------------------------------------------- runs


@dataclass
class _Stream:
    data: bytearray = field(default_factory=bytearray)
    dropped: int = 0


@dataclass
class _Run:
    op: str
    spec: dict[str, Any]
    raw_env: dict[str, str | None]
    lock: threading.RLock = field(default_factory=threading.RLock)
    stdin_lock: threading.Lock = field(default_factory=threading.Lock)
    started: threading.Event = field(default_factory=threading.Event)
    sandbox: Any = None
    closed: bool = False  # no more events may be appended (the op is terminal)
    cancel_reason: str | None = None
    image_env: dict[str, str] = field(default_factory=dict)
    passwd: str = ""  # the image's /etc/passwd, for HOME of processes started later
    default_cwd: str = "/"
    signalled: bool = False
    pending_signal: int | None = None
    stdin_open: bool = False
    stdin_recorded: int = 0
    early: list[tuple[str, bytes]] | None = field(default_factory=list)  # before `spawn`
    streams: dict[str, _Stream] = field(
        default_factory=lambda: {"stdout": _Stream(), "stderr": _Stream(), "stdin": _Stream()}
    )
    procs: dict[int, _Proc] = field(default_factory=dict)  # spid >= 2
    next_spid: int = 2
    size_capped: bool = False
    main_exit_recorded: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Proc:
    """An extra process (spid >= 2) of a running instance."""

    spid: int
    truncate_at: int
    process: Any = None
    stdin_open: bool = False
    stdin_recorded: int = 0
    stdin_lock: threading.Lock = field(default_factory=threading.Lock)
    exit_recorded: threading.Event = field(default_factory=threading.Event)
    spawn_recorded: threading.Event = field(default_factory=threading.Event)
    signalled: bool = False
    early: list[tuple[str, bytes]] | None = field(default_factory=list)  # before `spawn`
    streams: dict[str, _Stream] = field(
        default_factory=lambda: {"stdout": _Stream(), "stderr": _Stream(), "stdin": _Stream()}
    )


class Conflict(RequestError):
    def __init__(self, message: str) -> None:
        super().__init__(409, message)


class InstanceManager:
    """Starts and controls instance runs; one worker thread per running sandbox."""

    def __init__(
        self,
        *,
        store: Any,
        ops: OperationsDB,
        files: FileStore,
        default_timeout: int = DEFAULT_TIMEOUT,
        max_workers: int = 16,
        network_supported: bool = True,
        default_network: bool = True,
        limits: Any = None,
        keep_mtime_only: bool = False,
    ) -> None:
        """`limits` (cgroups.Limits or None) applies to every run of this server.

        `keep_mtime_only` is the snapshot mtime policy: False (ignore) lets a run that
        only touched files keep its parent's image; True (keep) commits such a run as a
        new image.
        """
        self.store = store
        self.limits = limits
        self.keep_mtime_only = keep_mtime_only
        self.ops = ops
        self.files = files
        self.default_timeout = default_timeout
        self.network_supported = network_supported
        self.default_network = default_network
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="run")
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()
        self._shutting_down = False

    # -- request side -------------------------------------------------------------

    def resolve_image(self, ref: str) -> str:
        """uuid or tag:X → image uuid; RequestError(404) if unknown."""
        from contree_shell.sandbox.store import ImageNotFound, TagNotFound

        try:
            if ref.startswith("tag:"):
                return str(self.store.resolve_tag(ref[4:]))
            return str(self.store.get(ref.lower()).uuid)
        except (ImageNotFound, TagNotFound) as exc:
            raise RequestError(404, f"image not found: {ref}") from exc

    def _lookup_file(self, file_uuid: str) -> FileRecord:
        try:
            return self.files.by_uuid(file_uuid)
        except FileNotFound as exc:
            raise RequestError(404, f"uploaded file not found: {file_uuid}") from exc

    def spawn(self, body: Any) -> dict[str, Any]:
        """Validate, create the operation (PENDING) and queue the run; returns the echo."""
        if self._shutting_down:
            raise RequestError(503, "the server is stopping")
        spec = normalize_spawn_request(
            body,
            self.resolve_image,
            self._lookup_file,
            default_timeout=self.default_timeout,
            default_network=self.default_network,
        )
        raw_env = dict(body.get("env") or {})
        metadata = dict(spec, result=None)
        op = self.ops.create("instance", metadata, image_uuid=spec["image"])
        run = _Run(op=op.uuid, spec=spec, raw_env=raw_env)
        with self._lock:
            self._runs[op.uuid] = run
        self._pool.submit(self._worker, run)
        return dict(spec, uuid=op.uuid, result=None)

    def _live(self, op_uuid: str) -> _Run:
        op = self.ops.get(op_uuid)  # OperationNotFound → 404
        if op.kind != "instance":
            raise Conflict("operation is not an instance")
        with self._lock:
            run = self._runs.get(op_uuid)
        if op.terminal or run is None or run.closed:
            raise RequestError(410, "the instance has finished")
        return run

    def _running(self, op_uuid: str) -> _Run:
        """:meth:`_live`, with a finished instance a conflict (signals, extra processes)."""
        try:
            return self._live(op_uuid)
        except RequestError as exc:
            if exc.status == 410:
                raise Conflict("the instance is not running") from exc
            raise

    def cancel(self, op_uuid: str, reason: str = "cancelled") -> bool:
        """Kill the run and end the operation CANCELLED now; False if not ours to cancel."""
        with self._lock:
            run = self._runs.get(op_uuid)
        if run is None:
            return False
        with run.lock:
            if run.closed:
                return False
            run.cancel_reason = reason
            if run.sandbox is not None:
                try:
                    run.sandbox.kill()
                except Exception:  # the sandbox may be exiting on its own right now
                    log.debug("kill %s", op_uuid, exc_info=True)
            self._emit(run, "shutdown", {"stopped_at": iso_z(utcnow()), "reason": "signal"}, 0)
            run.closed = True
            run.main_exit_recorded.set()
            self.ops.finish(op_uuid, "CANCELLED", error=reason, metadata=self._metadata(run, None))
        return True

    def signal(self, op_uuid: str, spid: int, sig: int) -> None:
        run = self._running(op_uuid)
        if spid != 1:
            proc = run.procs.get(spid)
            if proc is None or proc.process is None or proc.process.done():
                raise RequestError(404, f"no live process with spid {spid}")
            proc.signalled = True
            try:
                proc.process.signal(sig)
            except ProcessLookupError as exc:
                raise RequestError(404, f"no live process with spid {spid}") from exc
            return
        with run.lock:
            if run.closed:
                raise Conflict("the instance is not running")
            run.signalled = True
            if run.sandbox is None:
                run.pending_signal = sig
                return
            sandbox = run.sandbox
        # The runtime queues a signal until the command has exec'd, so it always reaches
        # the real program.
        try:
            sandbox.signal(sig)
        except ProcessLookupError as exc:
            raise RequestError(404, f"no live process with spid {spid}") from exc

    def write_stdin(self, op_uuid: str, spid: int, data: bytes, close: bool) -> None:
        """Deliver stdin to spid 1 (blocking until written); 409 closed, 410 finished."""
        run = self._live(op_uuid)
        if spid != 1:
            self._write_proc_stdin(run, spid, data, close)
            return
        if not run.started.wait(timeout=30):
            raise RequestError(425, "the process has not started yet")
        with run.stdin_lock:
            if run.closed or run.sandbox is None:
                raise RequestError(410, "the instance has finished")
            if not run.stdin_open:
                raise Conflict("stdin is closed")
            from contree_shell.sandbox.runtime import StdinClosed

            try:
                if data:
                    run.sandbox.write_stdin(data)
                    self._record_stdin(run, data)
                if close:
                    run.stdin_open = False
                    run.sandbox.close_stdin()
            except (StdinClosed, BrokenPipeError, OSError) as exc:
                run.stdin_open = False
                if run.closed or run.sandbox.done():
                    raise RequestError(410, "the instance has finished") from exc
                raise Conflict("stdin is closed") from exc

    def partial_result(self, op_uuid: str) -> dict[str, Any] | None:
        """The InstanceResult of a live run so far (sentinel state), or None if not live."""
        with self._lock:
            run = self._runs.get(op_uuid)
        if run is None:
            return None
        with run.lock:
            result = empty_result()
            result["stdout"] = self._stream_repr(run, "stdout")
            result["stderr"] = self._stream_repr(run, "stderr")
            result["state"]["pid"] = int(getattr(run.sandbox, "pid", 0) or 0)
        return result

    def shutdown(self, reason: str = "server stopped", wait: bool = True) -> None:
        """Cancel every live run and wait for the workers to clean up."""
        self._shutting_down = True
        with self._lock:
            live = list(self._runs)
        for op_uuid in live:
            self.cancel(op_uuid, reason)
        self._pool.shutdown(wait=wait, cancel_futures=False)

    # -- worker side --------------------------------------------------------------

    def _emit(self, run: _Run, type_: str, data: dict[str, Any], spid: int | None) -> None:
        with run.lock:
            if not run.closed:
                self.ops.append_event(run.op, type_, data, spid=spid)

    def _record_stdin(self, run: _Run, data: bytes) -> None:
        cap = run.spec["truncate_output_at"]
        keep = max(0, min(len(data), cap - run.stdin_recorded))
        run.stdin_recorded += keep
        if keep:
            value, enc = encode_stream(data[:keep])
            self._emit(run, "stdin", {"value": value, "encoding": enc, "truncated": False}, 1)
        if keep < len(data):
            run.streams["stdin"].dropped += len(data) - keep

    def _on_output(self, run: _Run, stream: str, chunk: bytes) -> None:
        with run.lock:
            if run.early is not None:  # `spawn` is not recorded yet
                run.early.append((stream, chunk))
                return
            self._record_output(run, stream, chunk)

    def _record_output(self, run: _Run, stream: str, chunk: bytes) -> None:
        rec = run.streams.get(stream)
        if rec is None:
            return
        cap = run.spec["truncate_output_at"]
        with run.lock:
            keep = max(0, min(len(chunk), cap - len(rec.data)))
            if keep:
                part = chunk[:keep]
                rec.data += part
                for i in range(0, len(part), _CHUNK):
                    value, enc = encode_stream(part[i : i + _CHUNK])
                    self._emit(
                        run, stream, {"value": value, "encoding": enc, "truncated": False}, 1
                    )
            rec.dropped += len(chunk) - keep

    def _metadata(self, run: _Run, result: dict[str, Any] | None) -> dict[str, Any]:
        return dict(run.spec, result=result)

    def _worker(self, run: _Run) -> None:
        from contree_shell.sandbox.runtime import SandboxError

        try:
            self._execute(run)
        except (SandboxError, RequestError) as exc:
            self._fail(run, f"spawn failed: {exc}", reason="spawn_failed")
        except Exception as exc:
            log.exception("run %s failed", run.op)
            self._fail(run, f"internal error: {exc}", reason="spawn_failed")
        finally:
            run.started.set()  # release stdin writers waiting for a start that never came
            with self._lock:
                self._runs.pop(run.op, None)

    def _fail(self, run: _Run, error: str, *, reason: str) -> None:
        with run.lock:
            if run.closed:
                return
            self._emit(run, "shutdown", {"stopped_at": iso_z(utcnow()), "reason": reason}, 0)
            run.closed = True
            self.ops.finish(
                run.op, "FAILED", error=error, metadata=self._metadata(run, empty_result())
            )

    def _execute(self, run: _Run) -> None:
        from contree_shell.sandbox.inspect import ImageView
        from contree_shell.sandbox.runtime import RunSpec, Sandbox

        spec = run.spec
        with run.lock:
            if run.closed:
                return
        image = self.store.get(spec["image"])
        config: dict[str, Any] = dict(image.config or {})
        image_env: dict[str, str] = dict(config.get("env") or {})
        # new_run(parent) pins the image's layers until commit/discard, so a background
        # squash cannot remove a layer this run has mounted.
        rundir = self.store.new_run(spec["image"])
        layers = list(getattr(rundir, "layers", ()) or self.store.layer_paths(spec["image"]))
        committed = False
        try:
            self._emit(
                run,
                "init",
                {
                    "started_at": iso_z(utcnow()),
                    "runtime_path": str(rundir.path),
                    "verbose": False,
                    "init_pid": 1,
                    "hostname": spec["hostname"],
                    "kernel": f"{platform.release()} {platform.version()}",
                    "machine": platform.machine(),
                },
                0,
            )
            if spec["files"]:
                self._materialize(ImageView(layers), Path(rundir.upper), spec["files"])

            run.passwd = _read_passwd(ImageView(layers))
            env = compose_env(image_env, run.raw_env, shell=spec["shell"],
                              home=home_of(run.passwd, spec["uid"]))
            if spec["shell"]:
                shell = run.raw_env.get("SHELL") or "/bin/sh"
                argv = [shell, "-c", spec["command"]]
            else:
                argv = [spec["command"], *spec["args"]]
            cwd = spec["cwd"] or config.get("workdir") or "/"
            if len(cwd) > 1:
                cwd = cwd.rstrip("/")
            stdin = spec["stdin"]
            stdin_data = decode_stream(stdin["value"], stdin["encoding"])
            run.stdin_open = (not stdin["close"]) or bool(stdin_data)
            rspec = RunSpec(
                argv=argv,
                env=env,
                cwd=cwd,
                uid=spec["uid"],
                gid=spec["gid"],
                hostname=spec["hostname"],
                timeout=float(spec["timeout"]),
                network=bool(spec["networking"]["enabled"]) and self.network_supported,
                stdin_open=run.stdin_open,
                limits=self.limits,
            )
            with run.lock:
                if run.closed:
                    return
            # Not under run.lock: start() waits for the sandbox I/O thread, which may
            # deliver output first; that output is held back until `spawn` is recorded.
            sandbox = Sandbox.start(
                lowers=layers,
                upper=Path(rundir.upper),
                work=Path(rundir.work),
                spec=rspec,
                on_output=lambda stream, chunk: self._on_output(run, stream, chunk),
            )
            _record_cgroups(Path(rundir.path), sandbox)
            with run.lock:
                run.sandbox = sandbox
                cancelled = run.closed  # cancelled while starting
                if not cancelled:
                    # EXECUTING means "the command is running": set once it has spawned.
                    self.ops.update(run.op, status="EXECUTING")
                    if rspec.network:
                        self._emit(run, "network", network_event(sandbox), 0)
                    self._emit_spawn(run, sandbox, argv, cwd, env)
                    run.image_env, run.default_cwd = image_env, cwd
            if cancelled:
                sandbox.kill()
                sandbox.wait()
                return
            run.started.set()
            watcher = self._watch_layer_size(run, sandbox, Path(rundir.upper))
            if run.pending_signal is not None:
                sandbox.signal(run.pending_signal)
            self._feed_initial_stdin(run, stdin_data, stdin["close"])
            info = sandbox.wait()
            if watcher is not None:
                watcher.set()
            with run.lock:
                if run.closed:  # cancelled while running: the op is already terminal
                    return
            committed = self._complete(run, info, rundir, image, config, cwd)
        finally:
            if not committed:
                try:
                    self.store.discard(rundir)
                except Exception:
                    log.exception("discard of %s failed", rundir.path)

    def _emit_truncations(
        self, run: _Run, streams: dict[str, _Stream], stdin_recorded: int, spid: int
    ) -> None:
        """One `truncated` event per stream of a process that crossed its cap (§3.8)."""
        for name in ("stdout", "stderr", "stdin"):
            rec = streams[name]
            if rec.dropped:
                emitted = len(rec.data) if name != "stdin" else stdin_recorded
                self._emit(
                    run,
                    "truncated",
                    {"stream": name, "bytes_emitted": emitted, "bytes_dropped": rec.dropped},
                    spid,
                )

    def _emit_spawn(
        self, run: _Run, sandbox: Any, argv: list[str], cwd: str, env: dict[str, str]
    ) -> None:
        """Record `spawn` (spid 1), then the output that arrived before it."""
        spec = run.spec
        self._emit(
            run,
            "spawn",
            {
                "pid": int(getattr(sandbox, "pid", 0) or 0),
                "command": argv[0],
                "args": argv[1:],
                "shell": spec["shell"],
                "cwd": cwd,
                "uid": spec["uid"],
                "gid": spec["gid"],
                "timeout": spec["timeout"],
                "truncate_at": spec["truncate_output_at"],
                "env": mask_env(env),
            },
            1,
        )
        early, run.early = run.early, None
        for stream, chunk in early or []:
            self._record_output(run, stream, chunk)

    def _feed_initial_stdin(self, run: _Run, data: bytes, close: bool) -> None:
        if not run.stdin_open:
            return
        with run.stdin_lock:
            try:
                if data:
                    run.sandbox.write_stdin(data)
                    self._record_stdin(run, data)
                if close:
                    run.stdin_open = False
                    run.sandbox.close_stdin()
            except Exception:  # the process exited before reading its stdin
                run.stdin_open = False

    def _complete(
        self, run: _Run, info: Any, rundir: Any, image: Any, config: dict[str, Any], cwd: str
    ) -> bool:
        """Record exit/shutdown, commit or discard, finish the op. True if committed."""
        spec = run.spec
        run.stdin_open = False
        if getattr(info, "error", None):
            self._emit(
                run,
                "stderr",
                {"value": f"{info.error}\n", "encoding": "ascii", "truncated": False},
                0,
            )
            self._fail(run, f"spawn failed: {info.error}", reason="spawn_failed")
            return False
        timed_out = bool(info.timed_out)
        if timed_out:
            code, sig = -1, 9
        elif info.exit_code is None:
            code, sig = -1, int(info.signal or 9)
        else:
            code, sig = int(info.exit_code), -1
        duration = float(info.duration or 0.0)
        self._emit_truncations(run, run.streams, run.stdin_recorded, 1)
        self._emit(
            run,
            "exit",
            {
                "pid": int(info.pid or 0),
                "code": code,
                "signal": sig,
                "core_dump": False,
                "timed_out": timed_out,
                "duration_ms": round(duration * 1000),
                "resources": event_resources(info.rusage),
            },
            1,
        )
        run.main_exit_recorded.set()
        self._end_subprocesses(run)
        limit = int(spec["resources_limits"]["max_layer_bytes"])
        size = layer_size(Path(rundir.upper), stop_above=limit)
        if run.size_capped or size > limit:
            self._size_cap(run, limit, size, info)
            return False
        reason = (
            "timeout"
            if timed_out
            else ("signal" if run.signalled and sig != -1 else "job_complete")
        )
        self._emit(run, "shutdown", {"stopped_at": iso_z(utcnow()), "reason": reason}, 0)
        result = {
            "stdout": self._stream_repr(run, "stdout"),
            "stderr": self._stream_repr(run, "stderr"),
            "state": {
                "exit_code": code,
                "signal": 0 if sig == -1 else sig,
                "timed_out": timed_out,
                "pid": int(info.pid or 0),
                "core_dump": False,
                "stopped": False,
                "continued": False,
            },
            "resources": result_resources(info.rusage, duration),
        }
        rusage = info.rusage or {}
        cpu = (int(rusage.get("user_time_us", 0)) + int(rusage.get("sys_time_us", 0))) / 1e6
        mem = int(rusage.get("max_rss_kb", 0))
        result_image: str | None = None
        image_size: int | None = None
        committed = False
        if not spec["disposable"]:
            new_config = self._new_config(run, config, cwd)
            res = self.store.commit(
                spec["image"],
                rundir,
                operation_uuid=run.op,
                config=new_config,
                keep_mtime_only=self.keep_mtime_only,
            )
            committed = True
            result_image = str(res.image)
            image_size = int(res.size_bytes) if res.changed else 0
        with run.lock:
            if run.closed:
                return committed
            run.closed = True
            self.ops.finish(
                run.op,
                "SUCCESS",
                result_image_uuid=result_image,
                image_size=image_size,
                consumed_cpu=cpu,
                consumed_memory=mem,
                metadata=self._metadata(run, result),
                result={"image": result_image, "tag": None},
            )
        return committed

    def _stream_repr(self, run: _Run, name: str) -> dict[str, Any]:
        rec = run.streams[name]
        value, enc = encode_stream(bytes(rec.data))
        return {"value": value, "encoding": enc, "truncated": rec.dropped > 0}

    def _new_config(self, run: _Run, config: dict[str, Any], cwd: str) -> dict[str, Any] | None:
        """The result image's config when preserve_env/preserve_cwd change it, else None."""
        spec = run.spec
        new = dict(config)
        if spec["preserve_env"]:
            env = dict(config.get("env") or {})
            for k, v in run.raw_env.items():
                if v is None or v == "":
                    env.pop(k, None)
                else:
                    env[k] = v
            new["env"] = env
        if spec["preserve_cwd"]:
            new["workdir"] = cwd
        if new == config:
            return None
        new.setdefault("env", {})
        new.setdefault("workdir", None)
        new.setdefault("user", None)
        return new

    # -- subprocesses (spid >= 2) -------------------------------------------------

    def exec(self, op_uuid: str, body: Any) -> int:
        """Start an extra process (ExecSpec) in a running instance; returns its spid."""
        from contree_shell.sandbox.nsexec import ExecError, NsProcess

        espec = normalize_exec_request(body)
        run = self._running(op_uuid)
        if not run.started.is_set():
            raise RequestError(425, "the instance has not started yet")
        with run.lock:
            sandbox = run.sandbox
            if run.closed or sandbox is None or sandbox.done():
                raise Conflict("the instance is not running")
            pid1 = int(getattr(sandbox, "_pid1", 0) or 0)
            if not pid1:
                raise Conflict("the instance is not running")
            spid = run.next_spid
            run.next_spid += 1
            proc = _Proc(spid=spid, truncate_at=espec["truncate_output_at"])
            run.procs[spid] = proc
        env = compose_env(run.image_env, espec["env"], shell=espec["shell"],
                          home=home_of(run.passwd, espec["uid"]))
        if espec["shell"]:
            argv = [espec["env"].get("SHELL") or "/bin/sh", "-c", espec["command"]]
        else:
            argv = [espec["command"], *espec["args"]]
        cwd = espec["cwd"] or run.default_cwd
        stdin = espec["stdin"]
        stdin_data = decode_stream(stdin["value"], stdin["encoding"])
        proc.stdin_open = (not stdin["close"]) or bool(stdin_data)
        try:
            process = NsProcess.start(
                pid1=pid1,
                argv=argv,
                env=env,
                cwd=cwd,
                uid=espec["uid"],
                gid=espec["gid"],
                stdin_open=proc.stdin_open,
                on_output=lambda stream, chunk: self._on_proc_output(run, proc, stream, chunk),
                on_exit=lambda res: self._on_proc_exit(run, proc, res),
            )
        except ExecError as exc:
            with run.lock:
                run.procs.pop(spid, None)
            proc.spawn_recorded.set()
            if run.closed or sandbox.done():
                raise Conflict("the instance is not running") from exc
            # Most often the instance is ending right now (its pid namespace refuses
            # new members); either way the caller can do nothing but look at its state.
            raise Conflict(f"cannot start a process in this instance: {exc}") from exc
        with run.lock:
            proc.process = process
            self._emit(
                run,
                "spawn",
                {
                    "pid": int(process.pid),
                    "command": argv[0],
                    "args": argv[1:],
                    "shell": espec["shell"],
                    "cwd": cwd,
                    "uid": espec["uid"],
                    "gid": espec["gid"],
                    "timeout": run.spec["timeout"],
                    "truncate_at": espec["truncate_output_at"],
                    "env": mask_env(env),
                },
                spid,
            )
            early, proc.early = proc.early, None
            for stream, chunk in early or []:
                self._record_proc_output(run, proc, stream, chunk)
        proc.spawn_recorded.set()
        if proc.stdin_open:
            with contextlib.suppress(RequestError):
                self._write_proc_stdin(run, spid, stdin_data, stdin["close"])
        return spid

    def _write_proc_stdin(self, run: _Run, spid: int, data: bytes, close: bool) -> None:
        proc = run.procs.get(spid)
        if proc is None or proc.process is None:
            raise RequestError(404, f"no live process with spid {spid}")
        with proc.stdin_lock:
            if proc.process.done():
                raise RequestError(404, f"no live process with spid {spid}")
            if not proc.stdin_open:
                raise Conflict("stdin is closed")
            try:
                if data:
                    proc.process.write_stdin(data)
                    self._record_proc_stdin(run, proc, data)
                if close:
                    proc.stdin_open = False
                    proc.process.close_stdin()
            except OSError as exc:
                proc.stdin_open = False
                raise Conflict("stdin is closed") from exc

    def _record_proc_stdin(self, run: _Run, proc: _Proc, data: bytes) -> None:
        keep = max(0, min(len(data), proc.truncate_at - proc.stdin_recorded))
        proc.stdin_recorded += keep
        if keep:
            value, enc = encode_stream(data[:keep])
            self._emit(
                run, "stdin", {"value": value, "encoding": enc, "truncated": False}, proc.spid
            )
        if keep < len(data):
            proc.streams["stdin"].dropped += len(data) - keep

    def _on_proc_output(self, run: _Run, proc: _Proc, stream: str, chunk: bytes) -> None:
        with run.lock:
            if proc.early is not None:
                proc.early.append((stream, chunk))
                return
            self._record_proc_output(run, proc, stream, chunk)

    def _record_proc_output(self, run: _Run, proc: _Proc, stream: str, chunk: bytes) -> None:
        rec = proc.streams[stream]
        with run.lock:
            keep = max(0, min(len(chunk), proc.truncate_at - len(rec.data)))
            if keep:
                part = chunk[:keep]
                rec.data += part
                for i in range(0, len(part), _CHUNK):
                    value, enc = encode_stream(part[i : i + _CHUNK])
                    self._emit(
                        run,
                        stream,
                        {"value": value, "encoding": enc, "truncated": False},
                        proc.spid,
                    )
            rec.dropped += len(chunk) - keep

    def _on_proc_exit(self, run: _Run, proc: _Proc, res: Any) -> None:
        """Record the extra process's `truncated` and `exit` events (its I/O thread)."""
        try:
            proc.stdin_open = False
            # `spawn` first: the process may end before exec() has recorded it.
            proc.spawn_recorded.wait(timeout=10)
            if proc.process is None:
                return  # it never started (exec() answered with an error): no events
            if res.signal == signal_mod.SIGKILL and not proc.signalled:
                # Killed with its sandbox: spid 1's exit comes first in the log (§4.9).
                run.main_exit_recorded.wait(timeout=2)
            if res.error:
                self._emit(
                    run,
                    "stderr",
                    {"value": f"{res.error}\n", "encoding": "ascii", "truncated": False},
                    proc.spid,
                )
            self._emit_truncations(run, proc.streams, proc.stdin_recorded, proc.spid)
            code = -1 if res.exit_code is None else int(res.exit_code)
            sig = -1 if res.exit_code is not None else int(res.signal or 9)
            self._emit(
                run,
                "exit",
                {
                    "pid": int(res.pid or 0),
                    "code": code,
                    "signal": sig,
                    "core_dump": False,
                    "timed_out": False,
                    "duration_ms": round(float(res.duration or 0) * 1000),
                    "resources": event_resources(res.rusage),
                },
                proc.spid,
            )
        finally:
            proc.exit_recorded.set()

    def _end_subprocesses(self, run: _Run) -> None:
        """After spid 1 exited: the extra processes die with the sandbox; record their exits.

        Their helpers must be gone before the upper dir is committed.
        """
        procs = list(run.procs.values())
        for proc in procs:
            if proc.process is not None:
                proc.process.kill()
        for proc in procs:
            if proc.process is not None:
                proc.exit_recorded.wait(timeout=5)

    def subprocess_result(self, op_uuid: str, spid: int) -> dict[str, Any] | None:
        """InstanceResult of an extra process from its events; None without `spawn`."""
        events = self.ops.events(op_uuid, spid=spid)
        if not any(ev.type == "spawn" for ev in events):
            return None
        result = empty_result()
        data = {"stdout": bytearray(), "stderr": bytearray()}
        truncated = {"stdout": False, "stderr": False}
        for ev in events:
            if ev.type == "spawn":
                result["state"]["pid"] = int(ev.data.get("pid", 0) or 0)
            elif ev.type in data:
                try:
                    data[ev.type] += decode_stream(
                        str(ev.data.get("value", "")), str(ev.data.get("encoding") or "ascii")
                    )
                except RequestError:
                    continue
            elif ev.type == "truncated" and ev.data.get("stream") in truncated:
                truncated[ev.data["stream"]] = True
            elif ev.type == "exit":
                code, sig = int(ev.data.get("code", -1)), int(ev.data.get("signal", -1))
                result["state"].update(
                    exit_code=code,
                    signal=0 if sig == -1 else sig,
                    timed_out=bool(ev.data.get("timed_out", False)),
                    pid=int(ev.data.get("pid", 0) or 0),
                )
                result["resources"] = result_resources(
                    ev.data.get("resources"), float(ev.data.get("duration_ms", 0)) / 1000
                )
        for name in ("stdout", "stderr"):
            value, enc = encode_stream(bytes(data[name]))
            result[name] = {"value": value, "encoding": enc, "truncated": truncated[name]}
        return result

    # -- writable layer size cap ---------------------------------------------------

    def _watch_layer_size(self, run: _Run, sandbox: Any, upper: Path) -> threading.Event | None:
        """Watch the upper dir during the run when a cap below the default was asked for.

        Kills the sandbox once the cap is crossed; `_complete` then fails the run. The
        default cap (12 GiB) is only checked after the run: walking a large upper dir
        twice a second would cost more than it saves.
        """
        limit = int(run.spec["resources_limits"]["max_layer_bytes"])
        if limit >= DEFAULT_MAX_LAYER_BYTES:
            return None
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(_SIZE_POLL) and not sandbox.done():
                if layer_size(upper, stop_above=limit) > limit:
                    run.size_capped = True
                    sandbox.kill()
                    return

        threading.Thread(target=watch, name=f"sizecap-{run.op[:8]}", daemon=True).start()
        return stop

    def _size_cap(self, run: _Run, limit: int, size: int, info: Any) -> None:
        """Fail a run whose writable layer grew past max_layer_bytes; nothing is kept."""
        with run.lock:
            if run.closed:
                return
            self._emit(run, "size_cap", {"limit_bytes": limit, "file_size": size}, 0)
            self._emit(
                run, "shutdown", {"stopped_at": iso_z(utcnow()), "reason": "job_complete"}, 0
            )
            run.closed = True
            result = empty_result()
            result["stdout"] = self._stream_repr(run, "stdout")
            result["stderr"] = self._stream_repr(run, "stderr")
            self.ops.finish(
                run.op,
                "FAILED",
                error=(
                    f"size_cap: the run's writable layer exceeded "
                    f"resources_limits.max_layer_bytes ({size} > {limit} bytes)"
                ),
                metadata=self._metadata(run, result),
            )

    # -- files --------------------------------------------------------------------

    def _materialize(self, view: Any, upper: Path, files: dict[str, dict[str, Any]]) -> None:
        """Write the uploaded files into the run's upper dir before the sandbox starts."""
        for path, spec in files.items():
            rec = self.files.by_uuid(spec["uuid"])
            parent = _resolve_in_image(view, upper, posixpath.dirname(posixpath.normpath(path)))
            name = posixpath.basename(posixpath.normpath(path))
            _ensure_dirs(view, upper, parent)
            dest = upper / parent.lstrip("/") / name
            if dest.is_dir() and not dest.is_symlink():
                raise RequestError(400, f"cannot write file {path}: it is a directory")
            if dest.is_symlink() or dest.exists():
                dest.unlink()
            tmp = dest.with_name(f".{name}.contree-tmp")
            shutil.copyfile(self.files.blob_path(rec), tmp)
            os.chown(tmp, spec["uid"], spec["gid"])
            os.chmod(tmp, parse_mode(spec["mode"]))
            os.replace(tmp, dest)


_SIZE_POLL = 0.25
_EXEC_FORBIDDEN = (
    "image",
    "hostname",
    "resources_limits",
    "files",
    "timeout",
    "disposable",
    "preserve_env",
    "preserve_cwd",
    "networking",
)


def normalize_exec_request(body: Any) -> dict[str, Any]:
    """Validate an ExecSpec (body of POST …/subprocesses) and fill its defaults."""
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    bad = [k for k in _EXEC_FORBIDDEN if k in body]
    if bad:
        raise RequestError(400, f"not accepted for a subprocess: {', '.join(bad)}")
    command = body.get("command")
    if not isinstance(command, str) or not command:
        raise RequestError(400, "'command' is required and must be a non-empty string")
    shell = _bool(body, "shell", False)
    args = _args_field(body)
    if shell and args:
        raise RequestError(400, "'args' must be empty when 'shell' is true")
    env = _env_field(body)
    cwd = _cwd_field(body)
    if len(cwd) > 1:
        cwd = cwd.rstrip("/")
    truncate = body.get("truncate_output_at")
    truncate = (
        DEFAULT_TRUNCATE
        if truncate is None
        else _int(truncate, "truncate_output_at", minimum=0, maximum=MAX_TRUNCATE)
    )
    return {
        "command": command,
        "args": list(args),
        "shell": shell,
        "env": dict(env),
        "cwd": cwd,
        "uid": _int(body.get("uid", 0) or 0, "uid", minimum=0, maximum=2**32 - 2),
        "gid": _int(body.get("gid", 0) or 0, "gid", minimum=0, maximum=2**32 - 2),
        "stdin": _stdin(body.get("stdin")),
        "truncate_output_at": truncate,
    }


def layer_size(upper: Path, *, stop_above: int | None = None) -> int:
    """Bytes in a run's upper dir (file sizes, symlink targets, 512 per other entry).

    Stops early once past `stop_above` (the answer is then only "more than that").
    """
    total = 0
    stack = [str(upper)]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:
            continue
        with it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                    total += 512
                elif entry.is_file(follow_symlinks=False) or entry.is_symlink():
                    total += st.st_size
                else:
                    total += 512
                if stop_above is not None and total > stop_above:
                    return total
    return total


def network_event(sandbox: Any) -> dict[str, Any]:
    """The `network` event's payload: the sandbox's interfaces and counters, from the
    /proc/net files pid 1 read inside its namespace before the command started."""
    files: dict[str, str] = getattr(sandbox, "network_files", None) or {}
    interfaces: list[dict[str, Any]] = []
    error: str | None = None
    try:
        if not files.get("dev"):
            raise ValueError("no interface list was reported")
        for line in files["dev"].splitlines()[2:]:
            name, _, rest = line.partition(":")
            f = [int(x) for x in rest.split()]
            if len(f) < 12:
                continue
            interfaces.append(
                {
                    "name": name.strip(),
                    "rx_bytes": f[0],
                    "rx_packets": f[1],
                    "rx_errs": f[2],
                    "rx_drop": f[3],
                    "tx_bytes": f[8],
                    "tx_packets": f[9],
                    "tx_errs": f[10],
                    "tx_drop": f[11],
                }
            )
    except ValueError as exc:
        error = f"cannot read the sandbox's interfaces: {exc}"
    configured = _configured(files)
    nameserver = _nameserver(sandbox)
    if nameserver:
        configured["nameserver"] = nameserver
    out: dict[str, Any] = {"interfaces": interfaces, "configured": configured}
    if error:
        out["error"] = error
    return out


def _configured(files: dict[str, str]) -> dict[str, str]:
    """Addresses, gateways and DNS the sandbox was given, from its /proc/net files."""
    out: dict[str, str] = {}
    for line in files.get("route", "").splitlines()[1:]:
        f = line.split()
        if len(f) > 2 and f[1] == "00000000" and f[2] != "00000000":
            out["ip4_gw"] = socket.inet_ntoa(bytes.fromhex(f[2])[::-1])
            break
    prev = ""
    for line in files.get("fib_trie", "").splitlines():
        text = line.strip()
        if text.startswith("/32 host LOCAL") and not prev.startswith("127."):
            out["ip4"] = prev
            break
        if text.startswith(("|--", "+--")):
            prev = text[3:].strip().split()[0]
    for line in files.get("if_inet6", "").splitlines():
        f = line.split()
        if len(f) >= 6 and f[3] == "00" and f[5] != "lo":  # global scope
            out["ip6"] = socket.inet_ntop(socket.AF_INET6, bytes.fromhex(f[0]))
            break
    for line in files.get("ipv6_route", "").splitlines():
        f = line.split()
        if len(f) >= 10 and f[0] == "0" * 32 and f[1] == "00" and f[4] != "0" * 32:
            out["ip6_gw"] = socket.inet_ntop(socket.AF_INET6, bytes.fromhex(f[4]))
            break
    return out


def _nameserver(sandbox: Any) -> str | None:
    """The nameserver the runtime wrote into the sandbox's resolv.conf (from its plan,
    never read back through the sandbox's filesystem)."""
    plan = getattr(sandbox, "_plan", None)
    for target, content in getattr(plan, "etc_files", None) or []:
        if bytes(target).endswith(b"resolv.conf"):
            for line in bytes(content).decode("utf-8", "replace").splitlines():
                f = line.split()
                if len(f) >= 2 and f[0] == "nameserver":
                    return f[1]
    return None


def _resolve_in_image(view: Any, upper: Path, path: str) -> str:
    """Resolve a directory path through the image's symlinks (never leaving its root)."""
    from contree_shell.sandbox.inspect import PathNotFound

    parts = [p for p in path.split("/") if p]
    out: list[str] = []
    hops = 0
    while parts:
        comp = parts.pop(0)
        if comp == ".":
            continue
        if comp == "..":
            if out:
                out.pop()
            continue
        cur = "/" + "/".join([*out, comp])
        target: str | None = None
        upper_entry = upper / cur.lstrip("/")
        if upper_entry.is_symlink():
            target = os.readlink(upper_entry)
        elif not upper_entry.exists():
            try:
                st = view.stat(cur, follow=False)
            except (PathNotFound, FileNotFoundError, NotADirectoryError):
                st = None
            except Exception:
                st = None
            if st is not None and st.is_symlink:
                target = st.symlink_to
            elif st is not None and not st.is_dir:
                raise RequestError(400, f"cannot create {path}: {cur} is not a directory")
        if target is not None:
            hops += 1
            if hops > 40:
                raise RequestError(400, f"too many symlinks resolving {path}")
            if target.startswith("/"):
                out = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        out.append(comp)
    return "/" + "/".join(out)


def _ensure_dirs(view: Any, upper: Path, path: str) -> None:
    """Create `path` in upper, copying the image's ownership and mode where it exists."""
    cur = ""
    for comp in [p for p in path.split("/") if p]:
        cur = f"{cur}/{comp}"
        d = upper / cur.lstrip("/")
        if d.is_dir():
            continue
        mode, uid, gid, mtime = 0o755, 0, 0, None
        try:
            st = view.stat(cur, follow=False)
            if st.is_dir:
                mode, uid, gid, mtime = st.mode & 0o7777, st.uid, st.gid, st.mtime
        except Exception:  # not in the image: a new directory
            pass
        d.mkdir()
        os.chown(d, uid, gid)
        os.chmod(d, mode)
        if mtime is not None:
            os.utime(d, (mtime, mtime))


SIGNAL_NAMES = {
    name[3:]: int(sig)
    for name, sig in signal_mod.Signals.__members__.items()
    if name.startswith("SIG") and not name.startswith("SIG_")
}


def parse_signal(value: str | None) -> int:
    """9, "KILL", "SIGKILL", "kill" → signal number; default KILL; ValueError if unknown."""
    if value is None or value == "":
        return int(signal_mod.SIGKILL)
    text = value.strip()
    if text.lstrip("-").isdigit():
        num = int(text)
        if num < 1 or num > 64:
            raise ValueError(value)
        return num
    name = text.upper()
    if name.startswith("SIG"):
        name = name[3:]
    if name not in SIGNAL_NAMES:
        raise ValueError(value)
    return SIGNAL_NAMES[name]


__all__ = [
    "TERMINAL",
    "Conflict",
    "InstanceManager",
    "OperationNotFound",
    "RequestError",
    "encode_stream",
    "normalize_spawn_request",
    "parse_mode",
    "parse_signal",
]
