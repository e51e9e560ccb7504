"""snapshot.prune: removing no-op copy-ups from an upper dir (real files, real overlay)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from contree_shell.sandbox.inspect import ImageView
from contree_shell.sandbox.snapshot import is_empty, prune, same_bytes

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts and trusted xattrs need root")


def write(root: Path, rel: str, data: str | bytes = "", mode: int = 0o644) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chmod(p, mode)
    return p


def copy_up(lower: Path, upper: Path, rel: str) -> Path:
    """What overlay's copy-up leaves: same content and metadata, parents copied too."""
    src, dst = lower / rel, upper / rel
    for parent in reversed(Path(rel).parents[:-1]):
        d = upper / parent
        if not d.exists():
            d.mkdir()
            shutil.copystat(lower / parent, d)
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    else:
        shutil.copy2(src, dst)
        os.setxattr(dst, "trusted.overlay.origin", b"\x00fake-origin")
    return dst


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def lower(tmp_path: Path) -> Path:
    lo = tmp_path / "lower"
    write(lo, "etc/passwd", "root:x:0:0::/root:/bin/sh\n")
    write(lo, "etc/big", b"A" * 300_000)
    write(lo, "usr/bin/tool", "#!/bin/sh\necho\n", 0o755)
    os.symlink("tool", lo / "usr/bin/alias")
    (lo / "tmp").mkdir()
    os.chmod(lo / "tmp", 0o1777)
    (lo / "var/empty").mkdir(parents=True)
    write(lo, "var/full/file", "f")
    return lo


@pytest.fixture
def upper(tmp_path: Path) -> Path:
    up = tmp_path / "upper"
    up.mkdir()
    return up


def test_same_content_copy_up_is_pruned(lower: Path, upper: Path) -> None:
    copy_up(lower, upper, "etc/passwd")
    copy_up(lower, upper, "etc/big")
    copy_up(lower, upper, "usr/bin/alias")
    stats = prune(upper, ImageView([lower]))
    assert is_empty(upper), tree(upper)
    assert stats.kept == 0 and stats.removed == 6  # 3 leaves + etc, usr, usr/bin


def test_create_then_delete_leaves_nothing(lower: Path, upper: Path) -> None:
    # `mkdir /tmp/d; touch /tmp/d/f; rm -r /tmp/d` leaves the copied-up /tmp with a new mtime.
    (upper / "tmp").mkdir()
    os.chmod(upper / "tmp", 0o1777)
    os.utime(upper / "tmp", (12345, 12345))
    # A leftover whiteout of a name that never existed below (kernel creates these).
    os.mknod(upper / "tmp/ghost", stat.S_IFCHR, os.makedev(0, 0))
    prune(upper, ImageView([lower]))
    assert is_empty(upper), tree(upper)


def test_touch_mtime_only_counts_as_unchanged_by_default(lower: Path, upper: Path) -> None:
    f = copy_up(lower, upper, "etc/passwd")
    os.utime(f, (2_000_000_000, 2_000_000_000))
    prune(upper, ImageView([lower]))
    assert is_empty(upper)


def test_touch_mtime_only_is_kept_with_keep_mtime_only(lower: Path, upper: Path) -> None:
    f = copy_up(lower, upper, "etc/passwd")
    os.utime(f, (2_000_000_000, 2_000_000_000))
    prune(upper, ImageView([lower]), keep_mtime_only=True)
    assert tree(upper) == ["etc", "etc/passwd"]


def test_chmod_counts_as_a_change(lower: Path, upper: Path) -> None:
    f = copy_up(lower, upper, "usr/bin/tool")
    os.chmod(f, 0o700)
    prune(upper, ImageView([lower]))
    assert tree(upper) == ["usr", "usr/bin", "usr/bin/tool"]


def test_chown_counts_as_a_change(lower: Path, upper: Path) -> None:
    f = copy_up(lower, upper, "etc/passwd")
    os.chown(f, 1000, 1000)
    prune(upper, ImageView([lower]))
    assert tree(upper) == ["etc", "etc/passwd"]


def test_same_size_different_bytes_is_kept(lower: Path, upper: Path) -> None:
    f = copy_up(lower, upper, "etc/big")
    with open(f, "r+b") as fh:
        fh.seek(299_999)
        fh.write(b"B")
    prune(upper, ImageView([lower]))
    assert tree(upper) == ["etc", "etc/big"]


def test_new_xattr_counts_as_a_change(lower: Path, upper: Path) -> None:
    f = copy_up(lower, upper, "etc/passwd")
    os.setxattr(f, "user.note", b"hi")
    prune(upper, ImageView([lower]))
    assert tree(upper) == ["etc", "etc/passwd"]


def test_retargeted_symlink_is_kept(lower: Path, upper: Path) -> None:
    (upper / "usr/bin").mkdir(parents=True)
    os.symlink("other", upper / "usr/bin/alias")
    prune(upper, ImageView([lower]))
    assert tree(upper) == ["usr", "usr/bin", "usr/bin/alias"]


def test_whiteout_of_existing_name_is_kept(lower: Path, upper: Path) -> None:
    (upper / "etc").mkdir()
    os.mknod(upper / "etc/passwd", stat.S_IFCHR, os.makedev(0, 0))
    prune(upper, ImageView([lower]))
    assert tree(upper) == ["etc", "etc/passwd"]


def test_new_file_is_kept_and_parent_dir_stays(lower: Path, upper: Path) -> None:
    write(upper, "tmp/new", "n")
    os.chmod(upper / "tmp", 0o1777)
    prune(upper, ImageView([lower]))
    assert tree(upper) == ["tmp", "tmp/new"]


def test_opaque_dir_over_non_empty_lower_is_kept(lower: Path, upper: Path) -> None:
    (upper / "var/full").mkdir(parents=True)
    os.setxattr(upper / "var/full", "trusted.overlay.opaque", b"y")
    prune(upper, ImageView([lower]))
    assert tree(upper) == ["var", "var/full"]


def test_opaque_dir_over_empty_lower_is_pruned(lower: Path, upper: Path) -> None:
    (upper / "var/empty").mkdir(parents=True)
    os.setxattr(upper / "var/empty", "trusted.overlay.opaque", b"y")
    prune(upper, ImageView([lower]))
    assert is_empty(upper)


def test_file_replacing_dir_is_kept(lower: Path, upper: Path) -> None:
    write(upper, "var/empty", "")
    prune(upper, ImageView([lower]))
    assert tree(upper) == ["var", "var/empty"]


def test_copy_up_matching_a_middle_layer_is_pruned(tmp_path: Path, lower: Path) -> None:
    middle = tmp_path / "middle"
    write(middle, "etc/passwd", "changed in the middle\n")
    up = tmp_path / "up"
    write(up, "etc/passwd", "changed in the middle\n")
    prune(up, ImageView([lower, middle]))
    assert is_empty(up)


def test_same_bytes_stops_at_first_difference(tmp_path: Path) -> None:
    a = write(tmp_path, "a", b"x" * 100 + b"1")
    b = write(tmp_path, "b", b"x" * 100 + b"2")
    assert not same_bytes(str(a), str(b), 101)
    assert same_bytes(str(a), str(a), 101)


# ----------------------------------------------------------------- real kernel overlay


def _overlay(lower: Path, tmp_path: Path, script: str) -> Path:
    """Mount overlay in a private mount namespace, run ``script`` in the merged dir."""
    up, work, merged = tmp_path / "ov-up", tmp_path / "ov-work", tmp_path / "ov-merged"
    for d in (up, work, merged):
        d.mkdir()
    opts = f"lowerdir={lower},upperdir={up},workdir={work}"
    cmd = f"mount -t overlay overlay -o {opts} {merged} && cd {merged} && {script}"
    subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", cmd], check=True)
    return up


@pytest.mark.parametrize(
    ("script", "changed"),
    [
        ("cat etc/passwd >/dev/null", False),
        ("exec 3<>etc/passwd", False),  # copy-up without a write
        ("mkdir tmp/d && touch tmp/d/f && rm -r tmp/d", False),
        ("touch etc/passwd", False),
        ("chmod 600 etc/passwd", True),
        ("rm etc/passwd", True),
        ("rm -r var/full && mkdir var/full", True),
        ("echo x >> etc/passwd", True),
    ],
)
def test_real_overlay_upper_is_pruned_to_what_changed(
    lower: Path, tmp_path: Path, script: str, changed: bool
) -> None:
    up = _overlay(lower, tmp_path, script)
    prune(up, ImageView([lower]))
    assert (not is_empty(up)) == changed, tree(up)


# ------------------------------------------------------------------------ flatten

_TREE_SCRIPT = r"""
import hashlib, json, os, stat, sys
root = sys.argv[1]
out = {}
for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames + filenames:
        p = os.path.join(dirpath, name)
        st = os.lstat(p)
        xattrs = {n: os.getxattr(p, n, follow_symlinks=False).hex()
                  for n in sorted(os.listxattr(p, follow_symlinks=False))
                  if not n.startswith(("trusted.overlay.", "user.overlay."))}
        body = None
        if stat.S_ISREG(st.st_mode):
            body = hashlib.sha256(open(p, "rb").read()).hexdigest()
        out[os.path.relpath(p, root)] = [
            st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_rdev,
            os.readlink(p) if stat.S_ISLNK(st.st_mode) else "", xattrs, body,
            None if stat.S_ISDIR(st.st_mode) else st.st_size,
        ]
print(json.dumps(out, sort_keys=True))
"""


def _tree(root: Path) -> dict[str, list[object]]:
    import json
    import sys

    out = subprocess.run([sys.executable, "-c", _TREE_SCRIPT, str(root)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return dict(json.loads(out.stdout))


def _overlay_tree(layers: list[Path], mnt: Path) -> dict[str, list[object]]:
    """The merged view as the kernel shows it (read-only overlay, private mount ns)."""
    import json
    import sys

    lowers = ":".join(str(p) for p in reversed(layers))
    mnt.mkdir()
    out = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f'mount -t overlay overlay -o ro,lowerdir={lowers} {mnt} && '
         f'exec "{sys.executable}" -c "$0" {mnt}', _TREE_SCRIPT],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return dict(json.loads(out.stdout))


def test_flatten_copies_the_merged_view_exactly_as_overlayfs_shows_it(tmp_path: Path) -> None:
    l0, l1, l2 = (tmp_path / n for n in ("l0", "l1", "l2"))
    # bottom: every file type, owners, modes, xattrs, a hardlink pair
    f = write(l0, "etc/passwd", "root\n", 0o644)
    os.chown(f, 12, 34)
    os.setxattr(f, "user.note", b"kept")
    os.setxattr(f, "security.capability", bytes.fromhex("0100000200200000000000000000000000000000"))
    s = write(l0, "bin/suid", "x", 0o755)
    os.chown(s, 0, 50)
    os.chmod(s, 0o4755)  # after chown: chown clears set-id bits
    write(l0, "bin/tool", "tool", 0o755)
    os.link(l0 / "bin/tool", l0 / "bin/tool-alias")
    os.symlink("tool", l0 / "bin/link")
    os.mknod(l0 / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(l0 / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    os.mkfifo(l0 / "fifo", 0o640)
    os.mknod(l0 / "sock", stat.S_IFSOCK | 0o755)
    write(l0, "old/a", "a")
    write(l0, "opq/gone", "hidden by opaque")
    write(l0, "del", "deleted above")
    # middle: whiteouts (file and dir), opaque dir, rewrite, new dir with metadata
    write(l1, "etc/passwd", "root\nuser\n", 0o600)
    os.mknod(l1 / "del", stat.S_IFCHR, os.makedev(0, 0))
    os.mknod(l1 / "old", stat.S_IFCHR, os.makedev(0, 0))
    (l1 / "opq").mkdir()
    os.setxattr(l1 / "opq", "trusted.overlay.opaque", b"y")
    write(l1, "opq/new", "new")
    os.setxattr(l1 / "etc", "trusted.overlay.origin", b"\x00junk")
    (l1 / "srv").mkdir(mode=0o750)
    os.setxattr(l1 / "srv", "user.dir", b"d")
    # top: re-create the whited-out name as a dir, plus a fresh file
    (l2 / "old").mkdir(parents=True)
    os.setxattr(l2 / "old", "trusted.overlay.opaque", b"y")
    write(l2, "old/b", "b")
    write(l2, "top", "t")
    for n, d in enumerate([l0 / "etc", l1 / "etc", l1 / "srv", l2 / "old", l0 / "bin"]):
        os.utime(d, ns=(1_000_000_000 + n, 2_000_000_000 + n))
    os.utime(l0 / "bin/link", ns=(5, 6), follow_symlinks=False)
    layers = [l0, l1, l2]

    dest = tmp_path / "flat"
    dest.mkdir()
    from contree_shell.sandbox.snapshot import flatten

    seen: list[int] = []
    stats = flatten(layers, dest, on_entry=lambda st: seen.append(st.entries))
    assert stats.entries == len(seen) == len(_tree(dest))
    assert stats.bytes > 0
    assert _tree(dest) == _overlay_tree(layers, tmp_path / "mnt")
    assert os.stat(dest / "bin/tool").st_ino == os.stat(dest / "bin/tool-alias").st_ino
    for dirpath, dirnames, filenames in os.walk(dest):  # no overlay bookkeeping left
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            assert not [x for x in os.listxattr(p, follow_symlinks=False)
                        if x.startswith("trusted.overlay.")], p  # fmt: skip
            st = os.lstat(p)
            assert not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0), p
    assert sorted(os.listdir(dest / "opq")) == ["new"]
    assert sorted(os.listdir(dest / "old")) == ["b"]


def test_flatten_resolves_oci_style_whiteouts(tmp_path: Path) -> None:
    from contree_shell.sandbox.snapshot import flatten

    l0, l1 = tmp_path / "l0", tmp_path / "l1"
    write(l0, "a/x", "x")
    write(l0, "a/y", "y")
    write(l0, "b/z", "z")
    write(l1, "a/.wh.x")
    write(l1, "b/.wh..wh..opq")
    write(l1, "b/w", "w")
    dest = tmp_path / "flat"
    dest.mkdir()
    flatten([l0, l1], dest)
    assert sorted(os.listdir(dest / "a")) == ["y"]
    assert sorted(os.listdir(dest / "b")) == ["w"]
