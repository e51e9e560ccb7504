"""Store: images, tags, layers, commit/discard/recover on real directories (root)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from contree_shell.sandbox.bootstrap import build_busybox_rootfs
from contree_shell.sandbox.store import (
    MAX_LAYERS,
    ImageNotFound,
    InvalidTag,
    PathNotFound,
    RunDir,
    Store,
    TagNotFound,
    TooManyLayers,
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


def test_commit_refuses_beyond_the_overlay_layer_limit(store: Store, base: str) -> None:
    layers = [store.get(base).layers[0]] * MAX_LAYERS
    with store._lock:
        deep = store._insert(base, layers, None, {"env": {}, "workdir": None, "user": None})
    assert len(store.layer_paths(deep)) == MAX_LAYERS
    run = store.new_run()
    (run.upper / "new").write_text("x")
    with pytest.raises(TooManyLayers, match="at most 500"):
        store.commit(deep, run, operation_uuid=None)
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
    subprocess.run(["chown", "-R", "65534:65534", str(tmp_path)], check=True)
    for d in ("work/work", "work/incompat/volatile", "work/incompat"):
        os.chmod(run / d, 0)
    repo = Path(__file__).resolve().parent.parent
    code = (
        f"import sys; sys.path.insert(0, {str(repo)!r}); from pathlib import Path; "
        "from contree_shell.sandbox.store import force_rmtree; "
        f"force_rmtree(Path({str(run)!r}))"
    )
    subprocess.run(
        ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
         sys.executable, "-c", code],
        check=True,
    )  # fmt: skip
    try:
        assert not run.exists()
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
