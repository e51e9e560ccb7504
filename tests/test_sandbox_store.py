"""Store: images, tags, layers, commit/discard/recover on real directories (root)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from contree_shell.sandbox.bootstrap import build_busybox_rootfs
from contree_shell.sandbox.inspect import ImageView
from contree_shell.sandbox.store import (
    MAX_LAYERS,
    ImageNotFound,
    InvalidTag,
    PathNotFound,
    RunDir,
    Store,
    TagNotFound,
    validate_tag,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the layer store tests run as root")


def make_rootfs(path: Path) -> Path:
    (path / "etc").mkdir(parents=True)
    (path / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (path / "etc/hosts").write_text("127.0.0.1 localhost\n")
    (path / "bin").mkdir()
    (path / "bin/app").write_text("app v1\n")
    return path


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


@pytest.fixture
def base(store: Store, tmp_path: Path) -> str:
    return store.add_rootfs(make_rootfs(store.make_tmp()), tag="base:latest")


def test_store_creates_its_layout(store: Store) -> None:
    for name in ("layers", "runs", "tmp", "images.db"):
        assert (store.root / name).exists()
    mode = store._db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_add_rootfs_creates_engine_mount_points(store: Store, base: str) -> None:
    (layer,) = store.layer_paths(base)
    for d in ("proc", "dev", "sys", "tmp", "etc"):
        assert (layer / d).is_dir(), d
    assert stat.S_IMODE((layer / "tmp").stat().st_mode) == 0o1777
    assert (layer / "etc/hostname").read_bytes() == b""
    assert (layer / "etc/resolv.conf").read_bytes() == b""
    assert (layer / "etc/hosts").read_text() == "127.0.0.1 localhost\n"  # existing file kept
    rec = store.get(base)
    assert rec.parent is None and rec.tags == ["base:latest"] and len(rec.layers) == 1
    assert rec.config == {"env": {}, "workdir": None, "user": None}
    assert store.resolve_tag("base:latest") == base


def test_add_rootfs_from_another_filesystem_copies_everything(store: Store) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(store.root).st_dev:
        pytest.skip("needs a second filesystem")
    src = shm / f"contree-test-rootfs-{os.getpid()}"
    make_rootfs(src)
    os.link(src / "bin/app", src / "bin/app-hardlink")
    os.mknod(src / "etc/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.symlink("app", src / "bin/link")
    os.setxattr(src / "bin/app", "user.origin", b"test")
    uuid = store.add_rootfs(src, tag=None, config={"env": {"A": "1"}, "workdir": "/srv"})
    assert not src.exists()
    (layer,) = store.layer_paths(uuid)
    assert os.stat(layer / "bin/app").st_ino == os.stat(layer / "bin/app-hardlink").st_ino
    dev = os.lstat(layer / "etc/null")
    assert stat.S_ISCHR(dev.st_mode) and dev.st_rdev == os.makedev(1, 3)
    assert os.readlink(layer / "bin/link") == "app"
    assert os.getxattr(layer / "bin/app", "user.origin") == b"test"
    assert store.get(uuid).config["env"] == {"A": "1"}
    assert store.get(uuid).config["workdir"] == "/srv"


def test_add_rootfs_rejects_bad_tag_before_touching_anything(store: Store, tmp_path: Path) -> None:
    src = make_rootfs(tmp_path / "rootfs")
    with pytest.raises(InvalidTag):
        store.add_rootfs(src, tag="-bad")
    assert src.exists() and store.list() == []


# -------------------------------------------------------------------------------- tags


@pytest.mark.parametrize(
    "tag",
    [
        "busybox:latest",
        "common/python-ml/python:3.11-slim",
        "ghcr.io/owner/image:tag",
        "a",
        "A_b-9",
    ],
)
def test_valid_tags(tag: str) -> None:
    assert validate_tag(tag) == tag


@pytest.mark.parametrize("tag", ["", "-x", "a:", "a::b", "a b", ":a", "a/", "a\n", "é"])
def test_invalid_tags(tag: str) -> None:
    with pytest.raises(InvalidTag):
        validate_tag(tag)


def test_set_tag_moves_it_from_another_image(store: Store, base: str) -> None:
    other = store.add_rootfs(make_rootfs(store.make_tmp()), tag=None)
    store.set_tag(other, "base:latest")
    assert store.resolve_tag("base:latest") == other
    assert store.get(base).tags == []
    assert store.get(other).tags == ["base:latest"]


def test_set_tag_errors(store: Store, base: str) -> None:
    with pytest.raises(InvalidTag):
        store.set_tag(base, "bad tag")
    with pytest.raises(ImageNotFound):
        store.set_tag("00000000-0000-0000-0000-000000000000", "x")
    with pytest.raises(TagNotFound):
        store.resolve_tag("nope")


def test_remove_one_tag_or_all(store: Store, base: str) -> None:
    store.set_tag(base, "b")
    store.set_tag(base, "c")
    store.remove_tag(base, "b")
    assert store.get(base).tags == ["base:latest", "c"]
    with pytest.raises(TagNotFound):
        store.remove_tag(base, "b")
    store.remove_tag(base, None)
    assert store.get(base).tags == []
    with pytest.raises(ImageNotFound):
        store.remove_tag("missing", None)


# ------------------------------------------------------------------------------- list


def test_list_one_row_per_image_tag_newest_first(store: Store) -> None:
    a = store.add_rootfs(make_rootfs(store.make_tmp()), tag="alpha")
    b = store.add_rootfs(make_rootfs(store.make_tmp()), tag=None)
    c = store.add_rootfs(make_rootfs(store.make_tmp()), tag="gamma:1")
    store.set_tag(c, "gamma:2")
    rows = [(rec.uuid, tag) for rec, tag in store.list()]
    assert rows == [(c, "gamma:1"), (c, "gamma:2"), (b, None), (a, "alpha")]
    assert store.list()[0][0].tags == ["gamma:1", "gamma:2"]


def test_list_filters_and_pagination(store: Store) -> None:
    a = store.add_rootfs(make_rootfs(store.make_tmp()), tag="busybox:latest")
    b = store.add_rootfs(make_rootfs(store.make_tmp()), tag=None)
    c = store.add_rootfs(make_rootfs(store.make_tmp()), tag="debian:bookworm")
    store.set_tag(a, "busybox:1.36")

    def ids(**kw: object) -> list[tuple[str, str | None]]:
        return [(rec.uuid, tag) for rec, tag in store.list(**kw)]  # type: ignore[arg-type]

    assert ids(tagged=True) == [(c, "debian:bookworm"), (a, "busybox:1.36"), (a, "busybox:latest")]
    assert ids(tag_prefix="busybox:") == [(a, "busybox:1.36"), (a, "busybox:latest")]
    assert ids(tag_prefix="deb") == [(c, "debian:bookworm")]
    assert ids(tag_prefix="b%") == []  # no LIKE wildcards
    assert ids(uuid=b) == [(b, None)]
    assert ids(limit=2) == [(c, "debian:bookworm"), (b, None)]
    assert ids(limit=2, offset=2) == [(a, "busybox:1.36"), (a, "busybox:latest")]
    assert ids(offset=10) == []
    now = datetime.now(UTC)
    assert len(ids(since=now - timedelta(minutes=1))) == 4
    assert ids(since=now + timedelta(minutes=1)) == []
    assert ids(until=now - timedelta(minutes=1)) == []
    naive_local_now = datetime.now() + timedelta(seconds=1)  # the SDK sends naive local time
    assert len(ids(until=naive_local_now)) == 4


# ----------------------------------------------------------------------------- commit


def test_commit_of_empty_upper_keeps_parent(store: Store, base: str) -> None:
    run = store.new_run()
    assert run.upper.is_dir() and run.work.is_dir()
    result = store.commit(base, run, operation_uuid="op-1")
    assert (result.image, result.changed, result.size_bytes) == (base, False, 0)
    assert not run.path.exists()
    assert len(store.list()) == 1


def test_commit_of_no_op_copy_up_keeps_parent(store: Store, base: str) -> None:
    (layer,) = store.layer_paths(base)
    run = store.new_run()
    (run.upper / "etc").mkdir()
    os.chmod(run.upper / "etc", os.stat(layer / "etc").st_mode & 0o7777)
    (run.upper / "etc/passwd").write_bytes((layer / "etc/passwd").read_bytes())
    os.chmod(run.upper / "etc/passwd", os.stat(layer / "etc/passwd").st_mode & 0o7777)
    assert store.commit(base, run, operation_uuid=None).image == base


def test_commit_with_change_makes_new_image_and_leaves_parent_untouched(
    store: Store, base: str
) -> None:
    parent_layers = store.layer_paths(base)
    run = store.new_run()
    (run.upper / "bin").mkdir()
    (run.upper / "bin/app").write_text("app v2\n")
    os.mknod(run.upper / "etc", stat.S_IFCHR, os.makedev(0, 0))  # rm -r /etc
    result = store.commit(base, run, operation_uuid="op-2")
    assert result.changed and result.image != base
    assert result.size_bytes == len("app v2\n")
    child = store.get(result.image)
    assert child.parent == base and child.operation_uuid == "op-2" and child.tags == []
    assert child.layers[:-1] == store.get(base).layers
    assert store.layer_paths(base) == parent_layers
    assert store.view(base).read("/bin/app") == b"app v1\n"
    assert store.view(result.image).read("/bin/app") == b"app v2\n"
    assert [e.name for e in store.view(result.image).listdir("/")[1]] == sorted(
        ["bin", "dev", "proc", "sys", "tmp"]
    )
    assert not run.path.exists()


def test_config_change_alone_makes_new_image_with_same_layers(store: Store, base: str) -> None:
    cfg = {"env": {"PATH": "/bin"}, "workdir": "/root", "user": None}
    result = store.commit(base, store.new_run(), operation_uuid="op", config=cfg)
    assert result.changed and result.image != base and result.size_bytes == 0
    child = store.get(result.image)
    assert child.layers == store.get(base).layers and child.config == cfg
    same = store.commit(result.image, store.new_run(), operation_uuid="op", config=dict(cfg))
    assert not same.changed and same.image == result.image


def test_commit_at_the_kernel_layer_limit_squashes_the_parent_first(
    store: Store, base: str
) -> None:
    layers = [store.get(base).layers[0]] * MAX_LAYERS
    with store._lock:
        deep = store._insert(base, layers, None, {"env": {}, "workdir": None, "user": None})
    assert len(store.layer_paths(deep)) == MAX_LAYERS
    run = store.new_run()
    (run.upper / "new").write_text("x")
    child = store.commit(deep, run, operation_uuid=None).image
    assert len(store.get(deep).layers) <= store.squash_threshold
    assert len(store.get(child).layers) == len(store.get(deep).layers) + 1
    assert store.view(child).read("/new") == b"x"
    assert store.view(child).read("/bin/app") == b"app v1\n"
    assert store.view(deep).read("/bin/app") == b"app v1\n"
    assert not run.path.exists()


def test_commit_of_unknown_parent(store: Store) -> None:
    with pytest.raises(ImageNotFound):
        store.commit("nope", store.new_run(), operation_uuid=None)


def test_concurrent_commits_get_distinct_images(store: Store, base: str) -> None:
    results: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(10):
            run = store.new_run()
            (run.upper / f"f{n}-{i}").write_text(str(i))
            r = store.commit(base, run, operation_uuid=None)
            with lock:
                results.append(r.image)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 40
    assert len(os.listdir(store.layers_dir)) == 41


# ------------------------------------------------------------------ discard and recover


def test_discard_copes_with_overlay_mode_000_work_dirs(store: Store, base: str) -> None:
    run = store.new_run()
    lowers = ":".join(str(p) for p in store.layer_paths(base))
    merged = run.path / "merged"
    merged.mkdir()
    opts = f"lowerdir={lowers},upperdir={run.upper},workdir={run.work}"
    subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f"mount -t overlay overlay -o {opts} {merged} && echo hi > {merged}/tmp/x"],
        check=True,
    )  # fmt: skip
    (run.work / "incompat/volatile").mkdir(parents=True)
    os.chmod(run.work / "incompat/volatile", 0)
    os.chmod(run.work / "incompat", 0)
    assert stat.S_IMODE(os.stat(run.work / "work").st_mode) == 0
    store.discard(run)
    assert not run.path.exists()


def test_recover_removes_runs_tmp_and_orphan_layers(store: Store, base: str) -> None:
    run = store.new_run()
    (run.upper / "f").write_text("x")
    store.make_tmp()
    orphan = store.layers_dir / "deadbeef0000"  # a crash between rename and insert
    orphan.mkdir()
    (orphan / "file").write_text("x")
    store.recover()
    assert os.listdir(store.runs_dir) == [] and os.listdir(store.tmp_dir) == []
    assert os.listdir(store.layers_dir) == store.get(base).layers
    assert store.view(base).read("/bin/app") == b"app v1\n"


def test_reopening_the_store_keeps_images_and_tags(store: Store, base: str) -> None:
    store.close()
    again = Store(store.root)
    assert again.resolve_tag("base:latest") == base
    assert json.dumps(again.get(base).layers)


def test_busybox_rootfs_becomes_a_runnable_image(store: Store) -> None:
    rootfs = store.make_tmp()
    build_busybox_rootfs(rootfs)
    uuid = store.add_rootfs(rootfs, tag="busybox:latest")
    view = store.view(uuid)
    assert view.stat("/bin/sh", follow=False).symlink_to == "busybox"
    assert view.stat("/bin/sh").is_regular
    (layer,) = store.layer_paths(uuid)
    out = subprocess.run(
        ["chroot", str(layer), "/bin/sh", "-c", "echo ok; ls /usr/bin/env"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.splitlines() == ["ok", "/usr/bin/env"]


def test_store_reexports_the_path_errors_of_inspect() -> None:
    from contree_shell.sandbox import inspect, store

    assert store.PathNotFound is inspect.PathNotFound
    assert store.NotADirectory is inspect.NotADirectory
    assert store.NotAFile is inspect.NotAFile


def _run_in_overlay(store: Store, image: str, script: str) -> RunDir:
    """A run as the engine does it: overlay of the image's layers over a fresh upper."""
    run = store.new_run()
    lowers = ":".join(str(p) for p in reversed(store.layer_paths(image)))  # top first
    merged = run.path / "merged"
    merged.mkdir()
    opts = f"lowerdir={lowers},upperdir={run.upper},workdir={run.work}"
    subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f"mount -t overlay overlay -o {opts} {merged} && cd {merged} && {script}"],
        check=True,
    )  # fmt: skip
    merged.rmdir()
    return run


def test_real_overlay_runs_chain_into_images(store: Store, base: str) -> None:
    first = store.commit(base, _run_in_overlay(store, base, "echo hi > tmp/x && rm etc/passwd"),
                         operation_uuid="op-a")  # fmt: skip
    assert first.changed
    view = store.view(first.image)
    assert view.read("/tmp/x") == b"hi\n"
    with pytest.raises(PathNotFound):
        view.stat("/etc/passwd")
    noop = store.commit(
        first.image, _run_in_overlay(store, first.image, "cat tmp/x bin/app >/dev/null"),
        operation_uuid="op-b",
    )  # fmt: skip
    assert (noop.image, noop.changed) == (first.image, False)
    second = store.commit(
        first.image, _run_in_overlay(store, first.image, "mkdir -p srv && echo v2 > bin/app"),
        operation_uuid="op-c",
    )  # fmt: skip
    assert second.changed and len(store.get(second.image).layers) == 3
    assert store.view(second.image).read("/bin/app") == b"v2\n"
    assert store.view(first.image).read("/bin/app") == b"app v1\n"


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv not installed")
def test_force_rmtree_works_unprivileged_on_mode_000_dirs() -> None:
    # pytest's tmp_path lives under a 0700 root dir the unprivileged user cannot enter.
    tmp_path = Path(tempfile.mkdtemp(prefix="contree-rmtree-"))
    run = tmp_path / "run"
    (run / "work/work/x").mkdir(parents=True)
    (run / "work/work/x/f").write_text("")
    (run / "work/incompat/volatile").mkdir(parents=True)
    # The repository (and its virtualenv) may sit under a directory that user cannot
    # enter either: give it its own copy of the package, which needs only the stdlib.
    repo = Path(__file__).resolve().parent.parent
    shutil.copytree(repo / "contree_shell", tmp_path / "pkg" / "contree_shell",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    subprocess.run(["chown", "-R", "65534:65534", str(tmp_path)], check=True)
    for d in ("work/work", "work/incompat/volatile", "work/incompat"):
        os.chmod(run / d, 0)
    as_nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    try:
        python = next(
            (exe for exe in (sys.executable, "/usr/bin/python3")
             if subprocess.run([*as_nobody, exe, "-c", "pass"], capture_output=True,
                               cwd="/", check=False).returncode == 0),
            None,
        )  # fmt: skip
        if python is None:
            pytest.skip("no Python interpreter is runnable as uid 65534 here")
        code = (
            f"import sys; sys.path.insert(0, {str(tmp_path / 'pkg')!r}); "
            "from pathlib import Path; from contree_shell.sandbox.store import force_rmtree; "
            f"force_rmtree(Path({str(run)!r}))"
        )
        subprocess.run([*as_nobody, python, "-c", code], check=True, cwd="/")
        assert not run.exists()
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


# ------------------------------------------------------------------------- squashing

_OVERLAY_XATTRS = ("trusted.overlay.", "user.overlay.")


def _xattrs(path: str) -> dict[str, bytes]:
    names = os.listxattr(path, follow_symlinks=False)
    return {
        n: os.getxattr(path, n, follow_symlinks=False)
        for n in sorted(names)
        if not n.startswith(_OVERLAY_XATTRS)
    }


def dump(store: Store, uuid: str) -> dict[str, tuple[object, ...]]:
    """Everything the merged view of the image shows: every path with type, mode, owner,
    mtime, link target, device, xattrs and file bytes.

    Directory size and link counts are left out: a directory's size and nlink describe
    one layer's own directory, not the merged view (overlayfs reports nlink 1 for a
    merged directory), and a file's nlink counts names in its layer, some of which a
    higher layer may hide (a flattened copy counts only the visible ones). Hardlinks
    that are visible are checked separately."""
    view = store.view(uuid)
    out: dict[str, tuple[object, ...]] = {}
    for dir_path, entries in view.walk("/"):
        for e in entries:
            path = dir_path.rstrip("/") + "/" + e.name
            body: bytes | None = None
            if e.is_regular:
                with open(e.host_path, "rb") as f:
                    body = f.read()
            out[path] = (
                e.mode, e.uid, e.gid, e.mtime, e.symlink_to, e.rdev,
                None if e.is_dir else e.size, _xattrs(e.host_path), body,
            )  # fmt: skip
    return out


def _same_dir_as(upper_dir: Path, view_path: str, store: Store, parent: str) -> None:
    """Create ``upper_dir`` as overlay's copy-up of the lower directory would: same
    mode, owner and mtime, so it only carries what is put inside it."""
    st = store.view(parent).stat(view_path)
    upper_dir.mkdir(exist_ok=True)
    os.chmod(upper_dir, stat.S_IMODE(st.mode))
    os.chown(upper_dir, st.uid, st.gid)
    os.utime(upper_dir, (st.mtime, st.mtime))


def build_chain(store: Store, base: str, depth: int) -> list[str]:
    """``depth`` committed images on top of ``base``, each run's upper written by hand the
    way overlayfs would: new files of every type, rewrites, whiteouts of files and whole
    directories, opaque directories, hardlinks, xattrs and owners."""
    chain = [base]
    for i in range(1, depth + 1):
        parent = chain[-1]
        run = store.new_run(parent)
        up = run.upper
        data = up / "data"
        if i == 1:
            data.mkdir()
            os.chmod(data, 0o755)
            os.utime(data, (1_000_000, 1_000_000))
        else:
            _same_dir_as(data, "/data", store, parent)
        f = data / f"f{i}"
        f.write_bytes(f"layer {i}\n".encode() * (i % 5 + 1))
        os.chmod(f, 0o600 + (i % 8) * 0o10)
        if i % 23 == 0:
            os.setxattr(f, "user.k", f"v{i}".encode())
            os.chown(f, 1000 + i, 2000 + i)
        if i % 13 == 0:
            os.link(f, data / f"h{i}")
        if i % 11 == 0:
            os.symlink(f"f{i}", data / f"l{i}")
        if i % 17 == 0:
            os.mkfifo(data / f"p{i}")
        if i % 19 == 0:
            os.mknod(data / f"c{i}", stat.S_IFCHR | 0o640, os.makedev(1, 3))
        if i % 9 == 0 and i > 1:  # rewrite an older file
            (data / f"f{i - 1}").write_text(f"rewritten by {i}\n")
        if i % 7 == 0 and i > 3 and (i - 3) % 13 != 0:  # rm an older file
            os.mknod(data / f"f{i - 3}", stat.S_IFCHR, os.makedev(0, 0))
        if i % 25 == 0:  # rm -rf /data/sub && mkdir /data/sub
            sub = data / "sub"
            sub.mkdir()
            os.setxattr(sub, "trusted.overlay.opaque", b"y")
            os.setxattr(sub, "user.dirattr", f"{i}".encode())
            (sub / f"only{i}").write_text(f"opaque {i}\n")
            os.utime(sub, (2_000_000 + i, 2_000_000 + i))
        elif i % 3 == 0:
            sub = data / "sub"
            try:
                _same_dir_as(sub, "/data/sub", store, parent)
            except PathNotFound:
                sub.mkdir()
            (sub / f"s{i}").write_text(f"sub {i}\n")
        if i % 29 == 5:
            (up / f"old{i}").mkdir()
            (up / f"old{i}" / "x").write_text("old\n")
        if i % 29 == 20:  # rm -rf the dir made 15 layers ago
            os.mknod(up / f"old{i - 15}", stat.S_IFCHR, os.makedev(0, 0))
        os.utime(f, (1_500_000 + i, 1_500_000 + i))
        os.utime(data, (1_000_000, 1_000_000))
        result = store.commit(parent, run, operation_uuid=f"op-{i}")
        assert result.changed, i
        chain.append(result.image)
    return chain


@pytest.fixture
def small_store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store", squash_threshold=8)


def test_squash_of_a_300_layer_chain_keeps_every_image_identical(tmp_path: Path) -> None:
    store = Store(tmp_path / "store", squash_threshold=64)
    base = store.add_rootfs(make_rootfs(store.make_tmp()), tag="base")
    chain = build_chain(store, base, 300)
    assert len(store.get(chain[-1]).layers) == 301
    before = {uuid: dump(store, uuid) for uuid in chain}
    # the chain really exercises the merge rules
    tip = before[chain[-1]]
    assert "/data/f4" not in tip and "/data/f5" in tip  # whiteout from layer 7
    assert "/data/old5" not in tip and "/data/old34" not in tip  # whited-out dirs
    assert sorted(p for p in tip if p.startswith("/data/sub/")) == [
        "/data/sub/only300"  # opaque at 300 hides every earlier s*/only*
    ]
    assert "/data/sub/s27" in before[chain[27]] and "/data/sub/only25" in before[chain[27]]
    assert "/data/sub/s21" not in before[chain[27]]
    assert tip["/data/h39"][-1] == tip["/data/f39"][-1] == b"layer 39\n" * 5

    layers_before = {uuid: store.get(uuid).layers for uuid in chain}
    for uuid in chain:  # oldest first, as the background squasher sees them
        depth = len(store.get(uuid).layers)
        assert store.squash(uuid) == (depth > 64)
    built = [e for e in store.squash_log if e.built]
    reused = [e for e in store.squash_log if not e.built]
    assert built and reused and len(built) < 10

    for uuid in chain:
        rec = store.get(uuid)
        assert rec.uuid == uuid and len(rec.layers) <= 64
        assert not store.squash_needed(uuid)
        assert dump(store, uuid) == before[uuid], uuid
        if len(layers_before[uuid]) <= 64:  # below the threshold nothing moved
            assert rec.layers == layers_before[uuid]

    # Every layer is still the top of its own image: history is kept, nothing to free.
    assert store.gc(min_age=0) == 0
    kept = [*chain[::50], chain[-1]]
    for uuid in chain:
        if uuid not in kept:
            store.delete_image(uuid)
    assert store.gc(min_age=0) > 50
    used = {lid for rec, _ in store.list(limit=1000) for lid in rec.layers}
    assert set(os.listdir(store.layers_dir)) == used
    for uuid in kept:
        assert dump(store, uuid) == before[uuid], uuid
    view = store.view(chain[-1])
    assert view.read("/data/f300") == b"layer 300\n" * 1
    h39, f39 = view.stat("/data/h39"), view.stat("/data/f39")
    assert os.stat(h39.host_path).st_ino == os.stat(f39.host_path).st_ino  # still linked
    assert h39.nlink == 2
    assert view.stat("/data/h26").nlink == 1  # its other name was replaced in layer 27
    assert view.stat("/data/f299").mode & 0o777 == 0o600 + 3 * 0o10
    assert stat.S_ISFIFO(view.stat("/data/p289").mode)
    assert view.stat("/data/c285").rdev == os.makedev(1, 3)
    assert view.stat("/data/f276").uid == 1276


def test_squashed_layer_is_flat_and_has_no_overlay_markers(small_store: Store) -> None:
    base = small_store.add_rootfs(make_rootfs(small_store.make_tmp()), tag=None)
    chain = build_chain(small_store, base, 30)
    small_store.squash(chain[-1])
    bottom = small_store.layer_paths(chain[-1])[0]
    for dirpath, dirnames, filenames in os.walk(bottom):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            assert not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0), p  # no whiteouts
            assert not [n for n in os.listxattr(p, follow_symlinks=False)
                        if n.startswith(_OVERLAY_XATTRS)], p  # fmt: skip
    assert stat.S_IMODE(os.stat(bottom / "tmp").st_mode) == 0o1777  # mount points kept


def test_branches_sharing_a_prefix_reuse_one_squashed_layer(small_store: Store) -> None:
    base = small_store.add_rootfs(make_rootfs(small_store.make_tmp()), tag=None)
    trunk = build_chain(small_store, base, 8)  # 9 layers at the tip: one over
    branches = []
    for name in ("a", "b"):
        run = small_store.new_run(trunk[-1])
        (run.upper / name).write_text(name)
        branches.append(small_store.commit(trunk[-1], run, operation_uuid=None).image)
    assert small_store.squash(branches[0]) and small_store.squash(branches[1])
    la, lb = small_store.get(branches[0]).layers, small_store.get(branches[1]).layers
    assert la[0] == lb[0] and la[1:-1] == lb[1:-1] and la[-1] != lb[-1]
    assert [e.built for e in small_store.squash_log] == [True, False]
    assert small_store.squash(trunk[-1])  # the trunk tip has the same prefix: reused too
    assert small_store.get(trunk[-1]).layers[0] == la[0]
    assert small_store.view(branches[1]).read("/b") == b"b"
    with pytest.raises(PathNotFound):
        small_store.view(branches[1]).stat("/a")


def test_squash_below_the_threshold_changes_nothing(small_store: Store) -> None:
    base = small_store.add_rootfs(make_rootfs(small_store.make_tmp()), tag=None)
    chain = build_chain(small_store, base, 7)
    assert not small_store.squash_needed(chain[-1])
    before = small_store.get(chain[-1]).layers
    assert small_store.squash(chain[-1]) is False
    assert small_store.get(chain[-1]).layers == before
    with pytest.raises(ImageNotFound):
        small_store.squash_needed("nope")
    assert small_store.squash("nope") is False


def test_background_squasher_bounds_the_stack_of_new_commits(small_store: Store) -> None:
    base = small_store.add_rootfs(make_rootfs(small_store.make_tmp()), tag=None)
    small_store.start_background_squash()
    small_store.start_background_squash()  # idempotent
    try:
        chain = build_chain(small_store, base, 40)
        assert small_store.wait_for_squash(timeout=60)
        for uuid in chain:
            assert not small_store.squash_needed(uuid), uuid
        assert small_store.view(chain[-1]).read("/data/f40") == b"layer 40\n"
    finally:
        small_store.stop()
    assert small_store._squasher is None


def test_background_squasher_picks_up_deep_images_from_before_start(
    small_store: Store,
) -> None:
    base = small_store.add_rootfs(make_rootfs(small_store.make_tmp()), tag=None)
    chain = build_chain(small_store, base, 12)
    assert small_store.squash_needed(chain[-1])
    small_store.start_background_squash()
    try:
        assert small_store.wait_for_squash(timeout=60)
    finally:
        small_store.close()
    again = Store(small_store.root, squash_threshold=8)
    assert not any(again.squash_needed(u) for u in chain)


def test_concurrent_commits_while_squashing_keep_every_image_right(small_store: Store) -> None:
    base = small_store.add_rootfs(make_rootfs(small_store.make_tmp()), tag=None)
    trunk = build_chain(small_store, base, 6)
    small_store.start_background_squash()
    tips: dict[int, list[str]] = {}

    def worker(n: int) -> None:
        image = trunk[-1]
        mine = []
        for i in range(25):
            run = small_store.new_run(image)
            (run.upper / f"w{n}-{i}").write_text(f"{n}/{i}")
            image = small_store.commit(image, run, operation_uuid=None).image
            mine.append(image)
        tips[n] = mine

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert small_store.wait_for_squash(timeout=120)
    finally:
        small_store.stop()
    assert small_store.wait_for_squash(timeout=0)  # not running: nothing to wait for
    for n, images in tips.items():
        for i, uuid in enumerate(images):
            assert not small_store.squash_needed(uuid)
            names = {e.name for e in small_store.view(uuid).listdir("/")[1]}
            mine = {x for x in names if x.startswith("w")}
            assert mine == {f"w{n}-{j}" for j in range(i + 1)}, (n, i)
            assert small_store.view(uuid).read(f"/w{n}-{i}") == f"{n}/{i}".encode()
    assert any(e.built for e in small_store.squash_log)
    small_store.gc(min_age=0)
    used = {lid for rec, _ in small_store.list(limit=1000) for lid in rec.layers}
    assert set(os.listdir(small_store.layers_dir)) == used


def test_env_sets_the_squash_threshold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTREE_SQUASH_THRESHOLD", "12")
    assert Store(tmp_path / "a").squash_threshold == 12
    monkeypatch.setenv("CONTREE_SQUASH_THRESHOLD", "100000")
    assert Store(tmp_path / "b").squash_threshold == MAX_LAYERS - 1
    monkeypatch.delenv("CONTREE_SQUASH_THRESHOLD")
    assert Store(tmp_path / "c").squash_threshold == 64


# ------------------------------------------------------------------------------ gc


def test_gc_keeps_the_layers_a_live_run_mounted(small_store: Store) -> None:
    base = small_store.add_rootfs(make_rootfs(small_store.make_tmp()), tag=None)
    chain = build_chain(small_store, base, 9)
    old = small_store.get(chain[-1]).layers
    run = small_store.new_run(chain[-1])
    assert [p.name for p in run.layers] == old
    small_store.squash(chain[-1])
    for uuid in chain[:-1]:  # nothing else uses the replaced prefix now
        small_store.delete_image(uuid)
    assert small_store.gc(min_age=0) == 0  # everything the run mounted stays
    assert all(p.is_dir() for p in run.layers)
    (run.upper / "new").write_text("n")
    child = small_store.commit(chain[-1], run, operation_uuid=None).image
    assert small_store.get(child).layers[:-1] == small_store.get(chain[-1]).layers
    assert small_store.gc(min_age=0) == len(old) - small_store.squash_keep
    assert small_store.view(child).read("/new") == b"n"
    assert dump(small_store, child)["/data/f9"][-1] == b"layer 9\n" * 5


def test_a_live_sandbox_keeps_reading_its_layers_through_squash_and_gc(
    small_store: Store,
) -> None:
    from contree_shell.sandbox.runtime import RunSpec, Sandbox

    rootfs = small_store.make_tmp()
    build_busybox_rootfs(rootfs)
    base = small_store.add_rootfs(rootfs, tag=None)
    chain = build_chain(small_store, base, 12)
    run = small_store.new_run(chain[-1])
    out: list[bytes] = []
    spec = RunSpec(argv=["/bin/sh", "-c", "read x; cat /data/f1 /data/f12 /data/sub/s12"],
                   env={"PATH": "/bin"}, stdin_open=True)  # fmt: skip
    sb = Sandbox.start(lowers=list(run.layers), upper=run.upper, work=run.work, spec=spec,
                       on_output=lambda stream, chunk: out.append(chunk))  # fmt: skip
    # While it waits on stdin, its image is squashed and every chain image deleted.
    assert small_store.squash(chain[-1])
    for uuid in chain[1:]:
        small_store.delete_image(uuid)
    squashed = small_store.layers_dir / small_store.squash_log[-1].layer
    assert small_store.gc(min_age=0) == 1  # only the new flat layer: nobody mounted it
    assert not squashed.exists() and all(p.is_dir() for p in run.layers)
    sb.write_stdin(b"go\n")
    sb.close_stdin()
    info = sb.wait(60)
    assert info is not None and info.exit_code == 0, info
    assert b"".join(out) == b"layer 1\n" * 2 + b"layer 12\n" * 3 + b"sub 12\n"
    small_store.discard(run)
    assert small_store.gc(min_age=0) == 12
    assert os.listdir(small_store.layers_dir) == small_store.get(base).layers


def test_gc_waits_for_runs_of_unknown_images_and_the_grace_period(small_store: Store) -> None:
    base = small_store.add_rootfs(make_rootfs(small_store.make_tmp()), tag=None)
    chain = build_chain(small_store, base, 3)
    layers = small_store.layer_paths(chain[-1])  # a reader fetched the list...
    run = small_store.new_run()  # ...then made its run without saying which image
    for uuid in chain[1:]:
        small_store.delete_image(uuid)
    assert small_store.gc(min_age=0) == 0
    small_store.discard(run)
    assert small_store.gc() == 0  # within the grace period
    assert small_store.gc(min_age=0) == 3
    assert not any(p.exists() for p in layers[1:]) and layers[0].exists()


def test_pin_and_pinned_layers_protect_readers(small_store: Store) -> None:
    base = small_store.add_rootfs(make_rootfs(small_store.make_tmp()), tag=None)
    chain = build_chain(small_store, base, 2)
    with small_store.pinned_layers(chain[-1]) as paths:
        small_store.delete_image(chain[-1])
        assert small_store.gc(min_age=0) == 0
        assert ImageView(paths).read("/data/f2") == b"layer 2\n" * 3
        with small_store.pin([paths[-1]]):
            pass
    assert small_store.gc(min_age=0) == 1


def test_gc_removes_unused_squashed_layers_and_crash_orphans(small_store: Store) -> None:
    base = small_store.add_rootfs(make_rootfs(small_store.make_tmp()), tag=None)
    chain = build_chain(small_store, base, 10)
    small_store.squash(chain[-1])
    squashed = small_store.get(chain[-1]).layers[0]
    orphan = small_store.layers_dir / "0123456789ab"
    orphan.mkdir()
    assert small_store.gc() == 1 and not orphan.exists()  # never referenced: at once
    small_store.delete_image(chain[-1])
    small_store.gc(min_age=0)
    assert not (small_store.layers_dir / squashed).exists()
    assert small_store._db.execute("SELECT count(*) FROM squashes").fetchone()[0] == 0
    with pytest.raises(ImageNotFound):
        small_store.delete_image(chain[-1])
    assert small_store.view(chain[-2]).read("/data/f9") == b"layer 9\n" * 5


def test_delete_image_removes_its_tags(store: Store, base: str) -> None:
    store.delete_image(base)
    with pytest.raises(TagNotFound):
        store.resolve_tag("base:latest")
    assert store.list() == []
    store.gc(min_age=0)
    assert os.listdir(store.layers_dir) == []


# ----------------------------------------------------------------- multi-layer import


def _layer(root: Path, files: dict[str, str | None]) -> Path:
    """A converted layer dir: ``None`` values become whiteouts, names ending in '/'
    directories."""
    root.mkdir()
    for rel, content in files.items():
        p = root / rel.rstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith("/"):
            p.mkdir(exist_ok=True)
        elif content is None:
            os.mknod(p, stat.S_IFCHR, os.makedev(0, 0))
        else:
            p.write_text(content)
    return root


def test_add_layers_imports_a_stack_with_mount_points_on_top(store: Store, tmp_path: Path) -> None:
    bottom = _layer(tmp_path / "l0", {
        "etc/hosts": "127.0.0.1 localhost\n", "etc/hostname": "img\n", "etc/os": "v1\n",
        "tmp/junk": "j", "proc/": "", "dev/": "", "sys/": "", "bin/app": "app\n",
    })  # fmt: skip
    middle = _layer(tmp_path / "l1", {"etc/hostname": None, "etc/os": "v2\n", "tmp": None})
    for layer in (bottom, middle):
        os.chmod(layer / "etc", 0o750)
        os.utime(layer / "etc", (1_234_567, 1_234_567))
    top = _layer(tmp_path / "l2", {"srv/data": "d\n"})
    uuid = store.add_layers([bottom, top.parent / "l1", top], tag="img:1",
                            config={"env": {"A": "1"}}, operation_uuid="op",
                            source_digest="sha256:abc")  # fmt: skip
    assert not bottom.exists() and not middle.exists() and not top.exists()
    rec = store.get(uuid)
    assert len(rec.layers) == 3 and rec.tags == ["img:1"] and rec.source_digest == "sha256:abc"
    assert rec.config["env"] == {"A": "1"} and rec.operation_uuid == "op"
    view = store.view(uuid)
    assert view.read("/etc/hosts") == b"127.0.0.1 localhost\n"  # kept from the bottom
    assert view.read("/etc/hostname") == b""  # recreated above the whiteout
    assert view.read("/etc/os") == b"v2\n"
    assert [e.name for e in view.listdir("/tmp")[1]] == []  # the old /tmp stays hidden
    assert stat.S_IMODE(view.stat("/tmp").mode) == 0o1777
    etc = view.stat("/etc")
    assert stat.S_IMODE(etc.mode) == 0o750 and etc.mtime == 1_234_567  # copied up as is
    top_layer = store.layer_paths(uuid)[-1]
    assert (top_layer / "etc/hostname").is_file() and (top_layer / "tmp").is_dir()
    assert not (top_layer / "proc").exists()  # already in the merged view
    assert not (top_layer / "etc/hosts").exists()


def test_add_layers_keeps_the_times_of_a_top_etc_it_adds_to(store: Store, tmp_path: Path) -> None:
    top = _layer(tmp_path / "l0", {"etc/passwd": "root\n", "bin/sh": "sh"})
    os.utime(top / "etc", (7_654_321, 7_654_321))
    uuid = store.add_layers([top], tag=None, config=None, operation_uuid=None,
                            source_digest=None)  # fmt: skip
    view = store.view(uuid)
    assert view.stat("/etc").mtime == 7_654_321
    assert [view.read(f"/etc/{n}") for n in ("hostname", "hosts", "resolv.conf")] == [b""] * 3
    assert all(view.stat(f"/{d}").is_dir for d in ("proc", "dev", "sys", "tmp"))


def test_find_by_digest_and_reimport_keep_the_uuid(store: Store, tmp_path: Path) -> None:
    assert store.find_by_digest("sha256:x") is None
    first = store.add_layers([_layer(tmp_path / "a", {"f": "1"})], tag="x:1", config=None,
                             operation_uuid=None, source_digest="sha256:x")  # fmt: skip
    assert store.find_by_digest("sha256:x") == first
    again_dir = _layer(tmp_path / "b", {"f": "1"})
    again = store.add_layers([again_dir], tag="x:latest", config=None, operation_uuid=None,
                             source_digest="sha256:x")  # fmt: skip
    assert again == first and not again_dir.exists()
    assert store.get(first).tags == ["x:1", "x:latest"]
    assert len(os.listdir(store.layers_dir)) == 1
    other = store.add_layers([_layer(tmp_path / "c", {"f": "2"})], tag=None, config=None,
                             operation_uuid=None, source_digest=None)  # fmt: skip
    assert other != first and store.get(other).source_digest is None


def test_add_layers_beyond_the_kernel_limit_is_squashed_at_once(
    small_store: Store, tmp_path: Path
) -> None:
    dirs = [_layer(tmp_path / f"l{i}", {f"f{i}": str(i)}) for i in range(MAX_LAYERS + 5)]
    uuid = small_store.add_layers(dirs, tag=None, config=None, operation_uuid=None,
                                  source_digest=None)  # fmt: skip
    assert len(small_store.get(uuid).layers) <= 8
    assert small_store.view(uuid).read(f"/f{MAX_LAYERS + 4}") == str(MAX_LAYERS + 4).encode()
    assert small_store.view(uuid).read("/f0") == b"0"


def test_add_layers_rejects_bad_input_before_moving_anything(store: Store, tmp_path: Path) -> None:
    d = _layer(tmp_path / "a", {"f": "1"})
    with pytest.raises(InvalidTag):
        store.add_layers([d], tag="-bad", config=None, operation_uuid=None, source_digest=None)
    with pytest.raises(ValueError):
        store.add_layers([], tag=None, config=None, operation_uuid=None, source_digest=None)
    with pytest.raises(FileNotFoundError):
        store.add_layers([d, tmp_path / "missing"], tag=None, config=None,
                         operation_uuid=None, source_digest=None)  # fmt: skip
    assert store.list() == [] and os.listdir(store.layers_dir) == []


# --------------------------------------------------------------------- crash safety

CRASH_POINTS = [
    "commit:before-rename",
    "commit:renamed",
    "squash:copying",
    "squash:built",
    "squash:renamed",
    "add_layers:renamed",
]


def _crash_child(root: str, point: str, image: str, imports: str, reached: Any) -> None:
    """Runs in a forked child: do one store operation and stop dead at ``point``."""
    store = Store(Path(root), squash_threshold=8)

    def hook(at: str) -> None:
        if at == point:
            reached.set()
            time.sleep(3600)  # the parent SIGKILLs us here

    store._hook = hook
    action = point.split(":")[0]
    if action == "commit":
        run = store.new_run(image)
        (run.upper / "crash").write_text("x")
        store.commit(image, run, operation_uuid=None)
    elif action == "squash":
        store.squash(image)
    else:
        dirs = [Path(imports) / n for n in sorted(os.listdir(imports))]
        store.add_layers(dirs, tag="imported", config=None, operation_uuid=None,
                         source_digest="sha256:crash")  # fmt: skip
    os._exit(0)


def _unreferenced(store: Store) -> set[str]:
    used = {lid for rec, _ in store.list(limit=100000) for lid in rec.layers}
    return set(os.listdir(store.layers_dir)) - used


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_9_at_a_critical_point_leaves_every_image_readable(tmp_path: Path, point: str) -> None:
    root = tmp_path / "store"
    store = Store(root, squash_threshold=8)
    base = store.add_rootfs(make_rootfs(store.make_tmp()), tag="base")
    chain = build_chain(store, base, 12)
    before = {uuid: dump(store, uuid) for uuid in chain}
    layers_before = {uuid: store.get(uuid).layers for uuid in chain}
    imports = tmp_path / "imports"
    imports.mkdir()
    for i in range(3):
        _layer(imports / f"l{i}", {f"f{i}": str(i), "etc/": ""})
    store.close()

    ctx = multiprocessing.get_context("fork")
    reached = ctx.Event()
    child = ctx.Process(target=_crash_child,
                        args=(str(root), point, chain[-1], str(imports), reached))  # fmt: skip
    child.start()
    try:
        assert reached.wait(60), "the child never reached the crash point"
    finally:
        os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        child.join(30)
    assert child.exitcode == -signal.SIGKILL

    again = Store(root, squash_threshold=8)
    # The crash really left something half-done behind...
    leftovers = _unreferenced(again) or set(os.listdir(again.tmp_dir))
    leftovers |= set(os.listdir(again.runs_dir))
    assert leftovers, point
    # ...and no image saw it, before or after recovery.
    for uuid in chain:
        assert again.get(uuid).layers == layers_before[uuid]
    again.recover()
    assert os.listdir(again.tmp_dir) == [] and os.listdir(again.runs_dir) == []
    assert _unreferenced(again) == set()
    for rec, _ in again.list(limit=1000):
        dump(again, rec.uuid)  # every listed image reads
    for uuid in chain:
        assert dump(again, uuid) == before[uuid], uuid
    rows = again._db.execute("SELECT layer FROM squashes").fetchall()
    assert all((again.layers_dir / lid).is_dir() for (lid,) in rows)
    # The store carries on: the interrupted operation can simply be redone.
    assert again.squash(chain[-1])
    assert dump(again, chain[-1]) == before[chain[-1]]
    run = again.new_run(chain[-1])
    (run.upper / "after").write_text("y")
    assert (
        again.view(again.commit(chain[-1], run, operation_uuid=None).image).read("/after") == b"y"
    )


def test_a_run_on_an_image_deeper_than_the_mount_limit_squashes_it_first(
    store: Store, base: str
) -> None:
    layers = [store.get(base).layers[0]] * (MAX_LAYERS + 1)  # as stores written earlier
    with store._lock:
        deep = store._insert(base, layers, None, {"env": {}, "workdir": None, "user": None})
    run = store.new_run(deep)
    try:
        assert len(run.layers) <= store.squash_threshold
        assert len(store.get(deep).layers) == len(run.layers)
    finally:
        store.discard(run)
