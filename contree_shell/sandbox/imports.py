"""Image import operations (`POST /v1/images/import`).

Registry URLs: `docker://[REGISTRY/]NAME[:TAG|@DIGEST]` (Docker Hub short names allowed),
`oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]`, `docker-archive:FILE` (local paths are on the
server's filesystem and must be absolute), plus the two built-in bases `busybox:` (a tiny
image from the host's static busybox) and `debootstrap:SUITE` (a Debian minbase).

OCI images keep their layers (no flattening) and their config's env, workdir and user.
Re-importing an image whose manifest digest is already in the store finishes with the
same image uuid (the tag re-pointed). Progress lines become `stderr` events of spid 0;
the log ends with `completion` like every other operation. Credentials live only in
memory for the duration of the import: the stored metadata shows `"<MASKED>"`.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contree_shell.sandbox.instances import DEFAULT_PATH, TAG_RE, RequestError, encode_stream
from contree_shell.sandbox.operations import OperationsDB

log = logging.getLogger("contree.imports")

DEFAULT_IMPORT_TIMEOUT = 300
OCI_SCHEMES = ("docker://", "oci:", "oci-archive:", "docker-archive:")
LOCAL_SCHEMES = ("oci:", "oci-archive:", "docker-archive:")


class ImportStopped(Exception):
    """Raised from the progress hook to abandon an import (cancelled or timed out)."""


def _check_url(url: str) -> None:
    """400 unless `url` is a registry URL this server can import (syntax only: whether
    a local path exists or a registry answers is the operation's business)."""
    scheme, _, rest = url.partition(":")
    if scheme == "busybox" and rest in ("", "latest"):
        return
    if scheme == "debootstrap" and rest and all(c.isalnum() or c in "-_." for c in rest):
        return
    if url.startswith("docker://"):
        from contree_shell.sandbox.oci import ImportFailed
        from contree_shell.sandbox.oci_registry import parse_docker_reference

        try:
            parse_docker_reference(url)
        except ImportFailed as exc:
            raise RequestError(400, str(exc)) from None
        return
    if url.startswith(LOCAL_SCHEMES):
        if not rest.startswith("/"):
            raise RequestError(
                400,
                f"local image paths must be absolute (on the server's filesystem): {url}",
            )
        return
    raise RequestError(
        400,
        f"unsupported registry URL: {url} (supported: docker://, oci:, oci-archive:, "
        "docker-archive:, busybox:, debootstrap:SUITE)",
    )


def normalize_import_request(body: Any) -> dict[str, Any]:
    """Validate an ImageImportRequest; returns the metadata to store (password masked)."""
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    registry = body.get("registry")
    if (
        not isinstance(registry, dict)
        or not isinstance(registry.get("url"), str)
        or not registry["url"].strip()
    ):
        raise RequestError(400, "'registry.url' is required")
    url = registry["url"].strip()
    _check_url(url)
    tag = body.get("tag")
    if tag is not None and (not isinstance(tag, str) or not TAG_RE.match(tag)):
        raise RequestError(400, f"invalid tag: {tag!r}")
    timeout = body.get("timeout")
    if timeout is None:
        timeout = DEFAULT_IMPORT_TIMEOUT
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 1:
        raise RequestError(400, "'timeout' must be a positive integer")
    creds = registry.get("credentials")
    reg: dict[str, Any] = {"url": url}
    if creds is not None:
        if not isinstance(creds, dict) or not all(
            isinstance(creds.get(k), (str, type(None))) for k in ("username", "password")
        ):
            raise RequestError(400, "'registry.credentials' must be {username, password}")
        reg["credentials"] = {"username": creds.get("username"), "password": "<MASKED>"}
    return {"registry": reg, "tag": tag, "timeout": timeout}


def request_credentials(body: Any) -> tuple[str, str] | None:
    """(username, password) from a validated request, or None when none were given."""
    creds = body.get("registry", {}).get("credentials") if isinstance(body, dict) else None
    if not isinstance(creds, dict):
        return None
    user, password = creds.get("username") or "", creds.get("password") or ""
    if not user and not password:
        return None
    return (user, password)


@dataclass
class _Job:
    """One queued or running import: what the worker needs beyond the stored metadata."""

    timeout: int
    stop: threading.Event = field(default_factory=threading.Event)
    credentials: tuple[str, str] | None = None  # never stored, never logged
    timer: threading.Timer | None = None


class ImportManager:
    """Runs image imports on a small worker pool."""

    def __init__(
        self, *, store: Any, store_root: Path, ops: OperationsDB, max_workers: int = 2
    ) -> None:
        self.store = store
        self.tmp = store_root / "tmp"
        self.ops = ops
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="import")
        self._jobs: dict[str, _Job] = {}
        # Serialises terminal transitions and the final add to the store, so a cancel
        # either lands before the image exists or answers that the import already ended.
        self._lock = threading.Lock()

    def start(self, body: Any) -> str:
        """Create the image_import operation and queue it; returns its uuid."""
        metadata = normalize_import_request(body)
        op = self.ops.create("image_import", metadata)
        job = _Job(timeout=metadata["timeout"], credentials=request_credentials(body))
        with self._lock:
            self._jobs[op.uuid] = job
        # The timeout counts from the request, as a client waiting on it would.
        job.timer = threading.Timer(float(metadata["timeout"]), self._timed_out, (op.uuid,))
        job.timer.daemon = True
        job.timer.start()
        self._pool.submit(self._worker, op.uuid, metadata)
        return op.uuid

    def cancel(self, op_uuid: str, reason: str = "cancelled") -> bool:
        """End the operation CANCELLED now; the worker stops its builder and cleans up."""
        with self._lock:
            job = self._jobs.get(op_uuid)
            if job is not None:
                job.stop.set()
            return self.ops.finish(op_uuid, "CANCELLED", error=reason)

    def _timed_out(self, op_uuid: str) -> None:
        with self._lock:
            job = self._jobs.get(op_uuid)
            if job is None:
                return
            job.stop.set()
            message = f"import timed out after {job.timeout}s"
            if not self.ops.get(op_uuid).terminal:
                self._append(op_uuid, message)
                self.ops.finish(op_uuid, "FAILED", error=message)

    def shutdown(self, reason: str = "server stopped") -> None:
        for op_uuid in list(self.ops.active()):
            try:
                if self.ops.get(op_uuid).kind == "image_import":
                    self.cancel(op_uuid, reason)
            except KeyError:
                pass
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _append(self, op_uuid: str, line: str) -> None:
        value, encoding = encode_stream((line.rstrip("\n") + "\n").encode())
        self.ops.append_event(
            op_uuid, "stderr", {"value": value, "encoding": encoding, "truncated": False}, spid=0
        )

    def _event(self, op_uuid: str, line: str, *, stop_here: bool = True) -> None:
        """A progress line, unless the operation already ended: then raise ImportStopped
        (the OCI importer's cancellation hook) or, without ``stop_here``, drop the line
        (debootstrap watches the stop event itself and must not be unwound mid-read)."""
        with self._lock:
            job = self._jobs.get(op_uuid)
            if job is None or job.stop.is_set():
                if stop_here:
                    raise ImportStopped
                return
            self._append(op_uuid, line)

    def _worker(self, op_uuid: str, metadata: dict[str, Any]) -> None:
        with self._lock:
            job = self._jobs.get(op_uuid)
        if job is None or job.stop.is_set() or self.ops.get(op_uuid).status != "PENDING":
            self._forget(op_uuid)
            return
        self.ops.update(op_uuid, status="EXECUTING")
        dest = self.store.make_tmp("import")
        url: str = metadata["registry"]["url"]
        tag: str | None = metadata["tag"]
        try:
            if url.startswith(OCI_SCHEMES):
                self._import_oci(op_uuid, job, url, tag, dest)
            else:
                self._import_base(op_uuid, job, url, tag, dest)
        except Exception as exc:
            if isinstance(exc, ImportStopped) or job.stop.is_set():
                return  # cancel or timeout already ended the operation
            text = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
            message = text if text.startswith("import failed") else f"import failed: {text}"
            log.warning("import %s: %s", op_uuid, message)
            _remove(dest)  # before the op turns terminal: nothing is left once it is
            with self._lock:
                if not job.stop.is_set():
                    self._append(op_uuid, message)
                    self.ops.finish(op_uuid, "FAILED", error=message)
        finally:
            _remove(dest)
            self._forget(op_uuid)

    def _forget(self, op_uuid: str) -> None:
        with self._lock:
            job = self._jobs.pop(op_uuid, None)
        if job is not None and job.timer is not None:
            job.timer.cancel()

    def _succeed(
        self, op_uuid: str, job: _Job, tag: str | None, add: Callable[[], str], scratch: Path
    ) -> str | None:
        """Add the image and end the operation SUCCESS in one step under the lock: a
        cancel either lands before the image exists, or finds the import already done.
        The scratch dir goes before the operation turns terminal: nothing is left once it is."""
        with self._lock:
            if job.stop.is_set():
                return None
            image = add()
            _remove(scratch)
            self._append(op_uuid, f"imported as image {image}" + (f" ({tag})" if tag else ""))
            self.ops.finish(
                op_uuid,
                "SUCCESS",
                result_image_uuid=image,
                result={"image": image, "tag": tag},
                image_size=None,
            )
            return image

    def _import_oci(self, op_uuid: str, job: _Job, url: str, tag: str | None, dest: Path) -> None:
        """Pull and convert, then add the layers as one image (or find it already there)."""
        from contree_shell.sandbox.oci import import_reference

        pulled = import_reference(
            url,
            dest,
            credentials=job.credentials,
            progress=lambda line: self._event(op_uuid, line),
        )
        config = dict(pulled.config)
        env = dict(config.get("env") or {})
        env.setdefault("PATH", DEFAULT_PATH)
        config["env"] = env
        if config.get("user") not in (None, "", "0", "root", "0:0", "root:root"):
            self._event(
                op_uuid, f"image config sets user {config['user']!r} (kept in the image config)"
            )
        existing = self.store.find_by_digest(pulled.digest)
        if existing is not None:
            self._event(op_uuid, f"{pulled.source} is unchanged: already image {existing}")

        def add() -> str:
            return str(
                self.store.add_layers(
                    pulled.layers,
                    tag=tag,
                    config=config,
                    operation_uuid=op_uuid,
                    source_digest=pulled.digest,
                )
            )

        self._succeed(op_uuid, job, tag, add, dest)

    def _import_base(self, op_uuid: str, job: _Job, url: str, tag: str | None, dest: Path) -> None:
        from contree_shell.sandbox.bootstrap import build_busybox_rootfs, debootstrap_rootfs

        if url.startswith("busybox:"):
            build_busybox_rootfs(dest)
        else:
            debootstrap_rootfs(
                dest,
                url.partition(":")[2],
                lambda line: self._event(op_uuid, line, stop_here=False),
                cancel=job.stop,
            )
        config = {"env": {"PATH": DEFAULT_PATH}, "workdir": None, "user": None}
        self._succeed(
            op_uuid,
            job,
            tag,
            lambda: str(
                self.store.add_rootfs(dest, tag=tag, config=config, operation_uuid=op_uuid)
            ),
            dest,
        )


def _remove(path: Path) -> None:
    from contree_shell.sandbox.store import force_rmtree

    if path.exists():
        try:
            force_rmtree(path)
        except OSError:
            shutil.rmtree(path, ignore_errors=True)
