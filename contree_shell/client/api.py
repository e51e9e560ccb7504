"""The Contree API v1 client (sync, httpx): requests, bounded retries, SSE follow with resume."""

from __future__ import annotations

import hashlib
import logging
import platform
import re
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx

from contree_shell import __version__
from contree_shell.client.errors import (
    ApiError,
    ConnectionFailed,
    ContreeError,
    NotFound,
    StreamError,
    api_error,
    one_line,
)
from contree_shell.client.retry import RetryPolicy, parse_retry_after
from contree_shell.client.sse import SseParser, event_from_frame
from contree_shell.client.streams import stdin_repr
from contree_shell.config import ConfigError, Profile, require_credentials

__all__ = ["TERMINAL_STATUSES", "ContreeClient", "is_uuid", "user_agent"]

log = logging.getLogger(__name__)

TERMINAL_STATUSES = frozenset({"SUCCESS", "FAILED", "CANCELLED"})
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"})
_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Errors raised before any byte of the request left this machine: always safe to retry.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)
_ONE_ATTEMPT = RetryPolicy(max_attempts=1)

Content = bytes | Callable[[], Iterable[bytes]] | None


def is_uuid(value: str) -> bool:
    """True if `value` looks like a canonical UUID."""
    return bool(_UUID_RE.match(value))


def user_agent() -> str:
    """`contree-shell/<ver> httpx/<ver> Python/<ver>`."""
    return f"contree-shell/{__version__} httpx/{httpx.__version__} Python/{platform.python_version()}"


class _StreamBroken(Exception):
    """The SSE stream ended abnormally (an `sse_error` frame)."""


def _endpoint(
    profile: Profile, transport: httpx.BaseTransport | None
) -> tuple[str, httpx.BaseTransport | None, bool]:
    """(base_url, transport, trust_env) for a profile URL."""
    url = profile.url.strip()
    if url.startswith("unix://"):
        sock = url[len("unix://"):]
        if not sock.startswith("/"):
            raise ConfigError(
                f"Invalid URL '{url}' for profile '{profile.name}': unix:// needs an absolute path."
            )
        # Env proxies must never capture requests meant for a local socket; and a unix
        # socket carries no TLS, so no certificate store is loaded (tens of ms per start).
        return "http://contree/v1", transport or httpx.HTTPTransport(uds=sock, verify=False), False
    if url.startswith(("https://", "http://")):
        return url.rstrip("/") + "/v1", transport, transport is None
    raise ConfigError(
        f"Invalid URL '{url}' for profile '{profile.name}' "
        "(expected https://…, http://… or unix:///path)."
    )


class ContreeClient:
    """A Contree API v1 client for one profile.

    Buffered requests are retried on connection errors and 429/5xx with a bounded
    ladder; a request with side effects (spawn, stdin, import, signal) is replayed only
    when it certainly did not reach the server.
    """

    def __init__(
        self,
        profile: Profile,
        *,
        timeout: float = 300.0,
        transport: httpx.BaseTransport | None = None,
        retry: RetryPolicy | None = None,
        sse_read_timeout: float = 90.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.profile = profile
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        # A silent SSE stream is a dead one: the server sends keep-alives every 15 s.
        self.sse_read_timeout = sse_read_timeout
        self._sleep = sleep
        base_url, real_transport, trust_env = _endpoint(profile, transport)
        headers = {"User-Agent": user_agent(), "Accept": "application/json"}
        if profile.token:
            headers["Authorization"] = f"Bearer {profile.token}"
        if profile.project:
            headers["Project"] = profile.project
        self._http = httpx.Client(
            base_url=base_url,
            transport=real_transport,
            headers=headers,
            timeout=timeout,
            follow_redirects=False,
            trust_env=trust_env,
        )

    @classmethod
    def for_profile(cls, profile: Profile, **kwargs: Any) -> ContreeClient:
        """A client for `profile`, checking credentials and starting the local server if needed."""
        from contree_shell.client.local import ensure_local_server

        require_credentials(profile)
        ensure_local_server(profile)
        return cls(profile, **kwargs)

    @property
    def url(self) -> str:
        """The profile URL this client talks to."""
        return self.profile.url

    def close(self) -> None:
        """Close pooled connections."""
        self._http.close()

    def __enter__(self) -> ContreeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ---------------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        content: Content = None,
        headers: dict[str, str] | None = None,
        replayable: bool | None = None,
        stream: bool = False,
        timeout: Any = httpx.USE_CLIENT_DEFAULT,
        retry: RetryPolicy | None = None,
    ) -> httpx.Response:
        """Send one request with the retry policy; raise ApiError for HTTP >= 400.

        Redirects are returned, not followed. With `stream=True` the caller must close
        the response.
        """
        policy = retry or self.retry
        if replayable is None:
            replayable = method in _IDEMPOTENT
        attempt = 0
        while True:
            attempt += 1
            body = content() if callable(content) else content
            request = self._http.build_request(
                method, path, params=params, json=json, content=body, headers=headers,
                timeout=timeout,
            )
            try:
                response = self._http.send(request, stream=stream)
            except httpx.RequestError as exc:
                not_sent = isinstance(exc, _NOT_SENT)
                delay = policy.delay(attempt) if (not_sent or replayable) else None
                if delay is None:
                    raise self._connection_failed(exc, attempt, sent=not not_sent) from exc
                log.info("network error (%s), retrying in %ss", one_line(exc), delay)
                self._sleep(delay)
                continue
            status = response.status_code
            if status < 400:
                return response
            try:
                raw = response.read()
            except httpx.RequestError:
                raw = b""
            finally:
                response.close()
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            error = api_error(status, raw, retry_after=retry_after)
            if policy.status_retryable(status, replayable=replayable):
                delay = policy.delay(attempt, retry_after)
                if delay is not None:
                    log.info("server answered %s, retrying in %ss", status, delay)
                    self._sleep(delay)
                    continue
                if attempt > 1:
                    error.message = f"{error.message} (gave up after {attempt} attempts)"
                    error.args = (error.message,)
            raise error

    def _connection_failed(
        self, exc: httpx.RequestError, attempts: int, *, sent: bool
    ) -> ConnectionFailed:
        reason = one_line(exc) or type(exc).__name__
        where = "the local server" if self.profile.is_local else "the server"
        if sent:
            return ConnectionFailed(
                f"Connection to {where} at {self.url} was lost ({reason}); "
                "the request may or may not have been processed."
            )
        suffix = f" (gave up after {attempts} attempts)" if attempts > 1 else ""
        return ConnectionFailed(f"Cannot connect to {where} at {self.url}: {reason}{suffix}")

    def _json(self, response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise ContreeError(
                f"Invalid response from the server for {response.request.url.path}: "
                f"expected JSON (HTTP {response.status_code})"
            ) from exc

    def _get_json(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return self._json(self._send("GET", path, params=params))

    # -- images ------------------------------------------------------------------------

    def list_images(
        self,
        *,
        tagged: bool | None = None,
        tag: str | None = None,
        uuid: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """One page of `GET /v1/images` (one row per image and tag)."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if tagged:
            params["tagged"] = "1"
        for key, value in (("tag", tag), ("uuid", uuid), ("since", since), ("until", until)):
            if value is not None:
                params[key] = value
        body = self._get_json("/images", params)
        return list(body.get("images") or []) if isinstance(body, dict) else []

    def iter_images(self, *, page_size: int = 1000, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every image matching `filters`, paging until a short page."""
        offset = 0
        while True:
            page = self.list_images(limit=page_size, offset=offset, **filters)
            yield from page
            if len(page) < page_size:
                return
            offset += len(page)

    def resolve_image(self, ref: str) -> str:
        """An image UUID for `ref`: a UUID passes through; `tag:X` or bare `X` is looked up."""
        ref = ref.strip()
        if is_uuid(ref):
            return ref
        tag = ref[len("tag:"):] if ref.startswith("tag:") else ref
        if not tag:
            raise ContreeError("Empty image reference.")
        try:
            response = self._send("GET", "/inspect/", params={"tag": tag})
        except NotFound as exc:
            raise NotFound(404, f"image tag '{tag}' not found") from exc
        if response.status_code in _REDIRECTS:
            location = response.headers.get("location", "")
            candidate = location.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
            if is_uuid(candidate):
                return candidate
            raise ContreeError(f"Unexpected redirect while resolving tag '{tag}': {location!r}")
        body = self._json(response)
        if isinstance(body, dict) and is_uuid(str(body.get("uuid", ""))):
            return str(body["uuid"])
        raise ContreeError(f"Unexpected answer while resolving tag '{tag}'.")

    def get_image(self, uuid: str) -> dict[str, Any]:
        """`GET /v1/inspect/{uuid}/`: the image record."""
        return dict(self._get_json(f"/inspect/{uuid}/"))

    def tag_image(self, uuid: str, tag: str) -> dict[str, Any]:
        """Add or move `tag` to image `uuid`."""
        response = self._send("PATCH", f"/images/{uuid}/tag", json={"tag": tag})
        return dict(self._json(response)) if response.content else {}

    def untag_image(self, uuid: str, tag: str | None = None) -> None:
        """Remove `tag` from the image, or every tag when `tag` is None."""
        params = {"tag": tag} if tag is not None else None
        self._send("DELETE", f"/images/{uuid}/tag", params=params)

    def import_image(
        self,
        url: str,
        tag: str | None = None,
        *,
        username: str | None = None,
        password: str | None = None,
        timeout: int | None = None,
    ) -> str:
        """Start an image import; return the operation UUID."""
        registry: dict[str, Any] = {"url": url}
        if username is not None or password is not None:
            registry["credentials"] = {"username": username or "", "password": password or ""}
        payload: dict[str, Any] = {"registry": registry}
        if tag is not None:
            payload["tag"] = tag
        if timeout is not None:
            payload["timeout"] = timeout
        response = self._send("POST", "/images/import", json=payload, replayable=False)
        return str(self._json(response)["uuid"])

    # -- inspect -----------------------------------------------------------------------

    def list_dir(self, image: str, path: str) -> dict[str, Any]:
        """`DirectoryList` of `path` in `image` (`{path, files: [FileItem]}`)."""
        return dict(self._get_json(f"/inspect/{image}/list", {"path": path}))

    def list_dir_text(self, image: str, path: str) -> str:
        """The server's `ls -l`-like text listing of `path`."""
        response = self._send("GET", f"/inspect/{image}/list", params={"path": path, "text": "1"})
        return response.text

    def download(self, image: str, path: str) -> bytes:
        """The bytes of regular file `path` in `image` (422 for a directory)."""
        return self._send("GET", f"/inspect/{image}/download", params={"path": path}).content

    def iter_download(
        self, image: str, path: str, *, chunk_size: int = 65536
    ) -> Iterator[bytes]:
        """Stream regular file `path` of `image` in chunks."""
        yield from self._iter_body(f"/inspect/{image}/download", {"path": path}, chunk_size)

    def iter_archive(
        self, image: str, path: str, *, chunk_size: int = 65536
    ) -> Iterator[bytes]:
        """Stream a tar archive of `path` (file or directory) in `image`."""
        yield from self._iter_body(f"/inspect/{image}/archive", {"path": path}, chunk_size)

    def _iter_body(
        self, path: str, params: dict[str, Any], chunk_size: int
    ) -> Iterator[bytes]:
        response = self._send("GET", path, params=params, stream=True)
        try:
            yield from response.iter_bytes(chunk_size)
        except httpx.RequestError as exc:
            raise self._connection_failed(exc, 1, sent=True) from exc
        finally:
            response.close()

    def grep(
        self,
        image: str,
        patterns: list[str],
        *,
        paths: list[str] | None = None,
        globs: list[str] | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """`GrepResult` for `patterns` under `paths` (options: max_count, case, before, …)."""
        params: dict[str, Any] = {"pattern": patterns}
        if paths:
            params["path"] = paths
        if globs:
            params["glob"] = globs
        params.update({k: v for k, v in options.items() if v is not None})
        return dict(self._get_json(f"/inspect/{image}/grep", params))

    # -- files -------------------------------------------------------------------------

    def get_file(self, sha256: str) -> dict[str, Any] | None:
        """The uploaded `File` with this content hash, or None if this namespace has none."""
        try:
            return dict(self._get_json(f"/files/{sha256}"))
        except NotFound:
            return None

    def list_files(
        self, *, limit: int = 100, offset: int = 0, since: str | None = None,
        until: str | None = None,
    ) -> list[dict[str, Any]]:
        """One page of uploaded files (`since`/`until`: ISO times or API intervals)."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if since is not None:
            params["since"] = since
        if until is not None:
            params["until"] = until
        body = self._get_json("/files", params)
        return list(body.get("files") or []) if isinstance(body, dict) else []

    def upload_file(self, source: Path | bytes) -> dict[str, Any]:
        """Upload bytes or a local file (`POST /v1/files`); returns `{uuid, sha256, size}`."""
        content: Content
        if isinstance(source, bytes):
            content = source
        else:
            path = source

            def content() -> Iterable[bytes]:  # re-opened for every attempt
                with path.open("rb") as fh:
                    while chunk := fh.read(1 << 20):
                        yield chunk

        response = self._send(
            "POST", "/files", content=content, replayable=True,  # content-addressed
            headers={"Content-Type": "application/octet-stream"},
        )
        return dict(self._json(response))

    def ensure_file(self, source: Path | bytes) -> str:
        """The uploaded file UUID for this content, uploading only when the server lacks it."""
        if isinstance(source, bytes):
            digest = hashlib.sha256(source).hexdigest()
        else:
            with source.open("rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
        existing = self.get_file(digest)
        if existing is not None:
            return str(existing["uuid"])
        return str(self.upload_file(source)["uuid"])

    # -- operations --------------------------------------------------------------------

    def spawn(self, payload: dict[str, Any]) -> dict[str, Any]:
        """`POST /v1/instances`; returns the spawn response (its `uuid` is the operation).

        Never replayed once the request may have reached the server, so a lost response
        cannot start the command twice.
        """
        return dict(self._json(self._send("POST", "/instances", json=payload, replayable=False)))

    def get_operation(self, op: str) -> dict[str, Any]:
        """The full `OperationResponse`."""
        return dict(self._get_json(f"/operations/{op}"))

    def list_operations(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """One page of `GET /v1/operations` (newest first)."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        for key, value in (("status", status), ("kind", kind), ("since", since), ("until", until)):
            if value is not None:
                params[key] = value
        body = self._get_json("/operations", params)
        return list(body) if isinstance(body, list) else []

    def cancel(self, op: str) -> None:
        """Cancel an operation (Conflict if it already ended)."""
        self._send("DELETE", f"/operations/{op}")

    def signal(self, op: str, spid: int, signal: str) -> None:
        """Send `signal` (name or number) to process `spid`'s group; not replayed."""
        self._send(
            "DELETE", f"/operations/{op}/subprocesses/{spid}",
            params={"signal": signal}, replayable=False,
        )

    def write_stdin(self, op: str, spid: int, data: bytes, close: bool) -> None:
        """Write `data` to process `spid`'s stdin (and EOF it when `close`); not replayed."""
        self._send(
            "POST", f"/operations/{op}/subprocesses/{spid}/stdin",
            json=stdin_repr(data, close=close), replayable=False,
        )

    def whoami(self) -> dict[str, Any]:
        """`GET /v1/whoami`: token, permissions, limits."""
        return dict(self._get_json("/whoami"))

    def is_terminal(self, op: str) -> bool:
        """Whether the operation has ended (SUCCESS, FAILED or CANCELLED)."""
        return self.get_operation(op).get("status") in TERMINAL_STATUSES

    # -- events ------------------------------------------------------------------------

    def iter_events(
        self,
        op: str,
        *,
        follow: bool = True,
        since: int | None = None,
        spid: int | None = None,
    ) -> Generator[dict[str, Any], None, None]:
        """Yield the operation's events (`OperationEvent` dicts) in order, each exactly once.

        Ends after the `completion` event. A dropped stream (network error, `sse_error`
        frame, 410/425/429/5xx) is resumed with `Last-Event-Id`; attempts without any new
        event are bounded by the retry policy. A stream that ends cleanly without
        `completion` is checked against the operation: if it ended, the retained log is
        read once more without follow; otherwise the stream is reopened. With
        `follow=False` the events recorded so far are yielded and the iterator ends.
        """
        cursor = since
        failures = 0
        terminal_pass = False
        stream_timeout = httpx.Timeout(self.timeout, read=self.sse_read_timeout)
        while True:
            params: dict[str, Any] = {}
            if follow and not terminal_pass:
                params["follow"] = "1"
            if spid is not None:
                params["spid"] = spid
            headers = {"Accept": "text/event-stream"}
            if cursor is not None:
                headers["Last-Event-Id"] = str(cursor)
            retry_after: float | None = None
            try:
                response = self._send(
                    "GET", f"/operations/{op}/events", params=params, headers=headers,
                    stream=True, timeout=stream_timeout, retry=_ONE_ATTEMPT,
                )
                try:
                    parser = SseParser()
                    for line in response.iter_lines():
                        frame = parser.feed(line)
                        if frame is None:
                            continue
                        if frame.event == "sse_error":
                            raise _StreamBroken(frame.data or "server reported a stream error")
                        event = event_from_frame(frame)
                        if event is None or (cursor is not None and event["id"] <= cursor):
                            continue  # never yield an event twice, whatever the server sends
                        cursor = event["id"]
                        failures = 0
                        yield event
                        if event.get("type") == "completion":
                            return
                finally:
                    response.close()
            except ApiError as exc:
                if not RetryPolicy.status_retryable(exc.status, replayable=True) and exc.status != 410:
                    raise
                reason, retry_after = exc.message, exc.retry_after
            except (ConnectionFailed, _StreamBroken, httpx.RequestError) as exc:
                reason = one_line(getattr(exc, "message", None) or exc) or type(exc).__name__
            else:
                if not follow:
                    return
                if terminal_pass:
                    if spid is not None or since is not None:
                        # A spid-filtered log never carries `completion`; a resumed one
                        # may have had it before `since`.
                        return
                    raise StreamError(f"The event log of operation {op} ended without completion.")
                try:
                    terminal_pass = self.is_terminal(op)
                except NotFound:
                    raise
                except ContreeError as exc:
                    reason = exc.message
                else:
                    if terminal_pass:
                        continue
                    reason = "the stream ended before the operation did"
            failures += 1
            delay = self.retry.delay(failures, retry_after)
            if delay is None:
                raise ConnectionFailed(
                    f"Lost the event stream of operation {op}: {reason} "
                    f"(gave up after {failures} attempts)"
                )
            log.info("event stream of %s broken (last id %s): %s", op, cursor, reason)
            self._sleep(delay)
