"""archive: streamed PAX tars of image paths, read back with Python's tarfile (real layers)."""

from __future__ import annotations

import gzip
import io
import os
import socket
import stat
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from contree_shell.sandbox.archive import (
    NotArchivable,
    archive_check,
    archive_filename,
    iter_archive,
)
from contree_shell.sandbox.inspect import ImageView, NotAFile, PathNotFound

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts and device nodes need root")

T_OLD = 1_500_000_000
T_NEW = 1_700_000_000


def write(root: Path, rel: str, data: str | bytes = "", mode: int = 0o644, mtime: int = T_OLD):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chmod(p, mode)
    os.utime(p, (mtime, mtime))
    return p


def whiteout(root: Path, rel: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(p, stat.S_IFCHR | 0o000, os.makedev(0, 0))


@pytest.fixture
def view(tmp_path: Path) -> ImageView:
    """bottom: a small distro; top: edits with a whiteout, an opaque dir, odd files."""
    bottom, top = tmp_path / "l0", tmp_path / "l1"
    bottom.mkdir()
    top.mkdir()
    write(bottom, "etc/passwd", "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/a:/bin/sh\n")
    write(bottom, "etc/group", "root:x:0:\nstaff:x:50:\n")
    write(bottom, "etc/hosts", "127.0.0.1 localhost\n")
    write(bottom, "etc/gone", "deleted in the top layer\n")
    write(bottom, "usr/bin/true", b"\x7fELF-true", 0o755)
    os.link(bottom / "usr/bin/true", bottom / "usr/bin/also-true")  # a hardlink pair
    os.symlink("usr/bin", bottom / "bin")
    write(bottom, "opt/app/old", "hidden by the opaque dir")
    write(bottom, "home/alice/notes", "mine", 0o600)
    os.chown(bottom / "home/alice/notes", 1000, 50)
    os.chown(bottom / "home/alice", 1000, 1000)

    whiteout(top, "etc/gone")
    (top / "opt/app").mkdir(parents=True)
    os.setxattr(top / "opt/app", "trusted.overlay.opaque", b"y")
    write(top, "opt/app/new", "only this", 0o640, mtime=T_NEW)
    os.setxattr(top / "opt/app/new", "user.comment", b"hello xattr")
    write(top, "etc/hosts", "10.0.0.1 top\n", mtime=T_NEW)
    os.symlink("/etc/passwd", top / "etc/pw-link")
    os.mknod(top / "etc/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.chmod(top / "etc/null", 0o666)
    os.mkfifo(top / "etc/fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(top / "etc/sock"))
    sock.close()
    os.utime(top / "opt/app", (T_NEW, T_NEW))
    return ImageView([bottom, top])


def members(view: ImageView, path: str, **kw) -> dict[str, tarfile.TarInfo]:
    data = b"".join(iter_archive(view, path, **kw))
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return {m.name: m for m in tf.getmembers()}


def content(view: ImageView, path: str, member: str) -> bytes:
    data = b"".join(iter_archive(view, path))
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        f = tf.extractfile(member)
        assert f is not None
        return f.read()


def test_directory_members_are_rooted_at_its_basename(view: ImageView) -> None:
    names = list(members(view, "/etc"))
    assert names[0] == "etc"
    assert all(n == "etc" or n.startswith("etc/") for n in names)
    assert {"etc/passwd", "etc/hosts", "etc/pw-link", "etc/null", "etc/fifo"} <= set(names)


def test_members_come_depth_first_in_name_order(view: ImageView) -> None:
    names = list(members(view, "/"))
    assert names == [
        "bin",
        "etc",
        "etc/fifo",
        "etc/group",
        "etc/hosts",
        "etc/null",
        "etc/passwd",
        "etc/pw-link",
        "home",
        "home/alice",
        "home/alice/notes",
        "opt",
        "opt/app",
        "opt/app/new",
        "usr",
        "usr/bin",
        "usr/bin/also-true",
        "usr/bin/true",
    ]


def test_root_gives_relative_names_without_a_root_member(view: ImageView) -> None:
    names = set(members(view, "/"))
    assert "etc/passwd" in names
    assert not any(n.startswith(("/", "./")) or n in ("", ".") for n in names)


def test_whiteouts_and_opaque_dirs_hide_lower_files(view: ImageView) -> None:
    names = set(members(view, "/"))
    assert "etc/gone" not in names
    assert "opt/app/old" not in names
    assert "opt/app/new" in names


def test_single_file_is_one_member_named_by_its_basename(view: ImageView) -> None:
    m = members(view, "/etc/hosts")
    assert list(m) == ["hosts"]
    assert content(view, "/etc/hosts", "hosts") == b"10.0.0.1 top\n"


def test_requested_symlinks_resolve_inside_the_image(view: ImageView) -> None:
    # /bin → usr/bin: the directory is archived under the requested name.
    m = members(view, "/bin")
    assert set(m) == {"bin", "bin/true", "bin/also-true"}
    assert m["bin"].isdir()
    assert content(view, "/bin/true", "true") == b"\x7fELF-true"
    # The absolute symlink /etc/pw-link → /etc/passwd stays inside the image.
    assert content(view, "/etc/pw-link", "pw-link").startswith(b"root:x:0:0")


def test_types_modes_owners_and_mtimes_round_trip(view: ImageView) -> None:
    m = members(view, "/")
    new = m["opt/app/new"]
    assert new.isreg() and new.mode == 0o640 and new.mtime == T_NEW and new.size == 9
    assert m["usr/bin/true"].mode == 0o755
    notes = m["home/alice/notes"]
    assert (notes.uid, notes.gid, notes.uname, notes.gname) == (1000, 50, "alice", "staff")
    assert (m["home/alice"].uname, m["home/alice"].gname) == ("alice", "")
    assert (m["etc/hosts"].uname, m["etc/hosts"].gname) == ("root", "root")
    assert m["etc/hosts"].mtime == T_NEW and m["etc/passwd"].mtime == T_OLD
    assert m["opt/app"].isdir() and m["opt/app"].mtime == T_NEW


def test_symlinks_are_stored_not_followed(view: ImageView) -> None:
    m = members(view, "/")
    assert m["etc/pw-link"].issym() and m["etc/pw-link"].linkname == "/etc/passwd"
    assert m["bin"].issym() and m["bin"].linkname == "usr/bin"


def test_special_files_become_device_and_fifo_members_sockets_are_skipped(
    view: ImageView,
) -> None:
    m = members(view, "/etc")
    null = m["etc/null"]
    assert null.ischr() and (null.devmajor, null.devminor) == (1, 3) and null.mode == 0o666
    assert m["etc/fifo"].isfifo()
    assert "etc/sock" not in m


def test_hardlinks_sharing_an_inode_become_link_members(view: ImageView) -> None:
    m = members(view, "/usr")
    assert m["usr/bin/also-true"].isreg() and m["usr/bin/also-true"].size == 9
    assert m["usr/bin/true"].islnk() and m["usr/bin/true"].linkname == "usr/bin/also-true"
    # Extracting the link member gives the shared content.
    data = b"".join(iter_archive(view, "/usr"))
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        f = tf.extractfile("usr/bin/true")
        assert f is not None and f.read() == b"\x7fELF-true"


def test_xattrs_are_schily_records_without_overlay_markers(view: ImageView) -> None:
    m = members(view, "/opt")
    assert m["opt/app/new"].pax_headers.get("SCHILY.xattr.user.comment") == "hello xattr"
    assert not any("overlay" in k for k in m["opt/app"].pax_headers)


def test_long_and_non_utf8_names_survive(tmp_path: Path) -> None:
    layer = tmp_path / "l"
    deep = "d" * 120 + "/" + "e" * 120
    write(layer, deep + "/file", "x")
    os.makedirs(layer / "raw", exist_ok=True)
    with open(os.fsencode(layer / "raw") + b"/caf\xe9", "wb") as f:
        f.write(b"latin1 name")
    m = members(ImageView([layer]), "/")
    assert deep + "/file" in m
    raw = [n for n in m if n.startswith("raw/")]
    assert [os.fsencode(n) for n in raw] == [b"raw/caf\xe9"]


def test_gzip_wraps_the_same_tar(view: ImageView) -> None:
    plain = b"".join(iter_archive(view, "/etc"))
    packed = b"".join(iter_archive(view, "/etc", gzip=True))
    assert packed[:2] == b"\x1f\x8b"
    assert gzip.decompress(packed) == plain
    with tarfile.open(fileobj=io.BytesIO(packed), mode="r:gz") as tf:
        assert "etc/hosts" in tf.getnames()


def test_stream_is_pax_padded_to_whole_records(view: ImageView) -> None:
    data = b"".join(iter_archive(view, "/opt"))
    assert len(data) % 10240 == 0
    assert data.endswith(bytes(1024))
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        assert tf.format == tarfile.PAX_FORMAT or any(m.pax_headers for m in tf.getmembers())


def test_chunks_stay_near_the_requested_size(view: ImageView, tmp_path: Path) -> None:
    chunks = list(iter_archive(view, "/", chunk=4096))
    assert all(len(c) <= 4096 * 2 for c in chunks)


def test_a_large_file_streams_with_bounded_memory(tmp_path: Path) -> None:
    layer = tmp_path / "big"
    layer.mkdir()
    size = 50 * 1024 * 1024
    with open(layer / "blob", "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(50):
            f.write(block)
    view = ImageView([layer])
    total = 0
    tracemalloc.start()
    try:
        for chunk in iter_archive(view, "/blob"):
            total += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total >= size + 512
    assert peak < 2 * 1024 * 1024, f"peak traced memory {peak} bytes"


def test_check_normalizes_and_rejects_what_cannot_be_archived(view: ImageView) -> None:
    assert archive_check(view, "etc/../etc/hosts") == "/etc/hosts"
    assert archive_check(view, "/") == "/"
    assert archive_check(view, "/bin") == "/bin"
    with pytest.raises(PathNotFound):
        archive_check(view, "/etc/gone")
    with pytest.raises(PathNotFound):
        archive_check(view, "/opt/app/old")
    for special in ("/etc/fifo", "/etc/sock", "/etc/null"):
        with pytest.raises(NotArchivable):
            archive_check(view, special)
    assert issubclass(NotArchivable, NotAFile)


def test_iter_archive_fails_before_the_first_byte(view: ImageView) -> None:
    it = iter_archive(view, "/nope")
    with pytest.raises(PathNotFound):
        next(it)


def test_archive_check_result_archives_the_same_members(view: ImageView) -> None:
    for p in ("/bin", "/bin/true", "/etc/", "/"):
        assert members(view, archive_check(view, p)).keys() == members(view, p).keys()


def test_filename_replaces_slashes(view: ImageView) -> None:
    assert archive_filename("/bin/true") == "bin_true.tar"
    assert archive_filename("/etc/") == "etc.tar"
    assert archive_filename("/") == "root.tar"
    assert archive_filename("/etc", gzip=True) == "etc.tar.gz"
    assert archive_filename('/a"b\\c\n') == "a_b_c_.tar"
