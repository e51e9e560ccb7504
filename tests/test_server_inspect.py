"""Archive and grep over HTTP: status codes, headers and parameter validation."""

# ruff: noqa: F811  (pytest fixtures imported from test_server_support)
from __future__ import annotations

import gzip
import io
import tarfile

import httpx
import pytest

from contree_shell.server.app import _accepts_gzip
from tests.test_server_support import (  # noqa: F401 - fixtures
    ApiServer,
    api_server,
    http,
)


def _tar(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        assert all(m.name for m in tar.getmembers())
        return tar.getnames()


def test_archive_of_a_directory_is_a_pax_tar_rooted_at_its_name(
        api_server: ApiServer, http: httpx.Client) -> None:
    resp = http.get(f"/v1/inspect/{api_server.busybox}/archive", params={"path": "/etc"},
                    headers={"Accept-Encoding": "identity"})
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/x-tar"
    assert resp.headers["content-disposition"] == 'attachment; filename="etc.tar"'
    assert "content-encoding" not in resp.headers
    names = _tar(resp.content)
    assert "etc/passwd" in names
    with tarfile.open(fileobj=io.BytesIO(resp.content)) as tar:
        assert tar.pax_headers is not None


def test_archive_is_gzipped_on_the_wire_when_accepted(
        api_server: ApiServer) -> None:
    with api_server.http() as raw:
        req = raw.build_request("GET", f"/v1/inspect/{api_server.busybox}/archive",
                                params={"path": "/etc/passwd"},
                                headers={"Accept-Encoding": "gzip"})
        resp = raw.send(req, stream=True)
        body = b"".join(resp.iter_raw())
    assert resp.headers["content-encoding"] == "gzip"
    assert resp.headers["content-disposition"] == 'attachment; filename="etc_passwd.tar"'
    assert _tar(gzip.decompress(body)) == ["passwd"]


def test_archive_errors_and_head(api_server: ApiServer, http: httpx.Client) -> None:
    base = f"/v1/inspect/{api_server.busybox}/archive"
    assert http.head(base, params={"path": "/etc"}).status_code == 200
    assert http.head(base, params={"path": "/nope"}).status_code == 404
    assert http.get(base, params={"path": "/nope"}).status_code == 404
    assert http.get(base, params={"path": "/dev/null"}).status_code in (404, 422)
    assert http.get(base).status_code == 400
    unknown = "00000000-0000-4000-8000-000000000000"
    assert http.get(f"/v1/inspect/{unknown}/archive", params={"path": "/"}).status_code == 404
    assert http.get("/v1/inspect/not-a-uuid/archive", params={"path": "/"}).status_code == 400


def test_grep_finds_lines_with_submatches(api_server: ApiServer, http: httpx.Client) -> None:
    resp = http.get(f"/v1/inspect/{api_server.busybox}/grep",
                    params={"pattern": "^root", "path": "/etc"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["path"] == "/etc" and body["patterns"] == ["^root"]
    assert body["truncated"] is False
    hit = next(m for m in body["matches"] if m["path"] == "/etc/passwd")
    assert hit["line_number"] == 1 and hit["type"] == "match"
    assert hit["line_text"].startswith("root:") and hit["submatches"]


@pytest.mark.parametrize("params", [
    {},
    {"pattern": ""},
    {"pattern": "x", "case": "loud"},
    {"pattern": "x", "before": "51"},
    {"pattern": "x", "after": "-1"},
    {"pattern": "x", "max_count": "0"},
    {"pattern": "x", "max_total": "10001"},
    {"pattern": "x" * 1025},
    {"pattern": "(unclosed"},
    {"pattern": [f"p{i}" for i in range(17)]},
])
def test_grep_rejects_bad_parameters(api_server: ApiServer, http: httpx.Client,
                                     params: dict[str, object]) -> None:
    resp = http.get(f"/v1/inspect/{api_server.busybox}/grep", params=params)  # type: ignore[arg-type]
    assert resp.status_code == 400, resp.text
    assert resp.json()["status"] == 400


def test_grep_missing_path_is_404(api_server: ApiServer, http: httpx.Client) -> None:
    resp = http.get(f"/v1/inspect/{api_server.busybox}/grep",
                    params={"pattern": "x", "path": "/no/such/dir"})
    assert resp.status_code == 404


@pytest.mark.parametrize("header, expected", [
    ("gzip, deflate", True), ("identity", False), ("", False), ("gzip;q=0", False),
    ("br, gzip;q=0.5", True), ("x-gzip", True),
])
def test_accept_encoding_parsing(header: str, expected: bool) -> None:
    from starlette.requests import Request

    scope = {"type": "http", "headers": [(b"accept-encoding", header.encode())]}
    assert _accepts_gzip(Request(scope)) is expected
