"""Images, tags, inspect and files endpoints against a real server."""

# ruff: noqa: F811  (pytest fixtures imported from test_server_support)

from __future__ import annotations

import hashlib

import httpx

from tests.test_server_support import (  # noqa: F401 - fixtures
    ApiServer,
    api_server,
    http,
    import_busybox,
    sse_events,
    wait_done,
)

FILE_ITEM_KEYS = {
    "size", "path", "owner", "group", "uid", "gid", "mode", "mtime", "nlink", "is_dir",
    "is_regular", "is_symlink", "is_socket", "is_fifo", "symlink_to",
}


def test_import_busybox_ends_with_completion_and_result(api_server: ApiServer,
                                                         http: httpx.Client) -> None:
    resp = http.post("/v1/images/import", json={"registry": {"url": "busybox:"}})
    assert resp.status_code == 201
    assert resp.headers["location"] == f"/v1/operations/{resp.json()['uuid']}"
    events = list(sse_events(http, resp.json()["uuid"]))
    assert events[-1]["type"] == "completion"
    assert events[-1]["data"]["status"] == "SUCCESS"
    op = http.get(f"/v1/operations/{resp.json()['uuid']}").json()
    assert op["kind"] == "image_import"
    assert op["metadata"] == {"registry": {"url": "busybox:"}, "tag": None, "timeout": 300}
    assert op["result"] == {"image": op["result_image_uuid"], "tag": None}
    assert op["image_uuid"] is None


def test_import_masks_credentials_and_rejects_unsupported_urls(http: httpx.Client) -> None:
    resp = http.post("/v1/images/import", json={
        "registry": {"url": "ftp://example.invalid/alpine:latest"}})
    assert resp.status_code == 400
    assert "unsupported registry URL" in resp.json()["error"]
    assert resp.json()["status"] == 400
    resp = http.post("/v1/images/import", json={
        "registry": {"url": "busybox:", "credentials": {"username": "u", "password": "p"}},
        "tag": "creds-test"})
    op = wait_done(http, resp.json()["uuid"])
    assert op["metadata"]["registry"]["credentials"] == {"username": "u",
                                                         "password": "<MASKED>"}


def test_reimporting_a_tag_repoints_it(http: httpx.Client) -> None:
    first = import_busybox(http, "repoint:1")
    second = import_busybox(http, "repoint:1")
    assert first != second
    loc = http.get("/v1/inspect/", params={"tag": "repoint:1"}).headers["location"]
    assert loc == f"/v1/inspect/{second}/"


def test_tag_lookup_redirects_302_and_unknown_tag_is_404(api_server: ApiServer,
                                                        http: httpx.Client) -> None:
    resp = http.get("/v1/inspect/", params={"tag": "busybox:latest"})
    assert resp.status_code == 302
    assert resp.headers["location"] == f"/v1/inspect/{api_server.busybox}/"
    assert http.get("/v1/inspect/", params={"tag": "no-such:tag"}).status_code == 404
    assert http.get("/v1/inspect/").status_code == 400
    # The SDK follows the redirect to the Image.
    image = http.get("/v1/inspect/", params={"tag": "busybox:latest"},
                     follow_redirects=True).json()
    assert image["uuid"] == api_server.busybox
    assert image["tag"] == "busybox:latest"
    assert set(image) == {"uuid", "tag", "created_at", "operation_uuid"}


def test_inspect_without_trailing_slash_redirects_307(api_server: ApiServer,
                                                      http: httpx.Client) -> None:
    resp = http.get("/v1/inspect")
    assert resp.status_code == 307 and resp.headers["location"] == "/v1/inspect/"
    resp = http.get(f"/v1/inspect/{api_server.busybox}")
    assert resp.status_code == 307
    assert resp.headers["location"] == f"/v1/inspect/{api_server.busybox}/"


def test_list_gives_every_file_item_field_and_ls_text(api_server: ApiServer,
                                                      http: httpx.Client) -> None:
    resp = http.get(f"/v1/inspect/{api_server.busybox}/list", params={"path": "/bin"})
    assert resp.status_code == 200
    body = resp.json()
    assert body["path"] == "/bin"
    by_name = {f["path"]: f for f in body["files"]}
    for item in body["files"]:
        assert set(item) == FILE_ITEM_KEYS
    sh = by_name["sh"]
    assert sh["is_symlink"] is True and sh["symlink_to"] == "busybox"
    assert by_name["busybox"]["is_regular"] is True
    assert by_name["busybox"]["mode"] & 0o170000 == 0o100000
    assert by_name["busybox"]["owner"] == "root"
    text = http.get(f"/v1/inspect/{api_server.busybox}/list",
                    params={"path": "/etc", "text": "1"})
    assert text.status_code == 200
    assert text.headers["content-type"].startswith("text/plain")
    assert text.text.startswith("total ")
    assert "passwd" in text.text


def test_list_missing_is_404_and_file_is_422(api_server: ApiServer, http: httpx.Client) -> None:
    base = f"/v1/inspect/{api_server.busybox}/list"
    assert http.get(base, params={"path": "/nope"}).status_code == 404
    resp = http.get(base, params={"path": "/etc/passwd"})
    assert resp.status_code == 422 and resp.json()["status"] == 422
    assert http.get(base).status_code == 400


def test_download_streams_bytes_head_and_errors(api_server: ApiServer,
                                                http: httpx.Client) -> None:
    base = f"/v1/inspect/{api_server.busybox}/download"
    resp = http.get(base, params={"path": "/etc/passwd"})
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/octet-stream"
    assert resp.content.startswith(b"root:x:0:0:")
    head = http.head(base, params={"path": "/etc/passwd"})
    assert head.status_code == 200
    assert int(head.headers["content-length"]) == len(resp.content)
    big = http.get(base, params={"path": "/bin/busybox"})
    assert len(big.content) > 100_000
    assert http.get(base, params={"path": "/nope"}).status_code == 404
    assert http.get(base, params={"path": "/etc"}).status_code == 422
    assert http.head(base, params={"path": "/etc"}).status_code == 422
    assert http.get("/v1/inspect/00000000-0000-4000-8000-000000000000/download",
                    params={"path": "/x"}).status_code == 404
    assert http.get("/v1/inspect/not-a-uuid/download", params={"path": "/x"}).status_code == 400


def test_images_list_filters_and_one_row_per_tag(api_server: ApiServer,
                                                 http: httpx.Client) -> None:
    resp = http.patch(f"/v1/images/{api_server.busybox}/tag", json={"tag": "extra/tag:1"})
    assert resp.status_code == 200
    assert resp.json()["tag"] == "extra/tag:1"
    rows = http.get("/v1/images", params={"uuid": api_server.busybox}).json()["images"]
    assert {r["tag"] for r in rows} >= {"busybox:latest", "extra/tag:1"}
    rows = http.get("/v1/images", params={"tag": "extra/"}).json()["images"]
    assert [r["tag"] for r in rows] == ["extra/tag:1"]
    tagged = http.get("/v1/images", params={"tagged": "1"}).json()["images"]
    assert all(r["tag"] for r in tagged)
    assert http.get("/v1/images", params={"since": "1h"}).json()["images"]
    assert http.get("/v1/images", params={"until": "2000-01-01T00:00:00+00:00"}
                    ).json()["images"] == []
    assert len(http.get("/v1/images", params={"limit": 1}).json()["images"]) == 1
    assert http.get("/v1/images", params={"limit": 0}).status_code == 400
    assert http.get("/v1/images", params={"since": "yesterday"}).status_code == 400
    resp = http.delete(f"/v1/images/{api_server.busybox}/tag", params={"tag": "extra/tag:1"})
    assert resp.status_code == 204
    rows = http.get("/v1/images", params={"tag": "extra/"}).json()["images"]
    assert rows == []


def test_tagging_rejects_bad_tags_and_unknown_images(api_server: ApiServer,
                                                     http: httpx.Client) -> None:
    resp = http.patch(f"/v1/images/{api_server.busybox}/tag", json={"tag": "bad tag!"})
    assert resp.status_code == 400
    resp = http.patch("/v1/images/00000000-0000-4000-8000-000000000000/tag", json={"tag": "x"})
    assert resp.status_code == 404
    resp = http.patch(f"/v1/images/{api_server.busybox}/tag", content=b"{not json")
    assert resp.status_code == 400 and "JSON" in resp.json()["error"]


def test_files_are_content_addressed(http: httpx.Client) -> None:
    data = b"hello files\n" * 1000
    sha = hashlib.sha256(data).hexdigest()
    assert http.head(f"/v1/files/{sha}").status_code == 404
    assert http.get(f"/v1/files/{sha}").status_code == 404
    resp = http.post("/v1/files", content=iter([data[:5000], data[5000:]]),
                     headers={"Content-Type": "application/octet-stream"})
    assert resp.status_code == 201
    first = resp.json()
    assert first["sha256"] == sha and first["size"] == len(data)
    again = http.post("/v1/files", content=data).json()
    assert again["uuid"] == first["uuid"]
    info = http.get(f"/v1/files/{sha}").json()
    assert set(info) == {"uuid", "sha256", "size", "created_at", "updated_at"}
    assert info["uuid"] == first["uuid"]
    assert http.head(f"/v1/files/{sha}").status_code == 200
    listed = http.get("/v1/files").json()["files"]
    assert any(f["sha256"] == sha for f in listed)
    assert http.get("/v1/files/xyz").status_code == 400


def test_unknown_route_and_method_answer_json_errors(http: httpx.Client) -> None:
    resp = http.get("/v1/nothing-here")
    assert resp.status_code == 404 and resp.json()["status"] == 404
    resp = http.put("/v1/images")
    assert resp.status_code == 405 and "error" in resp.json()
