"""ImageView: the pure-Python overlay resolver over hand-built layers (real files, root)."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from contree_shell.sandbox.inspect import (
    ImageView,
    NotADirectory,
    NotAFile,
    PathNotFound,
    SymlinkLoop,
    format_ls,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts and trusted xattrs need root")


def write(root: Path, rel: str, data: str | bytes = "", mode: int = 0o644) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chmod(p, mode)
    return p


def whiteout(root: Path, rel: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(p, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def opaque(root: Path, rel: str) -> None:
    p = root / rel
    p.mkdir(parents=True, exist_ok=True)
    os.setxattr(p, "trusted.overlay.opaque", b"y")


@pytest.fixture
def layers(tmp_path: Path) -> list[Path]:
    """bottom: a small distro-ish tree; middle: edits; top: more edits."""
    bottom, middle, top = (tmp_path / n for n in ("l0", "l1", "l2"))
    for d in (bottom, middle, top):
        d.mkdir()
    write(bottom, "etc/passwd", "root:x:0:0::/root:/bin/sh\n")
    write(bottom, "etc/hostname", "image-host\n")
    write(bottom, "etc/motd", "old motd\n")
    write(bottom, "etc/gone", "deleted later\n")
    write(bottom, "usr/share/doc/a/README", "a")
    write(bottom, "usr/share/doc/b/README", "b")
    write(bottom, "usr/bin/tool", "#!/bin/sh\n", 0o755)
    os.symlink("usr/bin", bottom / "bin")
    write(bottom, "opt/data/keep", "lower keep")
    write(bottom, "opt/data/hidden", "lower hidden")

    write(middle, "etc/motd", "new motd\n")
    whiteout(middle, "etc/gone")
    opaque(middle, "usr/share/doc")
    write(middle, "usr/share/doc/NEW", "only this")
    write(middle, "usr/bin/other", "x", 0o755)

    write(top, "opt/data/top", "top file")
    whiteout(top, "opt/data/hidden")
    write(top, "etc/passwd", "root:x:0:0:top:/root:/bin/sh\n")
    return [bottom, middle, top]


def test_topmost_layer_wins_for_a_file(layers: list[Path]) -> None:
    view = ImageView(layers)
    assert view.read("/etc/motd") == b"new motd\n"
    assert view.read("/etc/passwd").startswith(b"root:x:0:0:top")
    assert view.read("/etc/hostname") == b"image-host\n"


def test_char_device_whiteout_hides_lower_file(layers: list[Path]) -> None:
    view = ImageView(layers)
    with pytest.raises(PathNotFound):
        view.stat("/etc/gone")
    _, entries = view.listdir("/etc")
    assert [e.name for e in entries] == ["hostname", "motd", "passwd"]


def test_opaque_dir_stops_the_merge(layers: list[Path]) -> None:
    view = ImageView(layers)
    path, entries = view.listdir("/usr/share/doc")
    assert path == "/usr/share/doc"
    assert [e.name for e in entries] == ["NEW"]
    with pytest.raises(PathNotFound):
        view.read("/usr/share/doc/a/README")


def test_dirs_merge_across_layers_sorted_by_name(layers: list[Path]) -> None:
    view = ImageView(layers)
    _, entries = view.listdir("/opt/data")
    assert [e.name for e in entries] == ["keep", "top"]
    _, entries = view.listdir("/usr/bin")
    assert [(e.name, e.is_regular) for e in entries] == [("other", True), ("tool", True)]


def test_listdir_follows_symlinked_dir_and_returns_normalized_path(layers: list[Path]) -> None:
    view = ImageView(layers)
    path, entries = view.listdir("/bin")
    assert path == "/usr/bin"
    assert [e.name for e in entries] == ["other", "tool"]
    assert view.listdir("usr//bin/./")[0] == "/usr/bin"  # relative resolves against /


def test_entry_stat_uses_lstat(layers: list[Path]) -> None:
    view = ImageView(layers)
    link = view.stat("/bin", follow=False)
    assert link.is_symlink and link.symlink_to == "usr/bin" and not link.is_dir
    assert view.stat("/bin").is_dir
    _, root = view.listdir("/")
    bin_entry = next(e for e in root if e.name == "bin")
    assert bin_entry.is_symlink and bin_entry.symlink_to == "usr/bin"
    tool = view.stat("/usr/bin/tool")
    assert stat.S_IMODE(tool.mode) == 0o755 and tool.is_regular and tool.size == 10
    assert tool.uid == 0 and tool.gid == 0 and tool.nlink >= 1 and tool.mtime > 0


def test_errors_for_wrong_kinds_and_missing(layers: list[Path]) -> None:
    view = ImageView(layers)
    with pytest.raises(NotADirectory):
        view.listdir("/etc/passwd")
    with pytest.raises(NotAFile):
        view.read("/etc")
    with pytest.raises(PathNotFound):
        view.read("/nope")
    with pytest.raises(PathNotFound):
        view.stat("/etc/passwd/child")  # a file in the middle of a path


def test_oci_style_whiteouts_are_accepted(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lo", tmp_path / "up"
    write(lower, "a/x", "x")
    write(lower, "a/y", "y")
    write(lower, "b/z", "z")
    write(upper, "a/.wh.x")
    write(upper, "b/.wh..wh..opq")
    write(upper, "b/new", "n")
    view = ImageView([lower, upper])
    assert [e.name for e in view.listdir("/a")[1]] == ["y"]
    assert [e.name for e in view.listdir("/b")[1]] == ["new"]
    with pytest.raises(PathNotFound):
        view.read("/a/x")
    with pytest.raises(PathNotFound):
        view.read("/b/z")


def test_user_xattr_opaque_is_accepted(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lo", tmp_path / "up"
    write(lower, "d/old", "o")
    (upper / "d").mkdir(parents=True)
    os.setxattr(upper / "d", "user.overlay.opaque", b"y")
    assert ImageView([lower, upper]).listdir("/d")[1] == []


def test_directory_replaced_by_file_hides_lower_dir(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lo", tmp_path / "up"
    write(lower, "thing/inner", "i")
    write(upper, "thing", "now a file")
    view = ImageView([lower, upper])
    assert view.read("/thing") == b"now a file"
    with pytest.raises(PathNotFound):
        view.stat("/thing/inner")


# ------------------------------------------------------------------- escape attempts


@pytest.fixture
def hostile(tmp_path: Path) -> ImageView:
    """An image full of links that would escape if resolved on the host."""
    layer = tmp_path / "layer"
    write(layer, "etc/hostname", "inside\n")
    write(layer, "home/u/file", "home file")
    (layer / "home/u/sub").mkdir()
    write(layer, "home/u/sub/x", "sub x")
    os.symlink("/etc/shadow", layer / "shadow")  # exists on the host, not in the image
    os.symlink("/etc/hostname", layer / "hostname")
    os.symlink("../../../../../../../etc/hostname", layer / "home/u/deep")
    os.symlink("../../../../../../../etc", layer / "home/u/etcdir")
    os.symlink("chain2", layer / "chain1")
    os.symlink("/chain3", layer / "chain2")
    os.symlink("home/u/file", layer / "chain3")
    os.symlink("loop2", layer / "loop1")
    os.symlink("loop1", layer / "loop2")
    os.symlink("home/u/sub", layer / "tosub")
    os.symlink(str(tmp_path), layer / "hostdir")  # absolute host path of the store
    return ImageView([layer])


def test_dotdot_never_leaves_the_image_root(hostile: ImageView) -> None:
    assert Path("/etc/passwd").exists()
    with pytest.raises(PathNotFound):
        hostile.read("../../etc/passwd")
    with pytest.raises(PathNotFound):
        hostile.read("/../../../../etc/passwd")
    assert hostile.read("../../etc/hostname") == b"inside\n"


def test_absolute_symlink_resolves_inside_image(hostile: ImageView) -> None:
    assert Path("/etc/shadow").exists()
    with pytest.raises(PathNotFound):
        hostile.read("/shadow")
    assert hostile.read("/hostname") == b"inside\n"


def test_relative_symlink_climbing_out_stays_inside(hostile: ImageView) -> None:
    assert hostile.read("/home/u/deep") == b"inside\n"
    path, entries = hostile.listdir("/home/u/etcdir")
    assert path == "/etc" and [e.name for e in entries] == ["hostname"]


def test_symlink_chains_resolve_and_loops_fail(hostile: ImageView) -> None:
    assert hostile.read("/chain1") == b"home file"
    with pytest.raises(SymlinkLoop):
        hostile.read("/loop1")
    with pytest.raises(PathNotFound):  # SymlinkLoop is a PathNotFound for callers
        hostile.stat("/loop1/x")
    assert hostile.stat("/loop1", follow=False).symlink_to == "loop2"


def test_dotdot_after_symlink_applies_to_the_target(hostile: ImageView) -> None:
    # /tosub -> home/u/sub, so /tosub/.. is /home/u (not /).
    assert hostile.read("/tosub/../file") == b"home file"
    assert hostile.normalize("/tosub/..") == "/home/u"


def test_host_absolute_path_symlink_is_not_followed_to_host(
    hostile: ImageView, tmp_path: Path
) -> None:
    with pytest.raises(PathNotFound):
        hostile.listdir("/hostdir")
    with pytest.raises(PathNotFound):
        hostile.read(str(tmp_path / "layer/etc/hostname"))


def test_open_streams_a_regular_file(tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    write(tmp_path / "l", "big.bin", data)
    view = ImageView([tmp_path / "l"])
    with view.open("/big.bin") as f:
        assert f.read(10) == data[:10]
        assert f.read() == data[10:]


def test_listdir_of_large_dir_is_fast(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lo", tmp_path / "up"
    for i in range(1000):
        write(lower, f"usr/bin/tool{i:04d}", "x")
    for i in range(0, 1000, 10):
        whiteout(upper, f"usr/bin/tool{i:04d}")
    view = ImageView([lower, upper])
    view.listdir("/usr/bin")  # warm the dentry cache
    t0 = time.perf_counter()
    _, entries = view.listdir("/usr/bin")
    elapsed = time.perf_counter() - t0
    assert len(entries) == 900
    assert elapsed < 0.5  # a few ms in practice; generous for loaded CI hosts


# ------------------------------------------------------------------------ text listing


def test_format_ls_rows_look_like_ls(layers: list[Path]) -> None:
    view = ImageView(layers)
    os.utime(layers[0] / "usr/bin/tool", (0, 1_000_000_000))
    _, entries = view.listdir("/")
    text = format_ls("/", entries, now=time.time())
    lines = text.splitlines()
    assert lines[0].startswith("total ")
    bin_row = next(line for line in lines if line.endswith("bin -> usr/bin"))
    assert bin_row.startswith("lrwxrwxrwx ")
    etc_row = next(line for line in lines if line.endswith(" etc"))
    assert etc_row.startswith("drwxr-xr-x ")
    _, bins = view.listdir("/usr/bin")
    tool_row = format_ls("/usr/bin", bins).splitlines()[2]
    assert tool_row.startswith("-rwxr-xr-x 1 0 0 10 ")
    assert " 2001 tool" in tool_row  # old files show the year


def test_format_ls_of_empty_dir() -> None:
    assert format_ls("/empty", []) == "total 0\n"


def test_format_ls_accepts_entries_alone(layers: list[Path]) -> None:
    _, entries = ImageView(layers).listdir("/etc")
    assert format_ls(entries) == format_ls("/etc", entries)


def test_walk_visits_merged_dirs_depth_first_without_following_links(
    layers: list[Path],
) -> None:
    view = ImageView(layers)
    walked = {path: [e.name for e in entries] for path, entries in view.walk("/")}
    assert list(walked)[:3] == ["/", "/etc", "/opt"]
    assert walked["/usr/share/doc"] == ["NEW"]  # opaque
    assert walked["/opt/data"] == ["keep", "top"]  # whiteout applied
    assert "/bin" not in walked and "/usr/share/doc/a" not in walked
    assert [p for p, _ in view.walk("/bin")] == ["/usr/bin"]
    with pytest.raises(NotADirectory):
        next(view.walk("/etc/passwd"))


def test_device_nodes_report_their_number_and_are_not_files(tmp_path: Path) -> None:
    layer = tmp_path / "l"
    (layer / "dev").mkdir(parents=True)
    os.mknod(layer / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    view = ImageView([layer])
    null = view.stat("/dev/null")
    assert stat.S_ISCHR(null.mode) and null.rdev == os.makedev(1, 3)
    with pytest.raises(NotAFile):
        view.read("/dev/null")


def test_trailing_slash_follows_a_final_symlink(layers: list[Path]) -> None:
    view = ImageView(layers)
    assert view.stat("/bin", follow=False).is_symlink
    assert view.stat("/bin/", follow=False).is_dir
