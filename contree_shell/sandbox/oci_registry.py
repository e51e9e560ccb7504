"""A Docker Registry v2 / OCI distribution client (pull only), on httpx.

Covers what an image pull needs: the ``/v2/`` ping, ``WWW-Authenticate`` Bearer token
flow (anonymous or with basic credentials) and plain Basic auth, manifest GETs that
accept indexes and image manifests of both OCI and Docker flavours, and blobs streamed to
disk with digest verification (redirects to blob storage followed; httpx drops the
Authorization header when a redirect leaves the registry's origin). Plain http is only
used for loopback registries.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from contree_shell.sandbox.oci_layers import ImportFailed
from contree_shell.sandbox.oci_manifest import ACCEPT, DIGEST_RE

DOCKER_HUB = "registry-1.docker.io"
_HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HOST_RE = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?$"
)
_MAX_MANIFEST = 4 << 20
_PROGRESS_EVERY = 0.5


@dataclass(frozen=True)
class DockerRef:
    """A parsed ``docker://`` reference."""

    registry: str  # host[:port], Docker Hub is registry-1.docker.io
    repository: str
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        """What to ask the manifests endpoint for: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def source(self) -> str:
        out = f"docker://{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    @property
    def host(self) -> str:
        """The host without port or IPv6 brackets."""
        reg = self.registry
        if reg.startswith("["):
            return reg[1 : reg.index("]")]
        return reg.rsplit(":", 1)[0] if ":" in reg else reg

    @property
    def is_loopback(self) -> bool:
        host = self.host
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


def parse_docker_reference(url: str) -> DockerRef:
    """``docker://[REGISTRY/]NAME[:TAG][@sha256:…]`` with Docker Hub's defaults."""
    rest = url[len("docker://") :] if url.startswith("docker://") else url
    if not rest:
        raise ImportFailed(f"invalid image reference: {url!r}")
    name, _, digest = rest.partition("@")
    tag: str | None = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    first, sep, remainder = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, remainder
    else:
        registry, repository = DOCKER_HUB, name
    if registry.lower() in _HUB_ALIASES:
        registry = DOCKER_HUB
        if "/" not in repository:
            repository = f"library/{repository}"
    if not _HOST_RE.match(registry):
        raise ImportFailed(f"invalid registry host in {url!r}")
    if not _REPO_RE.match(repository):
        raise ImportFailed(f"invalid image name {repository!r} in {url!r}")
    if tag is not None and not _TAG_RE.match(tag):
        raise ImportFailed(f"invalid tag {tag!r} in {url!r}")
    if digest and not DIGEST_RE.match(digest):
        raise ImportFailed(f"invalid digest {digest!r} in {url!r}")
    if not digest and tag is None:
        tag = "latest"
    return DockerRef(registry, repository, tag, digest or None)


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="…",service="…"`` → ("bearer", {...}); quoted commas allowed."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    for m in re.finditer(
        r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))', rest
    ):
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
    return scheme.lower(), params


def human_mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def short_digest(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    return f"{algo}:{hexpart[:12]}…"


def _registry_error(resp: httpx.Response) -> str:
    """The first message of a distribution error body, if any."""
    try:
        body = resp.json()
        err = body["errors"][0]
        return f"{err.get('code', '')}: {err.get('message', '')}".strip(": ")
    except Exception:
        return ""


class RegistryClient:
    """Pulls manifests and blobs of one repository."""

    def __init__(
        self,
        ref: DockerRef,
        *,
        credentials: tuple[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.ref = ref
        self.credentials = credentials
        scheme = "http" if ref.is_loopback else "https"
        self.base = f"{scheme}://{ref.registry}"
        self._auth: str | None = None
        self._http = httpx.Client(
            transport=transport,
            follow_redirects=True,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 15.0)),
            headers={"User-Agent": "contree-shell"},
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- auth -------------------------------------------------------------------

    def _authenticate(self, resp: httpx.Response) -> bool:
        """Act on a 401 challenge; True when there is something new to retry with."""
        header = resp.headers.get("www-authenticate", "")
        scheme, params = parse_challenge(header)
        if scheme == "basic":
            if self.credentials is None:
                raise ImportFailed(f"{self.ref.registry} requires credentials")
            user, password = self.credentials
            value = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        elif scheme == "bearer" and params.get("realm"):
            value = "Bearer " + self._token(params)
        else:
            return False
        if value == self._auth:
            return False
        self._auth = value
        return True

    def _token(self, params: dict[str, str]) -> str:
        query: dict[str, str] = {}
        if params.get("service"):
            query["service"] = params["service"]
        query["scope"] = params.get("scope") or f"repository:{self.ref.repository}:pull"
        auth = httpx.BasicAuth(*self.credentials) if self.credentials else None
        try:
            resp = self._http.get(params["realm"], params=query, auth=auth)
        except httpx.HTTPError as exc:
            raise ImportFailed(
                f"cannot reach the token service of {self.ref.registry}: {exc}"
            ) from None
        if resp.status_code in (401, 403):
            raise ImportFailed(
                f"authentication to {self.ref.registry} failed (check the credentials)"
            )
        if resp.status_code != 200:
            raise ImportFailed(f"token service of {self.ref.registry} answered {resp.status_code}")
        try:
            body = resp.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise ImportFailed(f"token service of {self.ref.registry} returned no token")
        return token

    # -- requests ---------------------------------------------------------------

    def _send(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        """GET ``path`` (streamed), re-authenticating once on a 401 challenge."""
        for attempt in range(3):
            hdrs = dict(headers or {})
            if self._auth:
                hdrs["Authorization"] = self._auth
            req = self._http.build_request("GET", self.base + path, headers=hdrs)
            try:
                resp = self._http.send(req, stream=True)
            except httpx.HTTPError as exc:
                raise ImportFailed(f"cannot reach registry {self.ref.registry}: {exc}") from None
            if resp.status_code == 401 and attempt < 2:
                resp.read()
                resp.close()
                if self._authenticate(resp):
                    continue
            return resp
        raise AssertionError("unreachable")

    def _fail(self, resp: httpx.Response, what: str) -> ImportFailed:
        try:
            resp.read()
        except httpx.HTTPError:
            pass
        detail = _registry_error(resp)
        suffix = f" ({detail})" if detail else ""
        status = resp.status_code
        if status == 404:
            return ImportFailed(f"{what} not found{suffix}")
        if status == 401:
            hint = (
                "wrong credentials?"
                if self.credentials
                else "it does not exist or needs credentials"
            )
            return ImportFailed(f"access denied to {what}: {hint}{suffix}")
        if status == 403:
            return ImportFailed(f"access denied to {what}{suffix}")
        if status == 429:
            return ImportFailed(f"{self.ref.registry} rate limit reached; try again later{suffix}")
        return ImportFailed(f"registry {self.ref.registry} answered {status} for {what}{suffix}")

    def ping(self) -> None:
        """GET /v2/: checks this is a registry and settles the auth scheme early."""
        resp = self._send("/v2/")
        try:
            if resp.status_code == 401:
                raise self._fail(resp, f"registry {self.ref.registry}")
            if resp.status_code == 404:
                raise ImportFailed(f"{self.ref.registry} is not a Docker/OCI registry (no /v2/)")
        finally:
            resp.close()

    def manifest(self, reference: str) -> tuple[bytes, str | None]:
        """Manifest or index bytes for a tag or digest, with its Content-Type."""
        path = f"/v2/{self.ref.repository}/manifests/{reference}"
        resp = self._send(path, {"Accept": ACCEPT})
        try:
            if resp.status_code != 200:
                what = (
                    self.ref.source if reference == self.ref.reference else f"manifest {reference}"
                )
                raise self._fail(resp, f"image {what}")
            data = _read_capped(resp, _MAX_MANIFEST, f"{self.ref.source}: manifest is too large")
        except httpx.HTTPError as exc:
            raise ImportFailed(f"reading manifest from {self.ref.registry}: {exc}") from None
        finally:
            resp.close()
        if DIGEST_RE.match(reference):
            _verify(data, reference, f"manifest {reference}")
        return data, resp.headers.get("content-type")

    def blob_bytes(self, digest: str, *, limit: int = 16 << 20) -> bytes:
        """A small blob (an image config) in memory, verified."""
        resp = self._send(f"/v2/{self.ref.repository}/blobs/{digest}")
        try:
            if resp.status_code != 200:
                raise self._fail(resp, f"blob {digest}")
            data = _read_capped(resp, limit, f"blob {digest} is larger than {limit} bytes")
        except httpx.HTTPError as exc:
            raise ImportFailed(f"downloading {digest}: {exc}") from None
        finally:
            resp.close()
        _verify(data, digest, f"blob {digest}")
        return data

    def download(
        self,
        digest: str,
        dest: Path,
        *,
        size: int | None = None,
        progress: Callable[[str], None] = lambda s: None,
    ) -> int:
        """Stream a blob to ``dest`` and verify its digest; returns the size."""
        algo = digest.split(":", 1)[0]
        h = hashlib.new(algo)
        got = 0
        total = f"/{human_mb(size)}" if size else ""
        last = time.monotonic()
        label = short_digest(digest)
        tmp = dest.with_name(dest.name + ".partial")
        resp = self._send(f"/v2/{self.ref.repository}/blobs/{digest}")
        try:
            if resp.status_code != 200:
                raise self._fail(resp, f"blob {digest}")
            with open(tmp, "wb") as out:
                for chunk in resp.iter_bytes(1 << 20):
                    out.write(chunk)
                    h.update(chunk)
                    got += len(chunk)
                    now = time.monotonic()
                    if now - last >= _PROGRESS_EVERY:
                        last = now
                        progress(f"pulling {label} {human_mb(got)}{total}")
        except httpx.HTTPError as exc:
            raise ImportFailed(f"downloading {label}: {exc}") from None
        finally:
            resp.close()
        if f"{algo}:{h.hexdigest()}" != digest:
            os.unlink(tmp)
            raise ImportFailed(f"blob {label} does not match its digest (corrupt download)")
        os.replace(tmp, dest)
        return got


def _verify(data: bytes, digest: str, what: str) -> None:
    algo, _, expected = digest.partition(":")
    if hashlib.new(algo, data).hexdigest() != expected:
        raise ImportFailed(f"{what} does not match its digest")


def _read_capped(resp: httpx.Response, limit: int, too_large: str) -> bytes:
    """A streamed response body held in memory, refused (ImportFailed) past `limit`."""
    body = bytearray()
    for chunk in resp.iter_bytes():
        body += chunk
        if len(body) > limit:
            raise ImportFailed(too_large)
    return bytes(body)
