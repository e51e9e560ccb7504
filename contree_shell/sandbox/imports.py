"""Image import operations (`POST /v1/images/import`).

Supported registry URLs for now: `busybox:` (a tiny image from the host's static busybox)
and `debootstrap:SUITE` (a Debian minbase). Progress lines become `stderr` events of
spid 0; the log ends with `completion` like every other operation.
"""

from __future__ import annotations

import logging
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from contree_shell.sandbox.instances import DEFAULT_PATH, TAG_RE, RequestError, encode_stream
from contree_shell.sandbox.operations import OperationsDB

log = logging.getLogger("contree.imports")

DEFAULT_IMPORT_TIMEOUT = 300


def normalize_import_request(body: Any) -> dict[str, Any]:
    """Validate an ImageImportRequest; returns the metadata to store (password masked)."""
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    registry = body.get("registry")
    if (
        not isinstance(registry, dict)
        or not isinstance(registry.get("url"), str)
        or not registry["url"]
    ):
        raise RequestError(400, "'registry.url' is required")
    url = registry["url"].strip()
    scheme, _, rest = url.partition(":")
    if (scheme == "busybox" and rest in ("", "latest")) or (
        scheme == "debootstrap" and rest and all(c.isalnum() or c in "-_." for c in rest)
    ):
        pass
    else:
        raise RequestError(
            400, f"unsupported registry URL: {url} (supported here: busybox:, debootstrap:SUITE)"
        )
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
    if isinstance(creds, dict):
        reg["credentials"] = {"username": creds.get("username"), "password": "<MASKED>"}
    return {"registry": reg, "tag": tag, "timeout": timeout}


class ImportManager:
    """Runs image imports on a small worker pool."""

    def __init__(
        self, *, store: Any, store_root: Path, ops: OperationsDB, max_workers: int = 2
    ) -> None:
        self.store = store
        self.tmp = store_root / "tmp"
        self.ops = ops
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="import")
        self._cancelled: set[str] = set()
        self._stops: dict[str, threading.Event] = {}  # set → the builder gives up
        self._lock = threading.Lock()

    def start(self, body: Any) -> str:
        """Create the image_import operation and queue it; returns its uuid."""
        metadata = normalize_import_request(body)
        op = self.ops.create("image_import", metadata)
        with self._lock:
            self._stops[op.uuid] = threading.Event()
        self._pool.submit(self._worker, op.uuid, metadata)
        return op.uuid

    def cancel(self, op_uuid: str, reason: str = "cancelled") -> bool:
        """End the operation CANCELLED now; the worker stops its builder and cleans up."""
        with self._lock:
            self._cancelled.add(op_uuid)
            stop = self._stops.get(op_uuid)
            if stop is not None:
                stop.set()
            return self.ops.finish(op_uuid, "CANCELLED", error=reason)

    def shutdown(self, reason: str = "server stopped") -> None:
        for op_uuid in list(self.ops.active()):
            try:
                if self.ops.get(op_uuid).kind == "image_import":
                    self.cancel(op_uuid, reason)
            except KeyError:
                pass
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _event(self, op_uuid: str, line: str) -> None:
        with self._lock:
            if op_uuid in self._cancelled:
                return
            value, encoding = encode_stream((line.rstrip("\n") + "\n").encode())
            self.ops.append_event(
                op_uuid,
                "stderr",
                {"value": value, "encoding": encoding, "truncated": False},
                spid=0,
            )

    def _worker(self, op_uuid: str, metadata: dict[str, Any]) -> None:
        from contree_shell.sandbox.bootstrap import build_busybox_rootfs, debootstrap_rootfs

        with self._lock:
            stop = self._stops.setdefault(op_uuid, threading.Event())
        if self.ops.get(op_uuid).status != "PENDING":
            return
        self.ops.update(op_uuid, status="EXECUTING")
        dest = self.store.make_tmp("import")
        url: str = metadata["registry"]["url"]
        tag: str | None = metadata["tag"]
        timer = threading.Timer(float(metadata["timeout"]), stop.set)
        timer.daemon = True
        timer.start()
        try:
            if url.startswith("busybox:"):
                build_busybox_rootfs(dest)
            else:
                debootstrap_rootfs(
                    dest,
                    url.partition(":")[2],
                    lambda line: self._event(op_uuid, line),
                    cancel=stop,
                )
            if stop.is_set():
                raise TimeoutError
            config = {"env": {"PATH": DEFAULT_PATH}, "workdir": None, "user": None}
            image = str(self.store.add_rootfs(dest, tag=tag, config=config, operation_uuid=op_uuid))
            with self._lock:
                if op_uuid in self._cancelled:
                    return
                self.ops.finish(
                    op_uuid,
                    "SUCCESS",
                    result_image_uuid=image,
                    result={"image": image, "tag": tag},
                    image_size=None,
                )
        except Exception as exc:
            if stop.is_set() and op_uuid not in self._cancelled:
                message = f"import timed out after {metadata['timeout']}s"
            else:
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                message = f"import failed: {message}"
                log.warning("import %s: %s", op_uuid, message)
            self._event(op_uuid, message)
            _remove(dest)  # before the op turns terminal: nothing is left once it is
            with self._lock:
                if op_uuid not in self._cancelled:
                    self.ops.finish(op_uuid, "FAILED", error=message)
        finally:
            timer.cancel()
            with self._lock:
                self._stops.pop(op_uuid, None)
                self._cancelled.discard(op_uuid)
            _remove(dest)


def _remove(path: Path) -> None:
    from contree_shell.sandbox.store import force_rmtree

    if path.exists():
        try:
            force_rmtree(path)
        except OSError:
            shutil.rmtree(path, ignore_errors=True)
