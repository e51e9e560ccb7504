"""OCI/Docker image import: layer conversion, local layouts, a real local registry.

Images are built by hand here (tarfile + json, digests computed), written as OCI layouts,
OCI archives and ``docker save`` archives, or pushed over the v2 API into Debian's
``docker-registry`` started by the test. Nothing is mocked except where a test needs a
registry feature the local one lacks (a Bearer token service, a blob-storage redirect):
there an httpx transport stands in front of the real registry.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from contree_shell.sandbox.oci import (
    ImportFailed,
    PulledImage,
    convert_layer,
    import_reference,
    normalize_reference,
)
from contree_shell.sandbox.oci_manifest import Platform, host_platform
from contree_shell.sandbox.oci_registry import parse_challenge, parse_docker_reference

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="layer conversion needs root")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZ = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MTIME = 1_600_000_000


# --------------------------------------------------------------------------- builders


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Entry:
    name: str
    kind: str = "file"  # file dir sym link blk chr fifo
    data: bytes = b""
    target: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    pax: dict[str, str] = field(default_factory=dict)


def make_tar(entries: list[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.mtime = MTIME
            ti.mode = e.mode
            ti.uid, ti.gid = e.uid, e.gid
            ti.pax_headers = dict(e.pax)
            payload = None
            if e.kind == "file":
                ti.size = len(e.data)
                payload = io.BytesIO(e.data)
            elif e.kind == "dir":
                ti.type = tarfile.DIRTYPE
                ti.mode = e.mode if e.mode != 0o644 else 0o755
            elif e.kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, e.target
            elif e.kind == "link":
                ti.type, ti.linkname = tarfile.LNKTYPE, e.target
            elif e.kind == "blk":
                ti.type, ti.devmajor, ti.devminor = tarfile.BLKTYPE, 8, 0
            elif e.kind == "chr":
                ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, 1, 3
            elif e.kind == "fifo":
                ti.type = tarfile.FIFOTYPE
            tf.addfile(ti, payload)
    return buf.getvalue()


def d(name: str, mode: int = 0o755) -> Entry:
    return Entry(name, "dir", mode=mode)


def f(name: str, data: bytes, **kw: Any) -> Entry:
    return Entry(name, "file", data=data, **kw)


CAP = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"


def base_layers() -> list[bytes]:
    """Three layers: a base, one with a whiteout and an opaque dir, one replacing a file."""
    l1 = make_tar(
        [
            d("etc"),
            f("etc/debian_version", b"12.0\n"),
            f("etc/hello", b"hello v1\n"),
            Entry("etc/hard", "link", target="etc/hello"),
            Entry("etc/link", "sym", target="/etc/hello"),
            d("bin"),
            f("bin/tool", b"#!/bin/sh\n", mode=0o4755),
            f(
                "bin/ping",
                b"ELF",
                mode=0o755,
                pax={
                    "SCHILY.xattr.security.capability": CAP.decode("utf-8", "surrogateescape"),
                    "SCHILY.xattr.user.origin": "layer1",
                    "SCHILY.xattr.trusted.overlay.redirect": "/etc",
                },
            ),
            d("usr"),
            d("usr/share"),
            d("usr/share/doc"),
            d("usr/share/doc/pkg-a"),
            f("usr/share/doc/pkg-a/copyright", b"a\n"),
            f("usr/share/doc/pkg-b", b"b\n"),
            d("tmp", mode=0o1777),
        ]
    )
    l2 = make_tar(
        [
            d("etc"),
            f("etc/.wh.debian_version", b""),
            d("usr"),
            d("usr/share"),
            d("usr/share/doc"),
            f("usr/share/doc/.wh..wh..opq", b""),
            f("usr/share/doc/README", b"only this\n"),
            d("root", mode=0o700),
            f("root/hello", b"hi\n", uid=1000, gid=1000, mode=0o600),
        ]
    )
    l3 = make_tar([d("etc"), f("etc/hello", b"hello v2\n", mode=0o640)])
    return [l1, l2, l3]


IMAGE_CONFIG = {
    "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=a=b", "EMPTY="],
    "WorkingDir": "/root",
    "User": "1000:1000",
    "Cmd": ["/bin/sh"],
}


@dataclass
class Image:
    """An image as blobs: what a registry or an OCI layout stores."""

    blobs: dict[str, bytes]
    manifest: bytes
    layers: list[bytes]  # uncompressed tars
    media_type: str = OCI_MANIFEST

    @property
    def digest(self) -> str:
        return sha(self.manifest)


def build_image(
    layers: list[bytes],
    config: dict[str, Any] | None = None,
    *,
    arch: str = "amd64",
    variant: str | None = None,
    docker: bool = False,
    compress: bool = True,
) -> Image:
    """Blobs and manifest of an image, OCI types by default, Docker schema 2 types when
    ``docker``; layers gzip-compressed unless ``compress`` is False (OCI plain tar)."""
    blobs: dict[str, bytes] = {}
    descs = []
    for tar in layers:
        blob = gzip.compress(tar, mtime=0) if compress else tar
        blobs[sha(blob)] = blob
        layer_type = DOCKER_LAYER_GZ if docker else OCI_LAYER_GZ if compress else OCI_LAYER
        descs.append({"mediaType": layer_type, "digest": sha(blob), "size": len(blob)})
    cfg: dict[str, Any] = {
        "architecture": arch,
        "os": "linux",
        "config": config if config is not None else IMAGE_CONFIG,
        "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in layers]},
    }
    if variant:
        cfg["variant"] = variant
    cfg_bytes = json.dumps(cfg).encode()
    blobs[sha(cfg_bytes)] = cfg_bytes
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
            "config": {
                "mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
                "digest": sha(cfg_bytes),
                "size": len(cfg_bytes),
            },
            "layers": descs,
        }
    ).encode()
    blobs[sha(manifest)] = manifest
    return Image(blobs, manifest, layers, DOCKER_MANIFEST if docker else OCI_MANIFEST)


def build_index(
    images: dict[tuple[str, str | None], Image], *, docker: bool = False
) -> tuple[bytes, dict[str, bytes]]:
    """An OCI image index (a Docker manifest list when ``docker``) over per-platform
    images, plus an attestation entry to skip."""
    blobs: dict[str, bytes] = {}
    manifests = []
    for (arch, variant), img in images.items():
        blobs.update(img.blobs)
        plat = {"os": "linux", "architecture": arch}
        if variant:
            plat["variant"] = variant
        manifests.append(
            {
                "mediaType": img.media_type,
                "digest": img.digest,
                "size": len(img.manifest),
                "platform": plat,
            }
        )
    first = next(iter(images.values()))
    manifests.append(
        {
            "mediaType": first.media_type,
            "digest": first.digest,
            "size": 1,
            "platform": {"os": "unknown", "architecture": "unknown"},
        }
    )
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_LIST if docker else OCI_INDEX,
            "manifests": manifests,
        }
    ).encode()
    blobs[sha(index)] = index
    return index, blobs


def write_layout(
    root: Path, blobs: dict[str, bytes], top: bytes, media_type: str, tag: str
) -> Path:
    (root / "blobs" / "sha256").mkdir(parents=True)
    for digest, data in blobs.items():
        (root / "blobs" / "sha256" / digest.split(":")[1]).write_bytes(data)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": media_type,
                "digest": sha(top),
                "size": len(top),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (root / "index.json").write_text(json.dumps(index))
    return root


def write_docker_archive(path: Path, layers: list[bytes], config: dict[str, Any]) -> Path:
    cfg = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in layers]},
        }
    ).encode()
    members: dict[str, bytes] = {}
    names = []
    for i, tar in enumerate(layers):
        name = f"{i:064x}/layer.tar"
        members[name] = tar
        names.append(name)
    cfg_name = sha(cfg).split(":")[1] + ".json"
    members[cfg_name] = cfg
    members["manifest.json"] = json.dumps(
        [{"Config": cfg_name, "RepoTags": ["example/app:1.0"], "Layers": names}]
    ).encode()
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return path


# --------------------------------------------------------------------------- checks


def lst(path: Path) -> os.stat_result:
    return os.lstat(path)


def check_base_image(img: PulledImage) -> None:
    l1, l2, l3 = img.layers
    assert (l1 / "etc/hello").read_bytes() == b"hello v1\n"
    assert lst(l1 / "etc/hard").st_ino == lst(l1 / "etc/hello").st_ino
    assert os.readlink(l1 / "etc/link") == "/etc/hello"
    tool = lst(l1 / "bin/tool")
    assert stat.S_IMODE(tool.st_mode) == 0o4755
    assert int(tool.st_mtime) == MTIME
    assert stat.S_IMODE(lst(l1 / "tmp").st_mode) == 0o1777
    assert int(lst(l1 / "usr/share").st_mtime) == MTIME  # dir mtimes survive their children
    assert os.getxattr(l1 / "bin/ping", "security.capability") == CAP
    assert os.getxattr(l1 / "bin/ping", "user.origin") == b"layer1"
    assert "trusted.overlay.redirect" not in os.listxattr(l1 / "bin/ping")

    wh = lst(l2 / "etc/debian_version")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert not (l2 / "etc/.wh.debian_version").exists()
    assert os.getxattr(l2 / "usr/share/doc", "trusted.overlay.opaque") == b"y"
    assert not (l2 / "usr/share/doc/.wh..wh..opq").exists()
    assert sorted(os.listdir(l2 / "usr/share/doc")) == ["README"]
    hello = lst(l2 / "root/hello")
    assert (hello.st_uid, hello.st_gid, stat.S_IMODE(hello.st_mode)) == (1000, 1000, 0o600)
    assert stat.S_IMODE(lst(l2 / "root").st_mode) == 0o700

    assert (l3 / "etc/hello").read_bytes() == b"hello v2\n"
    assert os.listdir(l3) == ["etc"]
    assert img.config == {
        "env": {"PATH": "/usr/local/bin:/usr/bin:/bin", "GREETING": "a=b", "EMPTY": ""},
        "workdir": "/root",
        "user": "1000:1000",
    }


@contextlib.contextmanager
def overlay_mount(layers: list[Path], mnt: Path) -> Iterator[Path]:
    """The layers mounted read-only the way the engine stacks them (top first)."""
    mnt.mkdir()
    lower = ":".join(str(p) for p in reversed(layers))
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower}", str(mnt)], check=True
    )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# --------------------------------------------------------------------------- local layouts


@pytest.fixture
def image() -> Image:
    return build_image(base_layers())


def test_oci_layout_import_converts_whiteouts_opaque_dirs_and_metadata(
    tmp_path: Path, image: Image
) -> None:
    layout = write_layout(tmp_path / "layout", image.blobs, image.manifest, OCI_MANIFEST, "v1")
    lines: list[str] = []
    img = import_reference(f"oci:{layout}:v1", tmp_path / "work", progress=lines.append)
    assert img.digest == image.digest
    assert img.source == f"oci:{layout}:v1"
    assert [p.parent for p in img.layers] == [tmp_path / "work" / "layers"] * 3
    check_base_image(img)
    assert sum(1 for line in lines if line.startswith("layer ")) == 3
    assert not (tmp_path / "work" / ".blobs").exists()


def test_converted_layers_mount_as_overlay_with_the_deletions_applied(
    tmp_path: Path, image: Image
) -> None:
    layout = write_layout(tmp_path / "layout", image.blobs, image.manifest, OCI_MANIFEST, "v1")
    img = import_reference(f"oci:{layout}:v1", tmp_path / "work")
    with overlay_mount(img.layers, tmp_path / "mnt") as root:
        assert not (root / "etc/debian_version").exists()
        assert sorted(os.listdir(root / "usr/share/doc")) == ["README"]
        assert (root / "etc/hello").read_bytes() == b"hello v2\n"
        assert (root / "etc/hard").read_bytes() == b"hello v1\n"  # its own inode in layer 1
        assert (root / "root/hello").read_bytes() == b"hi\n"


def test_image_view_reads_converted_layers(tmp_path: Path, image: Image) -> None:
    from contree_shell.sandbox.inspect import ImageView, PathNotFound

    layout = write_layout(tmp_path / "layout", image.blobs, image.manifest, OCI_MANIFEST, "v1")
    view = ImageView(import_reference(f"oci:{layout}", tmp_path / "work").layers)
    with pytest.raises(PathNotFound):
        view.stat("/etc/debian_version")
    assert [e.name for e in view.listdir("/usr/share/doc")[1]] == ["README"]
    assert view.read("/etc/link") == b"hello v2\n"


def test_oci_archive_import(tmp_path: Path, image: Image) -> None:
    layout = write_layout(tmp_path / "layout", image.blobs, image.manifest, OCI_MANIFEST, "v1")
    archive = tmp_path / "img.tar"
    with tarfile.open(archive, "w") as tf:
        for p in sorted(layout.rglob("*")):
            tf.add(p, arcname=str(p.relative_to(layout)), recursive=False)
    img = import_reference(f"oci-archive:{archive}:v1", tmp_path / "work")
    assert img.digest == image.digest
    check_base_image(img)


def test_docker_save_archive_import(tmp_path: Path) -> None:
    layers = base_layers()
    archive = write_docker_archive(tmp_path / "saved.tar", layers, IMAGE_CONFIG)
    img = import_reference(f"docker-archive:{archive}", tmp_path / "work")
    check_base_image(img)
    assert img.source == f"docker-archive:{archive}"
    again = import_reference(f"docker-archive:{archive}:example/app:1.0", tmp_path / "work2")
    assert again.digest == img.digest


def test_docker_save_layer_not_matching_its_diff_id_fails(tmp_path: Path) -> None:
    layers = base_layers()
    archive = write_docker_archive(tmp_path / "saved.tar", layers, IMAGE_CONFIG)
    tampered = tmp_path / "tampered.tar"
    with tarfile.open(archive) as src, tarfile.open(tampered, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()  # type: ignore[union-attr]
            if m.name.startswith(f"{2:064x}/"):
                data = make_tar([d("etc"), f("etc/hello", b"evil\n")])
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    with pytest.raises(ImportFailed, match="diff_id"):
        import_reference(f"docker-archive:{tampered}", tmp_path / "work")
    assert not (tmp_path / "work" / "layers").exists()


def test_oci_layout_blob_not_matching_its_digest_fails(tmp_path: Path, image: Image) -> None:
    layout = write_layout(tmp_path / "layout", image.blobs, image.manifest, OCI_MANIFEST, "v1")
    layer_blob = json.loads(image.manifest)["layers"][0]["digest"].split(":")[1]
    (layout / "blobs/sha256" / layer_blob).write_bytes(gzip.compress(make_tar([f("x", b"1")])))
    with pytest.raises(ImportFailed, match="does not match"):
        import_reference(f"oci:{layout}", tmp_path / "work")


def test_unknown_tag_in_layout_names_the_tags_there(tmp_path: Path, image: Image) -> None:
    layout = write_layout(tmp_path / "layout", image.blobs, image.manifest, OCI_MANIFEST, "v1")
    with pytest.raises(ImportFailed, match=r"no image tagged 'v2' \(tags: v1\)"):
        import_reference(f"oci:{layout}:v2", tmp_path / "work")


def test_multi_arch_index_resolves_to_the_requested_platform(tmp_path: Path) -> None:
    amd = build_image([make_tar([f("arch", b"amd64")])], arch="amd64")
    arm = build_image([make_tar([f("arch", b"arm64")])], arch="arm64", variant="v8")
    armv7 = build_image([make_tar([f("arch", b"arm/v7")])], arch="arm", variant="v7")
    index, blobs = build_index({("amd64", None): amd, ("arm64", "v8"): arm, ("arm", "v7"): armv7})
    layout = write_layout(tmp_path / "layout", blobs, index, OCI_INDEX, "multi")

    def arch_of(platform: tuple[str, str] | None, work: str) -> tuple[bytes, str]:
        img = import_reference(f"oci:{layout}:multi", tmp_path / work, platform=platform)
        return (img.layers[0] / "arch").read_bytes(), img.digest

    assert arch_of(("linux", "arm64"), "a") == (b"arm64", arm.digest)
    assert arch_of(("linux", "arm/v7"), "b") == (b"arm/v7", armv7.digest)
    assert arch_of(("linux", "amd64"), "c") == (b"amd64", amd.digest)
    host = host_platform()
    if host.architecture in ("amd64", "arm64"):
        assert arch_of(None, "d")[0] == host.architecture.encode()
    with pytest.raises(
        ImportFailed,
        match=r"no image for linux/s390x \(available: linux/amd64, linux/arm/v7, linux/arm64/v8\)",
    ):
        arch_of(("linux", "s390x"), "e")


def test_host_platform_maps_machine_names_to_goarch() -> None:
    machine = os.uname().machine
    expected = {"x86_64": "amd64", "aarch64": "arm64"}.get(machine)
    if expected is None:
        pytest.skip(f"no fixed expectation for {machine}")
    assert host_platform().os == "linux"
    assert host_platform().architecture == expected
    assert str(Platform("linux", "arm64", "v8")) == "linux/arm64/v8"


def test_unsupported_layer_media_type_fails(tmp_path: Path, image: Image) -> None:
    manifest = json.loads(image.manifest)
    manifest["layers"][0]["mediaType"] = "application/vnd.example.layer.v1+squashfs"
    raw = json.dumps(manifest).encode()
    blobs = dict(image.blobs)
    blobs[sha(raw)] = raw
    layout = write_layout(tmp_path / "layout", blobs, raw, OCI_MANIFEST, "v1")
    with pytest.raises(ImportFailed, match="unsupported layer media type"):
        import_reference(f"oci:{layout}", tmp_path / "work")


def test_zstd_layer_without_zstandard_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import now raises ImportError
    with pytest.raises(ImportFailed, match="install the 'zstandard' Python package"):
        convert_layer(
            io.BytesIO(b"\x28\xb5\x2f\xfd" + b"\0" * 16), tmp_path / "l", compression="zstd"
        )


def test_zstd_layers_convert_when_zstandard_is_installed(tmp_path: Path) -> None:
    zstandard = pytest.importorskip("zstandard")
    tars = base_layers()
    image = build_image(tars)
    manifest = json.loads(image.manifest)
    blobs = {k: v for k, v in image.blobs.items() if k != image.digest}
    for desc, tar in zip(manifest["layers"], tars, strict=True):
        del blobs[desc["digest"]]
        blob = zstandard.ZstdCompressor().compress(tar)
        blobs[sha(blob)] = blob
        desc.update(
            mediaType="application/vnd.oci.image.layer.v1.tar+zstd",
            digest=sha(blob),
            size=len(blob),
        )
    raw = json.dumps(manifest).encode()
    blobs[sha(raw)] = raw
    layout = write_layout(tmp_path / "layout", blobs, raw, OCI_MANIFEST, "v1")
    check_base_image(import_reference(f"oci:{layout}:v1", tmp_path / "work"))


def test_corrupt_zstd_layer_is_a_bad_archive(tmp_path: Path) -> None:
    pytest.importorskip("zstandard")
    with pytest.raises(ImportFailed, match="bad layer archive"):
        convert_layer(
            io.BytesIO(b"\x28\xb5\x2f\xfd" + b"garbage" * 10), tmp_path / "l", compression="zstd"
        )


def test_unsupported_scheme_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ImportFailed, match="unsupported image URL: ftp://x"):
        import_reference("ftp://x", tmp_path / "work")
    with pytest.raises(ImportFailed, match="no such file"):
        import_reference(f"oci:{tmp_path}/missing:v1", tmp_path / "work")


# --------------------------------------------------------------------------- conversion


def convert(tmp_path: Path, entries: list[Entry], compression: str | None = None) -> Path:
    tar = make_tar(entries)
    if compression == "gzip":
        tar = gzip.compress(tar)
    dest = tmp_path / "dest"
    convert_layer(io.BytesIO(tar), dest, compression=compression)
    return dest


def test_later_entries_replace_earlier_ones(tmp_path: Path) -> None:
    dest = convert(
        tmp_path,
        [
            f("x", b"file"),
            d("x"),
            f("x/inner", b"1"),
            d("y"),
            f("y/inner", b"2"),
            f("y", b"now a file"),
            f("z", b"first"),
            Entry("z", "sym", target="elsewhere"),
            f("w", b"one"),
            f("w", b"two"),
        ],
        compression="gzip",
    )
    assert (dest / "x/inner").read_bytes() == b"1"
    assert (dest / "y").read_bytes() == b"now a file"
    assert os.readlink(dest / "z") == "elsewhere"
    assert (dest / "w").read_bytes() == b"two"


def test_whiteout_then_dir_of_same_name_in_one_layer_is_an_opaque_dir(tmp_path: Path) -> None:
    dest = convert(tmp_path, [f(".wh.cache", b""), d("cache"), f("cache/new", b"n")])
    assert os.getxattr(dest / "cache", "trusted.overlay.opaque") == b"y"
    assert os.listdir(dest / "cache") == ["new"]


def test_returned_size_counts_file_bytes(tmp_path: Path) -> None:
    tar = make_tar([f("a", b"x" * 1000), d("b"), f("b/c", b"y" * 24)])
    assert convert_layer(io.BytesIO(tar), tmp_path / "dest", compression="auto") == 1024


def test_truncated_gzip_layer_is_a_bad_archive(tmp_path: Path) -> None:
    gz = gzip.compress(make_tar([f("a", b"x" * 100_000)]))
    with pytest.raises(ImportFailed, match="bad layer archive"):
        convert_layer(io.BytesIO(gz[: len(gz) // 2]), tmp_path / "dest", compression="gzip")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to dest that no layer may write into, with a file to protect."""
    out = tmp_path / "outside"
    out.mkdir()
    (out / "keep").write_bytes(b"original")
    return out


def assert_untouched(tmp_path: Path, outside: Path) -> None:
    assert sorted(os.listdir(outside)) == ["keep"]
    assert (outside / "keep").read_bytes() == b"original"
    assert sorted(os.listdir(tmp_path)) == ["dest", "outside"]


@pytest.mark.parametrize(
    "entries, message",
    [
        (lambda out: [f("../x", b"pwned")], "'..' component"),
        (lambda out: [d("a"), f("a/../../x", b"pwned")], "'..' component"),
        (lambda out: [f(f"{out}/abs", b"pwned")], "absolute path"),
        (lambda out: [Entry("a", "sym", target=str(out)), f("a/pwned", b"x")], "is a symlink"),
        (
            lambda out: [Entry("a", "sym", target="../outside"), f("a/keep", b"x")],
            "is a symlink",
        ),
        (
            lambda out: [d("a"), Entry("a", "sym", target=str(out)), d("a/sub")],
            "is a symlink",
        ),
        (
            lambda out: [Entry("a", "sym", target=str(out)), f("a/.wh.keep", b"")],
            "is a symlink",
        ),
        (
            lambda out: [Entry("a", "sym", target=str(out)), f("a/.wh..wh..opq", b"")],
            "is a symlink",
        ),
        (lambda out: [Entry("passwd", "link", target="/etc/passwd")], "absolute path"),
        (lambda out: [Entry("passwd", "link", target="etc/passwd")], "not an earlier entry"),
        (lambda out: [Entry("k", "link", target="../outside/keep")], "'..' component"),
        (
            lambda out: [Entry("a", "sym", target=str(out)), Entry("k", "link", target="a/keep")],
            "not an earlier entry",
        ),
        (lambda out: [Entry("sda", "blk")], "device nodes are not allowed"),
        (lambda out: [Entry("null", "chr")], "device nodes are not allowed"),
        (lambda out: [f(".wh.etc/passwd", b"x")], "whiteout name used as a directory"),
    ],
    ids=[
        "dotdot",
        "dotdot-inside",
        "absolute",
        "symlink-then-write-through",
        "relative-symlink-then-overwrite",
        "dir-replaced-by-symlink",
        "whiteout-through-symlink",
        "opaque-through-symlink",
        "hardlink-absolute",
        "hardlink-not-in-layer",
        "hardlink-dotdot",
        "hardlink-through-symlink",
        "block-device",
        "char-device",
        "whiteout-as-directory",
    ],
)
def test_malicious_layer_fails_and_writes_nothing_outside(
    tmp_path: Path, outside: Path, entries: Any, message: str
) -> None:
    passwd = os.stat("/etc/passwd")
    with pytest.raises(ImportFailed, match=message):
        convert(tmp_path, entries(outside))
    assert_untouched(tmp_path, outside)
    after = os.stat("/etc/passwd")
    assert (after.st_nlink, after.st_mtime_ns, after.st_ino) == (
        passwd.st_nlink,
        passwd.st_mtime_ns,
        passwd.st_ino,
    )


def test_symlinks_are_stored_verbatim_not_followed(tmp_path: Path, outside: Path) -> None:
    dest = convert(
        tmp_path,
        [Entry("etc", "sym", target=str(outside)), Entry("up", "sym", target="../../..")],
    )
    assert os.readlink(dest / "etc") == str(outside)
    assert os.readlink(dest / "up") == "../../.."
    assert_untouched(tmp_path, outside)


# --------------------------------------------------------------------------- references


@pytest.mark.parametrize(
    "url, source",
    [
        ("docker://busybox", "docker://registry-1.docker.io/library/busybox:latest"),
        (
            "docker://docker.io/library/busybox:1.36",
            "docker://registry-1.docker.io/library/busybox:1.36",
        ),
        ("docker://user/app", "docker://registry-1.docker.io/user/app:latest"),
        ("docker://ghcr.io/org/app:v1", "docker://ghcr.io/org/app:v1"),
        ("docker://localhost:5000/app", "docker://localhost:5000/app:latest"),
        (
            "docker://127.0.0.1:5000/a/b@sha256:" + "a" * 64,
            "docker://127.0.0.1:5000/a/b@sha256:" + "a" * 64,
        ),
    ],
)
def test_docker_references_are_normalised(url: str, source: str) -> None:
    assert normalize_reference(url) == source


@pytest.mark.parametrize(
    "url", ["docker://", "docker://Upper/Case", "docker://app:bad/tag", "docker://app@sha256:12"]
)
def test_malformed_docker_references_fail(url: str) -> None:
    with pytest.raises(ImportFailed):
        parse_docker_reference(url)


def test_loopback_registries_use_http_only() -> None:
    assert parse_docker_reference("docker://127.0.0.1:5000/a").is_loopback
    assert parse_docker_reference("docker://localhost/a").is_loopback
    assert parse_docker_reference("docker://[::1]:5000/a").is_loopback
    assert not parse_docker_reference("docker://example.com/a").is_loopback


def test_bearer_challenge_parsing() -> None:
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull,push"'
    )
    assert scheme == "bearer"
    assert params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:a/b:pull,push",
    }


# --------------------------------------------------------------------------- registry


def _docker_registry() -> str | None:
    found = shutil.which("docker-registry")
    if found:
        return found
    if shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "docker-registry"],
            capture_output=True,
            timeout=300,
            check=False,
        )
    return shutil.which("docker-registry")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Registry:
    url: str  # host:port
    process: subprocess.Popen[bytes]
    auth: tuple[str, str] | None = None

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=f"http://{self.url}", auth=self.auth, timeout=30)

    def push(
        self, name: str, tag: str, top: bytes, media_type: str, blobs: dict[str, bytes]
    ) -> None:
        """Push blobs and a manifest over the v2 API, as `docker push` does."""
        with self.client() as c:
            for digest, data in blobs.items():
                if c.head(f"/v2/{name}/blobs/{digest}").status_code == 200:
                    continue
                start = c.post(f"/v2/{name}/blobs/uploads/")
                assert start.status_code == 202, start.text
                location = start.headers["location"]
                sep = "&" if "?" in location else "?"
                done = c.put(
                    f"{location}{sep}digest={digest}",
                    content=data,
                    headers={"Content-Type": "application/octet-stream"},
                )
                assert done.status_code == 201, done.text
            if media_type in (OCI_INDEX, DOCKER_LIST):
                for m in json.loads(top)["manifests"]:
                    if m["platform"]["os"] == "unknown":
                        continue
                    body = blobs[m["digest"]]
                    r = c.put(
                        f"/v2/{name}/manifests/{m['digest']}",
                        content=body,
                        headers={"Content-Type": m["mediaType"]},
                    )
                    assert r.status_code == 201, r.text
            r = c.put(
                f"/v2/{name}/manifests/{tag}", content=top, headers={"Content-Type": media_type}
            )
            assert r.status_code == 201, r.text


@contextlib.contextmanager
def run_registry(tmp: Path, htpasswd: tuple[str, str] | None = None) -> Iterator[Registry]:
    binary = _docker_registry()
    if binary is None:
        pytest.skip("docker-registry is not installed and could not be installed with apt-get")
    port = _free_port()
    auth = ""
    if htpasswd is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt

            hashed = crypt.crypt(
                htpasswd[1], crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)
            )  # cost 4: fast
        (tmp / "htpasswd").write_text(f"{htpasswd[0]}:{hashed}\n")
        auth = f"auth:\n  htpasswd:\n    realm: test\n    path: {tmp / 'htpasswd'}\n"
    config = tmp / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {tmp / 'storage'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n" + auth
    )
    log = open(tmp / "registry.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    reg = Registry(f"127.0.0.1:{port}", proc, htpasswd)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"docker-registry exited: {(tmp / 'registry.log').read_text()[-500:]}")
            try:
                httpx.get(f"http://{reg.url}/v2/", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    pytest.fail("docker-registry did not start listening")
                time.sleep(0.05)
        yield reg
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with run_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


def test_pull_from_local_registry_by_tag_and_by_digest(
    tmp_path: Path, registry: Registry, image: Image
) -> None:
    registry.push("test/base", "v1", image.manifest, OCI_MANIFEST, image.blobs)
    lines: list[str] = []
    img = import_reference(
        f"docker://{registry.url}/test/base:v1", tmp_path / "work", progress=lines.append
    )
    assert img.source == f"docker://{registry.url}/test/base:v1"
    assert img.digest == image.digest
    check_base_image(img)
    assert [line.split()[0] for line in lines if line.startswith("layer ")] == ["layer"] * 3
    assert not (tmp_path / "work" / ".blobs").exists()

    pinned = import_reference(f"docker://{registry.url}/test/base@{image.digest}", tmp_path / "w2")
    assert pinned.digest == image.digest
    check_base_image(pinned)


def test_registry_multi_arch_index(tmp_path: Path, registry: Registry) -> None:
    amd = build_image([make_tar([f("arch", b"amd64")])], arch="amd64")
    arm = build_image([make_tar([f("arch", b"arm64")])], arch="arm64", variant="v8")
    index, blobs = build_index({("amd64", None): amd, ("arm64", "v8"): arm})
    registry.push("test/multi", "latest", index, OCI_INDEX, blobs)
    img = import_reference(
        f"docker://{registry.url}/test/multi", tmp_path / "w", platform=("linux", "arm64")
    )
    assert (img.layers[0] / "arch").read_bytes() == b"arm64"
    assert img.digest == arm.digest


def test_registry_unknown_image_and_tag_fail_with_one_line(
    tmp_path: Path, registry: Registry, image: Image
) -> None:
    registry.push("test/base", "v1", image.manifest, OCI_MANIFEST, image.blobs)
    with pytest.raises(ImportFailed, match="not found") as exc:
        import_reference(f"docker://{registry.url}/test/base:nope", tmp_path / "w")
    assert "\n" not in str(exc.value)
    with pytest.raises(ImportFailed, match="not found"):
        import_reference(f"docker://{registry.url}/no/such:v1", tmp_path / "w")
    assert not (tmp_path / "w" / "layers").exists()


def test_registry_that_is_not_listening_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ImportFailed, match="cannot reach registry"):
        import_reference(f"docker://127.0.0.1:{_free_port()}/a:b", tmp_path / "w")


def test_registry_with_htpasswd_basic_auth(tmp_path: Path, image: Image) -> None:
    (tmp_path / "reg").mkdir()
    with run_registry(tmp_path / "reg", htpasswd=("alice", "s3cret")) as reg:
        reg.push("private/app", "v1", image.manifest, OCI_MANIFEST, image.blobs)
        url = f"docker://{reg.url}/private/app:v1"
        with pytest.raises(ImportFailed, match="requires credentials"):
            import_reference(url, tmp_path / "w1")
        with pytest.raises(ImportFailed, match="access denied"):
            import_reference(url, tmp_path / "w2", credentials=("alice", "wrong"))
        img = import_reference(url, tmp_path / "w3", credentials=("alice", "s3cret"))
        check_base_image(img)


class BearerFront:
    """A token service and blob-storage redirect in front of the real registry.

    The local registry has neither; this transport adds them: requests without the
    token get a Bearer challenge, the token endpoint checks basic credentials, and blob
    GETs are redirected to another origin that must not receive the Authorization header.
    """

    def __init__(self, registry: Registry, credentials: tuple[str, str] | None) -> None:
        self.backend = httpx.Client(base_url=f"http://{registry.url}", timeout=30)
        self.credentials = credentials
        self.token_requests: list[httpx.URL] = []
        self.storage_headers: list[httpx.Headers] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.test":
            self.token_requests.append(request.url)
            if self.credentials is not None:
                expected = httpx.BasicAuth(*self.credentials)
                want = next(expected.auth_flow(httpx.Request("GET", "http://x"))).headers
                if request.headers.get("authorization") != want["authorization"]:
                    return httpx.Response(401)
            return httpx.Response(200, json={"token": "tok-123"})
        if request.url.host == "storage.test":
            self.storage_headers.append(request.headers)
            return self._forward(request.url.path, request)
        if request.headers.get("authorization") != "Bearer tok-123":
            return httpx.Response(
                401,
                headers={
                    "WWW-Authenticate": 'Bearer realm="http://auth.test/token",'
                    'service="registry.test",scope="repository:test/base:pull"'
                },
                json={"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
            )
        if "/blobs/" in request.url.path:
            return httpx.Response(
                307, headers={"Location": f"http://storage.test{request.url.path}"}
            )
        return self._forward(request.url.path, request)

    def _forward(self, path: str, request: httpx.Request) -> httpx.Response:
        r = self.backend.get(path, headers={"Accept": request.headers.get("accept", "*/*")})
        return httpx.Response(
            r.status_code,
            headers={"Content-Type": r.headers.get("content-type", "")},
            content=r.content,
        )


@pytest.mark.parametrize("credentials", [None, ("bob", "pw")], ids=["anonymous", "basic"])
def test_bearer_token_flow_and_storage_redirect(
    tmp_path: Path, registry: Registry, image: Image, credentials: tuple[str, str] | None
) -> None:
    registry.push("test/base", "v1", image.manifest, OCI_MANIFEST, image.blobs)
    front = BearerFront(registry, credentials)
    img = import_reference(
        f"docker://{registry.url}/test/base:v1",
        tmp_path / "w",
        credentials=credentials,
        transport=httpx.MockTransport(front),
    )
    check_base_image(img)
    assert front.token_requests
    assert front.token_requests[0].params["service"] == "registry.test"
    assert front.token_requests[0].params["scope"] == "repository:test/base:pull"
    assert len(front.storage_headers) == 4  # config + 3 layers, all via the redirect
    assert all("authorization" not in h for h in front.storage_headers)


def test_layer_written_by_gnu_tar_keeps_xattrs_setuid_hardlinks(tmp_path: Path) -> None:
    if shutil.which("tar") is None:
        pytest.skip("GNU tar is not installed")
    src = tmp_path / "src"
    (src / "usr/bin").mkdir(parents=True)
    (src / "usr/bin/su").write_bytes(b"su")
    os.chown(src / "usr/bin/su", 0, 0)
    os.chmod(src / "usr/bin/su", 0o4755)
    os.link(src / "usr/bin/su", src / "usr/bin/su2")
    os.symlink("su", src / "usr/bin/su3")
    (src / "data").write_bytes(b"d" * 70_000)
    os.setxattr(src / "data", "user.note", b"kept")
    os.chown(src / "data", 123, 456)
    os.utime(src / "data", (MTIME, MTIME))
    layer = tmp_path / "layer.tar.gz"
    subprocess.run(
        [
            "tar",
            "--xattrs",
            "--xattrs-include=*",
            "--format=posix",
            "--numeric-owner",
            "-C",
            str(src),
            "-czf",
            str(layer),
            ".",
        ],
        check=True,
    )
    dest = tmp_path / "dest"
    assert convert_layer(layer, dest, compression="auto") == 70_002  # the hard link adds nothing
    su = lst(dest / "usr/bin/su")
    assert stat.S_IMODE(su.st_mode) == 0o4755
    assert su.st_ino == lst(dest / "usr/bin/su2").st_ino
    assert os.readlink(dest / "usr/bin/su3") == "su"
    data = lst(dest / "data")
    assert (data.st_uid, data.st_gid, int(data.st_mtime)) == (123, 456, MTIME)
    assert os.getxattr(dest / "data", "user.note") == b"kept"


def test_registry_docker_manifest_list_and_schema2(tmp_path: Path, registry: Registry) -> None:
    amd = build_image(base_layers(), arch="amd64", docker=True)
    arm = build_image([make_tar([f("arch", b"arm64")])], arch="arm64", variant="v8", docker=True)
    index, blobs = build_index({("amd64", None): amd, ("arm64", "v8"): arm}, docker=True)
    registry.push("test/dockerlist", "v1", index, DOCKER_LIST, blobs)
    img = import_reference(
        f"docker://{registry.url}/test/dockerlist:v1", tmp_path / "w", platform=("linux", "amd64")
    )
    assert img.digest == amd.digest
    check_base_image(img)


def test_uncompressed_oci_layers(tmp_path: Path) -> None:
    plain = build_image(base_layers(), compress=False)
    layout = write_layout(tmp_path / "layout", plain.blobs, plain.manifest, OCI_MANIFEST, "v1")
    check_base_image(import_reference(f"oci:{layout}:v1", tmp_path / "work"))


def test_progress_callback_exception_aborts_and_cleans_up(tmp_path: Path, image: Image) -> None:
    layout = write_layout(tmp_path / "layout", image.blobs, image.manifest, OCI_MANIFEST, "v1")

    class Cancelled(Exception):
        pass

    def progress(line: str) -> None:
        if line.startswith("layer 2/"):
            raise Cancelled

    with pytest.raises(Cancelled):
        import_reference(f"oci:{layout}:v1", tmp_path / "work", progress=progress)
    assert os.listdir(tmp_path / "work") == []


def test_implicit_parent_dirs_are_0755_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        dest = convert(tmp_path, [f("deep/er/file", b"x", mode=0o644)])
    finally:
        os.umask(old)
    assert stat.S_IMODE(lst(dest).st_mode) == 0o755
    assert stat.S_IMODE(lst(dest / "deep").st_mode) == 0o755
    assert stat.S_IMODE(lst(dest / "deep/er").st_mode) == 0o755
    assert stat.S_IMODE(lst(dest / "deep/er/file").st_mode) == 0o644


def test_pull_progress_is_throttled_per_layer(
    tmp_path: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    import contree_shell.sandbox.oci_registry as oci_registry

    big = make_tar([f("blob", os.urandom(6_000_000))])  # incompressible: ~6 chunks of 1 MiB
    image = build_image([big])
    registry.push("test/big", "v1", image.manifest, OCI_MANIFEST, image.blobs)

    class Clock:
        """Each look at the clock is 0.3 s later: throttling decides, not real time."""

        now = 0.0

        def monotonic(self) -> float:
            self.now += 0.3
            return self.now

    monkeypatch.setattr(oci_registry, "time", Clock())
    lines: list[str] = []
    import_reference(f"docker://{registry.url}/test/big:v1", tmp_path / "w", progress=lines.append)
    pulling = [line for line in lines if line.startswith("pulling ")]
    assert pulling, lines
    for line in pulling:
        assert re.fullmatch(r"pulling sha256:[0-9a-f]{12}… \d+\.\d MB/6\.\d MB", line), line
    # one line at most every 0.5 s of (fake) time: every other chunk here
    assert 2 <= len(pulling) <= 4, pulling
    assert [line for line in lines if line.startswith("layer ")] == [
        f"layer 1/1 sha256:{json.loads(image.manifest)['layers'][0]['digest'][7:19]}… done "
        "(6.0 MB unpacked)"
    ]
