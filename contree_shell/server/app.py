"""The local Contree API v1 as a Starlette app: routes, response shapes, auth.

Handlers translate HTTP to calls on the engine objects held by `ServerState` and back;
the shapes follow the official spec and what the official clients parse strictly.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import re
import uuid as uuidlib
import weakref
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from contree_shell import __version__
from contree_shell.sandbox.files import FileNotFound, FileStore
from contree_shell.sandbox.imports import ImportManager
from contree_shell.sandbox.instances import (
    TAG_RE,
    InstanceManager,
    RequestError,
    decode_stream,
    parse_signal,
)
from contree_shell.sandbox.operations import (
    KINDS,
    STATUSES,
    TERMINAL,
    Operation,
    OperationNotFound,
    OperationsDB,
    iso,
)
from contree_shell.server.errors import EXCEPTION_HANDLERS, ApiError, error_response
from contree_shell.server.sse import event_stream
from contree_shell.server.validation import (
    flag,
    int_param,
    page,
    require_sha256,
    require_uuid,
    time_param,
)

log = logging.getLogger("contree.server")

_TAG_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.:/-]*$")
_READ_CHUNK = 256 * 1024
PERMISSIONS = ("import", "spawn", "spawn_disposable", "list", "cancel", "set_image_tag")


@dataclass
class ServerState:
    """Everything the routes need; built once by the daemon."""

    home: Path
    store: Any
    ops: OperationsDB
    files: FileStore
    instances: InstanceManager
    imports: ImportManager
    token: str | None = None  # required on TCP connections when set
    token_uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))

    def close(self) -> None:
        self.instances.shutdown("server stopped")
        self.imports.shutdown("server stopped")
        self.ops.close()
        self.files.close()
        self.store.close()


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.contree
    return state


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        raise ApiError(400, "request body must be JSON")
    import json

    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "request body is not valid JSON") from None


# --------------------------------------------------------------------------- images


def image_json(rec: Any, tag: str | None) -> dict[str, Any]:
    created = rec.created_at
    return {
        "uuid": rec.uuid,
        "tag": tag,
        "created_at": iso(created) if isinstance(created, datetime) else str(created),
        "operation_uuid": rec.operation_uuid,
    }


def _get_image(state: ServerState, image_uuid: str) -> Any:
    from contree_shell.sandbox.store import ImageNotFound

    require_uuid(image_uuid, "image uuid")
    try:
        return state.store.get(image_uuid.lower())
    except ImageNotFound:
        raise ApiError(404, f"image not found: {image_uuid}") from None


async def list_images(request: Request) -> Response:
    state = _state(request)
    q = request.query_params
    limit, offset = page(q)
    tag_prefix = q.get("tag") or None
    if tag_prefix is not None and not _TAG_PREFIX_RE.match(tag_prefix):
        raise ApiError(400, f"invalid tag prefix: {tag_prefix!r}")
    uuid_filter = q.get("uuid") or None
    if uuid_filter is not None:
        uuid_filter = require_uuid(uuid_filter, "uuid filter")
    rows = await run_in_threadpool(
        state.store.list,
        tagged=flag(q, "tagged") or tag_prefix is not None,
        tag_prefix=tag_prefix,
        uuid=uuid_filter,
        since=time_param(q, "since"),
        until=time_param(q, "until"),
        limit=limit,
        offset=offset,
    )
    return JSONResponse({"images": [image_json(rec, tag) for rec, tag in rows]})


async def tag_image(request: Request) -> Response:
    from contree_shell.sandbox.store import ImageNotFound, InvalidTag

    state = _state(request)
    image_uuid = request.path_params["uuid"]
    _get_image(state, image_uuid)
    body = await _json_body(request)
    tag = body.get("tag") if isinstance(body, dict) else None
    if not isinstance(tag, str) or not TAG_RE.match(tag):
        raise ApiError(400, f"invalid tag: {tag!r}")
    try:
        state.store.set_tag(image_uuid.lower(), tag)
    except InvalidTag as exc:
        raise ApiError(400, f"invalid tag: {exc}") from None
    except ImageNotFound:
        raise ApiError(404, f"image not found: {image_uuid}") from None
    return JSONResponse(image_json(state.store.get(image_uuid.lower()), tag))


async def untag_image(request: Request) -> Response:
    from contree_shell.sandbox.store import ImageNotFound, TagNotFound

    state = _state(request)
    image_uuid = request.path_params["uuid"]
    _get_image(state, image_uuid)
    tag = request.query_params.get("tag") or None
    try:
        state.store.remove_tag(image_uuid.lower(), tag)
    except ImageNotFound:
        raise ApiError(404, f"image not found: {image_uuid}") from None
    except TagNotFound:
        raise ApiError(404, f"tag {tag!r} is not on image {image_uuid}") from None
    return Response(status_code=204)


async def import_image(request: Request) -> Response:
    state = _state(request)
    body = await _json_body(request)
    op_uuid = state.imports.start(body)
    return JSONResponse(
        {"uuid": op_uuid}, status_code=201, headers={"Location": f"/v1/operations/{op_uuid}"}
    )


# --------------------------------------------------------------------------- inspect


async def inspect_root_redirect(request: Request) -> Response:
    return Response(status_code=307, headers={"Location": "/v1/inspect/"})


async def inspect_by_tag(request: Request) -> Response:
    from contree_shell.sandbox.store import TagNotFound

    state = _state(request)
    tag = request.query_params.get("tag")
    if not tag:
        raise ApiError(400, "query parameter 'tag' is required")
    if tag.startswith("tag:"):
        tag = tag[4:]
    if not TAG_RE.match(tag):
        raise ApiError(400, f"invalid tag: {tag!r}")
    try:
        image_uuid = state.store.resolve_tag(tag)
    except TagNotFound:
        raise ApiError(404, f"tag not found: {tag}") from None
    return Response(status_code=302, headers={"Location": f"/v1/inspect/{image_uuid}/"})


async def inspect_image_redirect(request: Request) -> Response:
    image_uuid = quote(request.path_params["uuid"], safe="")  # any text fits the header
    return Response(status_code=307, headers={"Location": f"/v1/inspect/{image_uuid}/"})


async def get_image(request: Request) -> Response:
    state = _state(request)
    rec = _get_image(state, request.path_params["uuid"])
    tags = list(rec.tags or [])
    return JSONResponse(image_json(rec, tags[0] if tags else None))


@contextlib.contextmanager
def _view(state: ServerState, image_uuid: str) -> Iterator[Any]:
    """An ImageView whose layers stay on disk (pinned against squash/gc) while used.

    An opened file stays readable after that: the descriptor holds its inode.
    """
    from contree_shell.sandbox.inspect import ImageView

    rec = _get_image(state, image_uuid)
    with state.store.pinned_layers(rec.uuid) as layers:
        yield ImageView(list(layers))


def _path_param(request: Request) -> str:
    path = request.query_params.get("path")
    if path is None or path == "":
        raise ApiError(400, "query parameter 'path' is required")
    if "\0" in path:
        raise ApiError(400, "invalid path")
    return path


def _names(view: Any, path: str) -> dict[int, str]:
    try:
        text = view.read(path).decode("utf-8", "replace")
    except Exception:
        return {}
    out: dict[int, str] = {}
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) >= 3 and parts[2].isdigit():
            out.setdefault(int(parts[2]), parts[0])
    return out


def _file_item(st: Any, users: dict[int, str], groups: dict[int, str]) -> dict[str, Any]:
    return {
        "path": st.name,
        "size": int(st.size),
        "owner": users.get(st.uid, str(st.uid)),
        "group": groups.get(st.gid, str(st.gid)),
        "uid": int(st.uid),
        "gid": int(st.gid),
        "mode": int(st.mode),
        "mtime": int(st.mtime),
        "nlink": int(st.nlink),
        "is_dir": bool(st.is_dir),
        "is_regular": bool(st.is_regular),
        "is_symlink": bool(st.is_symlink),
        "is_socket": bool(st.is_socket),
        "is_fifo": bool(st.is_fifo),
        "symlink_to": st.symlink_to or "",
    }


def _list_dir(state: ServerState, image_uuid: str, path: str, text: bool) -> Response:
    from contree_shell.sandbox.inspect import NotADirectory, PathNotFound, format_ls

    with _view(state, image_uuid) as view:
        try:
            dirpath, entries = view.listdir(path)
        except PathNotFound:
            raise ApiError(404, f"no such file or directory: {path}") from None
        except (NotADirectory, NotADirectoryError):
            raise ApiError(422, f"not a directory: {path}") from None
        if text:
            body = format_ls(dirpath, entries)
            return PlainTextResponse(body if body.endswith("\n") else body + "\n")
        users = _names(view, "/etc/passwd")
        groups = _names(view, "/etc/group")
    return JSONResponse({"path": dirpath, "files": [_file_item(e, users, groups) for e in entries]})


async def list_dir(request: Request) -> Response:
    state = _state(request)
    path = _path_param(request)
    return await run_in_threadpool(
        _list_dir, state, request.path_params["uuid"], path, flag(request.query_params, "text")
    )


def _open_file(state: ServerState, image_uuid: str, path: str) -> tuple[Any, int]:
    from contree_shell.sandbox.inspect import NotAFile, PathNotFound

    try:
        with _view(state, image_uuid) as view:
            st = view.stat(path, follow=True)
            if not st.is_regular:
                raise ApiError(422, f"not a regular file: {path}")
            return view.open(path), int(st.size)
    except PathNotFound:
        raise ApiError(404, f"no such file: {path}") from None
    except (NotAFile, IsADirectoryError):
        raise ApiError(422, f"not a regular file: {path}") from None


def _iter_file(fh: Any) -> Iterator[bytes]:
    with fh:
        while True:
            chunk = fh.read(_READ_CHUNK)
            if not chunk:
                return
            yield chunk


async def download(request: Request) -> Response:
    state = _state(request)
    path = _path_param(request)
    fh, size = await run_in_threadpool(_open_file, state, request.path_params["uuid"], path)
    media = (
        "text/plain; charset=utf-8"
        if flag(request.query_params, "text")
        else "application/octet-stream"
    )
    headers = {"Content-Length": str(size)}
    if request.method == "HEAD":
        fh.close()
        return Response(status_code=200, headers=headers, media_type=media)
    return StreamingResponse(_iter_file(fh), media_type=media, headers=headers)


_GREP_CASES = ("sensitive", "insensitive", "smart")
_GREP_MAX_ITEMS = 16


def _accepts_gzip(request: Request) -> bool:
    for part in request.headers.get("accept-encoding", "").split(","):
        name, _, params = part.strip().partition(";")
        if name.strip().lower() in ("gzip", "x-gzip"):
            q = params.strip()
            return not (q.startswith("q=") and q[2:].strip() in ("0", "0.0", "0.00", "0.000"))
    return False


def _archive_checked(view: Any, path: str) -> str:
    """The normalized path to archive; ApiError 404 (missing) or 422 (not archivable)."""
    from contree_shell.sandbox import archive
    from contree_shell.sandbox.inspect import NotAFile, PathNotFound

    try:
        return str(archive.archive_check(view, path))
    except (PathNotFound, NotADirectoryError, FileNotFoundError):
        raise ApiError(404, f"no such file or directory: {path}") from None
    except (NotAFile, IsADirectoryError):
        raise ApiError(422, f"not a regular file or directory: {path}") from None


def _open_archive(state: ServerState, image_uuid: str, path: str, gz: bool) -> Iterator[bytes]:
    """Validate, then a chunk iterator over the tar; the layers stay pinned until the
    iterator is exhausted or closed."""
    from contree_shell.sandbox import archive

    stack = contextlib.ExitStack()
    view = stack.enter_context(_view(state, image_uuid))
    try:
        normalized = _archive_checked(view, path)
        chunks = archive.iter_archive(view, normalized, gzip=gz)
    except BaseException:
        stack.close()
        raise

    return _Pinned(chunks, stack)


class _Pinned:
    """A chunk iterator that releases its resources when exhausted or closed, even if
    it was never started (a client that disconnects before the first chunk)."""

    def __init__(self, chunks: Iterator[bytes], stack: contextlib.ExitStack) -> None:
        self._chunks = chunks
        self._stack = stack
        weakref.finalize(self, stack.close)  # never-started responses release too

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._chunks)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
        self._stack.close()


def _check_archive(state: ServerState, image_uuid: str, path: str) -> None:
    with _view(state, image_uuid) as view:
        _archive_checked(view, path)


async def archive_image(request: Request) -> Response:
    """A PAX tar of a file or directory of an image, gzip on the wire when accepted."""
    from contree_shell.sandbox.archive import archive_filename

    state = _state(request)
    path = _path_param(request)
    gz = _accepts_gzip(request)
    headers = {
        "Content-Disposition": f'attachment; filename="{archive_filename(path)}"',
        "Vary": "Accept-Encoding",
    }
    if gz:
        headers["Content-Encoding"] = "gzip"
    if request.method == "HEAD":
        await run_in_threadpool(_check_archive, state, request.path_params["uuid"], path)
        return Response(status_code=200, headers=headers, media_type="application/x-tar")
    chunks = await run_in_threadpool(_open_archive, state, request.path_params["uuid"], path, gz)
    return StreamingResponse(
        iterate_in_thread(chunks), media_type="application/x-tar", headers=headers
    )


async def iterate_in_thread(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """Drive a blocking chunk iterator from the worker pool, one chunk at a time."""
    sentinel = object()
    try:
        while True:
            chunk = await run_in_threadpool(next, chunks, sentinel)
            if chunk is sentinel:
                return
            yield chunk  # type: ignore[misc]
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            await run_in_threadpool(close)


def grep_params(q: Any) -> dict[str, Any]:
    """Validated grep query parameters (§2.5, §5.3) as keyword arguments for grep()."""
    patterns = q.getlist("pattern")
    if not patterns or any(p == "" for p in patterns):
        raise ApiError(400, "query parameter 'pattern' is required (non-empty)")
    if len(patterns) > _GREP_MAX_ITEMS:
        raise ApiError(400, f"at most {_GREP_MAX_ITEMS} 'pattern' values")
    if any(len(p) > 1024 for p in patterns):
        raise ApiError(400, "a 'pattern' is longer than 1024 characters")
    paths = [p for p in q.getlist("path") if p != ""] or ["/"]
    if len(paths) > _GREP_MAX_ITEMS:
        raise ApiError(400, f"at most {_GREP_MAX_ITEMS} 'path' values")
    if any("\0" in p for p in paths + patterns):
        raise ApiError(400, "parameters must not contain NUL")
    globs = [g for g in q.getlist("glob") if g != ""]
    case = q.get("case") or "sensitive"
    if case not in _GREP_CASES:
        raise ApiError(400, f"'case' must be one of {', '.join(_GREP_CASES)}, got {case!r}")
    return {
        "patterns": patterns,
        "paths": paths,
        "globs": globs,
        "case": case,
        "before": int_param(q, "before", 0, minimum=0, maximum=50),
        "after": int_param(q, "after", 0, minimum=0, maximum=50),
        "max_count": int_param(q, "max_count", None, minimum=1, maximum=10000),
        "max_total": int_param(q, "max_total", 1000, minimum=1, maximum=10000),
    }


def _grep(state: ServerState, image_uuid: str, params: dict[str, Any]) -> dict[str, Any]:
    from contree_shell.sandbox import grep as grep_mod
    from contree_shell.sandbox.inspect import PathNotFound

    with _view(state, image_uuid) as view:
        try:
            result: dict[str, Any] = grep_mod.grep(view, **params)
        except PathNotFound as exc:
            raise ApiError(404, f"no such file or directory: {exc.filename or exc}") from None
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
    return result


async def grep_image(request: Request) -> Response:
    state = _state(request)
    params = grep_params(request.query_params)
    _get_image(state, request.path_params["uuid"])
    result = await run_in_threadpool(_grep, state, request.path_params["uuid"], params)
    return JSONResponse(result)


# --------------------------------------------------------------------------- files


async def upload_file(request: Request) -> Response:
    state = _state(request)
    upload = state.files.begin()
    try:
        async for chunk in request.stream():
            if chunk:
                upload.write(chunk)
        rec = await run_in_threadpool(upload.finish)
    except BaseException:
        upload.abort()
        raise
    return JSONResponse({"uuid": rec.uuid, "sha256": rec.sha256, "size": rec.size}, status_code=201)


async def list_files(request: Request) -> Response:
    state = _state(request)
    q = request.query_params
    limit, offset = page(q)
    recs = state.files.list(
        since=time_param(q, "since"), until=time_param(q, "until"), limit=limit, offset=offset
    )
    return JSONResponse({"files": [r.as_dict() for r in recs]})


async def get_file(request: Request) -> Response:
    state = _state(request)
    sha = require_sha256(request.path_params["sha256"])
    try:
        rec = state.files.by_sha(sha)
    except FileNotFound:
        if request.method == "HEAD":
            return Response(status_code=404)
        raise ApiError(404, f"file not found: {sha}") from None
    if request.method == "HEAD":
        return Response(status_code=200)
    return JSONResponse(rec.as_dict())


# --------------------------------------------------------------------------- operations


def operation_json(op: Operation, *, full: bool) -> dict[str, Any]:
    """OperationSummary, or the full OperationResponse when `full`."""
    out: dict[str, Any] = {
        "uuid": op.uuid,
        "kind": op.kind,
        "status": op.status,
        "error": op.error,
        "created_at": iso(op.created_at),
        "duration": float(op.live_duration()),
        "image_size": op.image_size if op.status == "SUCCESS" else None,
        "consumed_cpu": op.consumed_cpu,
        "consumed_memory": op.consumed_memory,
        "image_uuid": op.image_uuid,
        "result_image_uuid": op.result_image_uuid if op.status == "SUCCESS" else None,
    }
    if full:
        metadata = dict(op.metadata)
        if op.kind == "instance":
            metadata.setdefault("result", None)
        out["metadata"] = metadata
        result = op.result if isinstance(op.result, dict) else {}
        out["result"] = {"image": result.get("image"), "tag": result.get("tag")}
    return out


def _get_op(state: ServerState, op_uuid: str) -> Operation:
    require_uuid(op_uuid, "operation id")
    try:
        return state.ops.get(op_uuid.lower())
    except OperationNotFound:
        raise ApiError(404, f"operation not found: {op_uuid}") from None


async def spawn_instance(request: Request) -> Response:
    state = _state(request)
    body = await _json_body(request)
    echo = state.instances.spawn(body)
    return JSONResponse(
        echo, status_code=201, headers={"Location": f"/v1/operations/{echo['uuid']}"}
    )


async def list_operations(request: Request) -> Response:
    state = _state(request)
    q = request.query_params
    limit, offset = page(q)
    status = q.get("status") or None
    if status is not None:
        status = status.upper()
        if status not in STATUSES:
            raise ApiError(
                400, f"invalid status {q.get('status')!r} (one of {', '.join(sorted(STATUSES))})"
            )
    kind = q.get("kind") or None
    if kind is not None and kind not in KINDS:
        raise ApiError(400, f"invalid kind {kind!r} (image_import or instance)")
    ops = state.ops.list(
        status=status,
        kind=kind,
        since=time_param(q, "since"),
        until=time_param(q, "until"),
        limit=limit,
        offset=offset,
    )
    return JSONResponse([operation_json(op, full=False) for op in ops])


async def get_operation(request: Request) -> Response:
    state = _state(request)
    op = _get_op(state, request.path_params["op"])
    headers = None if op.status in TERMINAL else {"Retry-After": "1"}
    body = operation_json(op, full=True)
    if (
        op.kind == "instance"
        and op.status == "EXECUTING"
        and flag(request.query_params, "inflight")
    ):
        body["metadata"]["result"] = state.instances.partial_result(op.uuid)
    return JSONResponse(body, headers=headers)


async def get_subprocess(request: Request) -> Response:
    """InstanceResult of one process: spid 1 from the run, spid >= 2 from its events."""
    state = _state(request)
    op = _get_op(state, request.path_params["op"])
    spid = _spid(request)
    if op.kind != "instance" or op.status == "CANCELLED":
        raise ApiError(404, f"no process with spid {spid} in operation {op.uuid}")
    if spid >= 2:
        sub = await run_in_threadpool(state.instances.subprocess_result, op.uuid, spid)
        if sub is None:
            raise ApiError(404, f"no process with spid {spid} in operation {op.uuid}")
        return JSONResponse(sub)
    result = (
        op.metadata.get("result")
        if op.status in TERMINAL
        else state.instances.partial_result(op.uuid)
    )
    if result is None:
        if op.status in TERMINAL:
            raise ApiError(404, f"no process with spid {spid} in operation {op.uuid}")
        raise ApiError(425, "the process has not started yet", {"Retry-After": "1"})
    return JSONResponse(result)


async def cancel_operation(request: Request) -> Response:
    state = _state(request)
    op = _get_op(state, request.path_params["op"])
    if op.status in TERMINAL:
        raise ApiError(409, f"operation is already {op.status}")
    if op.kind == "instance":
        done = state.instances.cancel(op.uuid, "cancelled")
        if not done:  # not a live run of this process: just close the record
            done = state.ops.finish(op.uuid, "CANCELLED", error="cancelled")
    else:
        done = state.imports.cancel(op.uuid, "cancelled")
    if not done:
        raise ApiError(409, f"operation is already {state.ops.get(op.uuid).status}")
    return JSONResponse(operation_json(state.ops.get(op.uuid), full=False), status_code=202)


async def operation_events(request: Request) -> Response:
    state = _state(request)
    op = _get_op(state, request.path_params["op"])
    q = request.query_params
    spid = int_param(q, "spid", None, minimum=0)
    since = int_param(q, "since", None, minimum=0)
    last = request.headers.get("last-event-id")
    if last is not None and last.strip() != "":
        try:
            since = int(last)
        except ValueError:
            raise ApiError(400, f"Last-Event-Id must be an integer, got {last!r}") from None
        if since < 0:
            raise ApiError(400, "Last-Event-Id must be >= 0")
    stream = event_stream(
        state.ops, op.uuid, after=since, spid=spid, follow=flag(q, "follow"), coalesce=True
    )
    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _spid(request: Request) -> int:
    raw = request.path_params["spid"]
    try:
        spid = int(raw)
    except ValueError:
        raise ApiError(400, f"invalid spid: {raw!r}") from None
    if spid < 1:
        raise ApiError(400, f"invalid spid: {spid} (must be >= 1)")
    return spid


async def exec_subprocess(request: Request) -> Response:
    """Start another process (spid >= 2) in a running instance (see sandbox/nsexec.py)."""
    state = _state(request)
    op = _get_op(state, request.path_params["op"])
    body = await _json_body(request)
    if op.kind != "instance" or op.status in TERMINAL:
        raise ApiError(409, "operation is not a running instance")
    spid = await run_in_threadpool(state.instances.exec, op.uuid, body)
    return JSONResponse(
        {"spid": spid},
        status_code=201,
        headers={"Location": f"/v1/operations/{op.uuid}/subprocesses/{spid}"},
    )


async def signal_process(request: Request) -> Response:
    state = _state(request)
    op = _get_op(state, request.path_params["op"])
    spid = _spid(request)
    try:
        sig = parse_signal(request.query_params.get("signal"))
    except ValueError:
        raise ApiError(400, f"unknown signal: {request.query_params.get('signal')!r}") from None
    if op.kind != "instance":
        raise ApiError(409, "operation is not an instance")
    if op.status in TERMINAL:
        raise ApiError(409, f"the instance is not running (status {op.status})")
    state.instances.signal(op.uuid, spid, sig)
    return Response(status_code=204)


async def write_stdin(request: Request) -> Response:
    state = _state(request)
    op = _get_op(state, request.path_params["op"])
    spid = _spid(request)
    body = await _json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("value", None), str):
        raise ApiError(400, 'body must be {"value": str, "encoding": ascii|base64, "close": bool}')
    encoding = body.get("encoding") or "ascii"
    if encoding not in ("ascii", "base64"):
        raise ApiError(400, "'encoding' must be 'ascii' or 'base64'")
    close = body.get("close", True)
    if close is None:
        close = True
    if not isinstance(close, bool):
        raise ApiError(400, "'close' must be a boolean")
    data = decode_stream(body["value"], encoding)
    if op.kind != "instance":
        raise ApiError(409, "operation is not an instance")
    if op.status in TERMINAL:
        raise ApiError(410, "the instance has finished")
    await run_in_threadpool(state.instances.write_stdin, op.uuid, spid, data, close)
    return Response(status_code=204)


# --------------------------------------------------------------------------- auth


async def whoami(request: Request) -> Response:
    state = _state(request)
    return JSONResponse(
        {
            "token_uuid": state.token_uuid,
            "token_expiration": None,
            "permissions": dict.fromkeys(PERMISSIONS, True),
            "limits": {
                "instance_max_timeout": 3600,
                "instance_max_concurrency": 16,
                "images_import_max_concurrency": 2,
                "images_import_max_timeout": 3600,
            },
            "operations_stat": state.ops.counts(),
            "server": {"name": "contree-shell local server", "version": __version__},
        }
    )


class TokenAuth:
    """Require `Authorization: Bearer <token>` on TCP connections (unix socket: none)."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.token is not None:
            server = scope.get("server")
            if server is not None and server[1] is not None:  # TCP: (host, port)
                header = dict(scope.get("headers") or []).get(b"authorization", b"")
                scheme, _, given = header.decode("latin-1").partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(
                    given.strip().encode(), self.token.encode()
                ):
                    resp = error_response(
                        401, "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"}
                    )
                    await resp(scope, receive, send)
                    return
        await self.app(scope, receive, send)


# --------------------------------------------------------------------------- app


ROUTES = [
    Route("/v1/whoami", whoami, methods=["GET"]),
    Route("/v1/images", list_images, methods=["GET"]),
    Route("/v1/images/import", import_image, methods=["POST"]),
    Route("/v1/images/{uuid}/tag", tag_image, methods=["PATCH"]),
    Route("/v1/images/{uuid}/tag", untag_image, methods=["DELETE"]),
    Route("/v1/files", upload_file, methods=["POST"]),
    Route("/v1/files", list_files, methods=["GET"]),
    Route("/v1/files/{sha256}", get_file, methods=["GET", "HEAD"]),
    Route("/v1/instances", spawn_instance, methods=["POST"]),
    Route("/v1/operations", list_operations, methods=["GET"]),
    Route("/v1/operations/{op}", get_operation, methods=["GET"]),
    Route("/v1/operations/{op}", cancel_operation, methods=["DELETE"]),
    Route("/v1/operations/{op}/events", operation_events, methods=["GET"]),
    Route("/v1/operations/{op}/subprocesses", exec_subprocess, methods=["POST"]),
    Route("/v1/operations/{op}/subprocesses/{spid}", signal_process, methods=["DELETE"]),
    Route("/v1/operations/{op}/subprocesses/{spid}", get_subprocess, methods=["GET"]),
    Route("/v1/operations/{op}/subprocesses/{spid}/stdin", write_stdin, methods=["POST"]),
    Route("/v1/inspect", inspect_root_redirect, methods=["GET"]),
    Route("/v1/inspect/", inspect_by_tag, methods=["GET"]),
    Route("/v1/inspect/{uuid}", inspect_image_redirect, methods=["GET"]),
    Route("/v1/inspect/{uuid}/", get_image, methods=["GET"]),
    Route("/v1/inspect/{uuid}/list", list_dir, methods=["GET"]),
    Route("/v1/inspect/{uuid}/download", download, methods=["GET", "HEAD"]),
    Route("/v1/inspect/{uuid}/archive", archive_image, methods=["GET", "HEAD"]),
    Route("/v1/inspect/{uuid}/grep", grep_image, methods=["GET"]),
]


def create_app(state: ServerState) -> ASGIApp:
    """The ASGI app over `state`; closing happens on lifespan shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(state.close)

    app = Starlette(
        routes=ROUTES,
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        lifespan=lifespan,
    )
    app.state.contree = state
    return TokenAuth(app, state.token)


__all__ = ["RequestError", "ServerState", "create_app", "operation_json"]
