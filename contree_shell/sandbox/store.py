"""The image store: immutable overlay layers plus an SQLite index of images and tags.

Layout under ``root``::

    layers/<id>/          overlay upper-dir format, immutable once committed
    images.db             images(uuid, parent, layers, created_at, operation_uuid, config,
                          source_digest), tags(tag, uuid) and squashes(key, layer); WAL
    runs/<run-id>/        upper/ and work/ of runs in flight (transient)
    tmp/                  scratch space on the store's filesystem (imports, squash builds)

Writes are ordered so a crash leaves at worst an unreferenced directory: a layer is
built in ``tmp/``, renamed into ``layers/`` and only then referenced by a row; ``gc``
removes layers no image references and ``recover`` empties ``tmp/`` and ``runs/``.

Deep chains stay cheap to mount: when an image has more than ``squash_threshold``
layers, a prefix of its list is replaced by one flattened layer holding the same merged
view (``squash``). The image's uuid and content do not change, only its storage. A
squashed layer is recorded under the tuple of layer ids it replaces, so every image
sharing that prefix (branches of one history) reuses it. Layers that leave every image
stay on disk while a live run may have them mounted (``new_run(parent)``/``pin``).
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import queue
import re
import secrets
import shutil
import sqlite3
import stat
import subprocess
import threading
import time
import uuid as uuidlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from contree_shell.sandbox import snapshot
from contree_shell.sandbox.inspect import (
    EntryStat,
    ImageView,
    NotADirectory,
    NotAFile,
    PathNotFound,
    is_whiteout,
)

__all__ = [
    "GC_GRACE",
    "MAX_LAYERS",
    "SQUASH_THRESHOLD",
    "CommitResult",
    "ImageNotFound",
    "ImageRecord",
    "InvalidTag",
    "NotADirectory",
    "NotAFile",
    "PathNotFound",
    "RunDir",
    "SquashEvent",
    "Squasher",
    "Store",
    "TagNotFound",
    "TooManyLayers",
    "validate_tag",
]

log = logging.getLogger(__name__)

# overlayfs mounts at most 500 lower layers (OVL_MAX_STACK), and the runtime puts its
# scaffold layer under every image: an image may have one layer less.
MAX_LAYERS = 499
# Squash images deeper than this. 64 keeps mounts near the 1-layer cost and well under
# both the kernel's 500 and the ~114 layers a legacy mount(2) option page can name.
SQUASH_THRESHOLD = 64
SQUASH_THRESHOLD_ENV = "CONTREE_SQUASH_THRESHOLD"
# A layer that just left every image may still be in use by a reader that fetched the
# image's layer list a moment ago (inspect, a run about to call new_run()): keep it
# this many seconds before gc may delete it.
GC_GRACE = 60.0

TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*(?:[:/.][A-Za-z0-9_-]+)*$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    uuid TEXT PRIMARY KEY,
    parent TEXT,
    layers TEXT NOT NULL,
    created_at REAL NOT NULL,
    operation_uuid TEXT,
    config TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS images_created ON images(created_at);
CREATE TABLE IF NOT EXISTS tags (
    tag TEXT PRIMARY KEY,
    uuid TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tags_uuid ON tags(uuid);
CREATE TABLE IF NOT EXISTS squashes (
    key TEXT PRIMARY KEY,            -- JSON list of the layer ids the squash replaces
    layer TEXT NOT NULL,             -- the flattened layer's id
    first TEXT NOT NULL,             -- key[0], to find candidate prefixes fast
    length INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS squashes_first ON squashes(first, length);
"""


class ImageNotFound(KeyError):
    """No image with this uuid."""

    def __str__(self) -> str:
        return f"image not found: {self.args[0] if self.args else ''}"


class TagNotFound(KeyError):
    """No image carries this tag (or not the given image)."""

    def __str__(self) -> str:
        return f"tag not found: {self.args[0] if self.args else ''}"


class InvalidTag(ValueError):
    """The tag does not match the tag grammar."""


class TooManyLayers(RuntimeError):
    """The new image would have more layers than overlayfs can mount."""


@dataclass(frozen=True)
class SquashEvent:
    """One squash step: ``image`` got ``replaced`` leading layers swapped for ``layer``;
    ``built`` is False when an existing squashed layer was reused."""

    image: str
    layer: str
    replaced: int
    built: bool
    seconds: float
    entries: int = 0
    bytes: int = 0


def squash_threshold_from_env(default: int = SQUASH_THRESHOLD) -> int:
    """The squash threshold from ``$CONTREE_SQUASH_THRESHOLD`` (else ``default``)."""
    raw = os.environ.get(SQUASH_THRESHOLD_ENV, "").strip()
    try:
        return int(raw) if raw else default
    except ValueError:
        return default


@dataclass
class ImageRecord:
    """One image: an immutable stack of layers plus its default run config."""

    uuid: str
    parent: str | None
    layers: list[str]  # layer ids, bottom..top
    created_at: datetime
    operation_uuid: str | None
    config: dict[str, Any]  # {"env": {K: V}, "workdir": str | None, "user": str | None}
    tags: list[str] = field(default_factory=list)
    source_digest: str | None = None  # manifest digest of an imported remote image


@dataclass(frozen=True)
class RunDir:
    """A run's private writable layer: ``upper`` and overlay's ``work`` under ``path``.

    ``layers`` (bottom..top) is set when the run was made with ``new_run(parent)``:
    the parent's layer directories, which gc keeps until the run is committed or
    discarded. Mount exactly these.
    """

    path: Path
    upper: Path
    work: Path
    layers: tuple[Path, ...] = ()

    @property
    def id(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class CommitResult:
    """``image`` is the new uuid, or the parent's when nothing changed."""

    image: str
    changed: bool
    size_bytes: int


def validate_tag(tag: str) -> str:
    """Return ``tag`` or raise InvalidTag naming the grammar."""
    if not isinstance(tag, str) or len(tag) > 512 or not TAG_RE.fullmatch(tag):
        raise InvalidTag(
            f"invalid tag {tag!r}: use letters, digits, '_' and '-', "
            "with ':', '/' or '.' between parts (e.g. busybox:latest)"
        )
    return tag


def normalize_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """A config dict with every key present: env (dict), workdir, user."""
    config = dict(config or {})
    env = config.get("env") or {}
    return {
        **config,
        "env": {str(k): str(v) for k, v in dict(env).items()},
        "workdir": config.get("workdir") or None,
        "user": config.get("user") or None,
    }


def force_rmtree(path: Path) -> None:
    """Remove a tree even when it contains mode-000 directories (overlay leaves
    ``work/work`` and ``work/incompat`` like that; root copes, an unprivileged owner
    must first chmod them)."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return
    try:
        shutil.rmtree(path)
        return
    except PermissionError:
        pass
    # Top-down walk: each directory is made accessible before os.walk descends into it.
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(dirpath, d), 0o700)
    shutil.rmtree(path)


def _ensure_mount_points(rootfs: Path) -> None:
    """Create the paths the runtime mounts over, so a no-op run never copies them up."""
    for name, mode in (("proc", 0o555), ("dev", 0o755), ("sys", 0o555), ("tmp", 0o1777),
                       ("etc", 0o755)):  # fmt: skip
        p = rootfs / name
        if p.is_symlink() or (p.exists() and not p.is_dir()):
            p.unlink()
        if not p.exists():
            p.mkdir()
            os.chmod(p, mode)
    for name in ("hostname", "hosts", "resolv.conf"):
        p = rootfs / "etc" / name
        if p.is_symlink() or (os.path.lexists(p) and not p.is_file()):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        if not p.exists():
            p.touch()
            os.chmod(p, 0o644)


def _ensure_mount_points_on_top(layers: builtins.list[Path]) -> None:
    """Make the engine mount points exist in the merged view of ``layers``, writing any
    missing one into the TOP layer.

    The top layer is the only safe place: anything added lower could be hidden by a
    whiteout or an opaque directory above it (an image that deleted /etc/hostname).
    A missing parent (``/etc``) is created in the top layer with the merged
    directory's metadata, so the merged view shows it unchanged; a whiteout in the top
    layer that a new directory replaces becomes an opaque directory, so nothing it hid
    reappears.
    """
    top = layers[-1]
    view = ImageView(layers)

    def merged(path: str) -> EntryStat | None:
        try:
            return view.stat(path, follow=False)
        except (PathNotFound, OSError):
            return None

    def clear_top(rel: str) -> bool:
        """Remove a non-directory entry at ``rel`` in the top layer; True if it was a
        whiteout."""
        p = top / rel
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(p)
            return False
        p.unlink()
        return is_whiteout(st)

    for name, mode in (("proc", 0o555), ("dev", 0o755), ("sys", 0o555), ("tmp", 0o1777),
                       ("etc", 0o755)):  # fmt: skip
        cur = merged("/" + name)
        if cur is not None and cur.is_dir:
            continue
        was_whiteout = clear_top(name)
        (top / name).mkdir()
        os.chmod(top / name, mode)
        if was_whiteout or cur is not None:
            # Whatever lower layers hold under this name must stay hidden.
            os.setxattr(top / name, "trusted.overlay.opaque", b"y")
    etc = merged("/etc")
    copied_up = False
    # An /etc already in the top layer keeps its times: adding files must not show as
    # a change of the directory.
    top_etc = os.lstat(top / "etc") if (top / "etc").is_dir() else None
    for name in ("hostname", "hosts", "resolv.conf"):
        cur = merged("/etc/" + name)
        if cur is not None and cur.is_regular:
            continue
        if not (top / "etc").is_dir() and etc is not None and etc.host_path:
            (top / "etc").mkdir()
            copied_up = True
        clear_top(f"etc/{name}")
        p = top / "etc" / name
        p.touch()
        os.chmod(p, 0o644)
    if copied_up and etc is not None:
        # After the files: creating them bumped the directory's mtime.
        snapshot.copy_metadata(etc.host_path, os.fspath(top / "etc"), os.lstat(etc.host_path))
    elif top_etc is not None:
        os.utime(top / "etc", ns=(top_etc.st_atime_ns, top_etc.st_mtime_ns))


class Store:
    """Images, tags and layers under one root directory. Thread-safe."""

    def __init__(
        self,
        root: Path,
        *,
        squash_threshold: int | None = None,
        gc_grace: float = GC_GRACE,
    ) -> None:
        self.root = Path(root)
        self.layers_dir = self.root / "layers"
        self.runs_dir = self.root / "runs"
        self.tmp_dir = self.root / "tmp"
        for d in (self.root, self.layers_dir, self.runs_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        threshold = squash_threshold_from_env() if squash_threshold is None else squash_threshold
        # A squash leaves at least 2 layers (the flat one + the kept top), and a commit
        # must always fit under the kernel's stack limit.
        self.squash_threshold = max(2, min(int(threshold), MAX_LAYERS - 1))
        # Layers left above a squash: recent layers are the ones new branches share.
        self.squash_keep = max(1, min(16, self.squash_threshold // 8))
        self.gc_grace = float(gc_grace)
        # One connection, serialized by a lock: commits are short and the server is one
        # process. The same lock orders "rename layer + insert row" against gc().
        self._lock = threading.RLock()
        # Squashes are serialized (and ordered before _lock): two builds of the same
        # prefix would be wasted work.
        self._squash_lock = threading.Lock()
        self._pins: Counter[str] = Counter()  # layer id -> live pins (runs, readers)
        self._run_pins: dict[str, builtins.list[str] | None] = {}  # None: image unknown
        self._retired: dict[str, float] = {}  # layer id -> when it left an image
        self._squasher: Squasher | None = None
        self.squash_log: builtins.list[SquashEvent] = []  # newest last, capped
        # Test-only: called at the crash-critical points of commit/squash/add_layers.
        self._hook: Callable[[str], None] | None = None
        self._db = sqlite3.connect(
            self.root / "images.db", check_same_thread=False, isolation_level=None, timeout=30
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        cols = {row[1] for row in self._db.execute("PRAGMA table_info(images)")}
        if "source_digest" not in cols:
            with contextlib.suppress(sqlite3.OperationalError):  # another process won
                self._db.execute("ALTER TABLE images ADD COLUMN source_digest TEXT")
        self._db.execute(
            "CREATE INDEX IF NOT EXISTS images_digest ON images(source_digest, created_at)"
        )

    def close(self) -> None:
        """Stop the background squasher and close the database connection."""
        self.stop()
        with self._lock:
            self._db.close()

    def _at(self, point: str) -> None:
        if self._hook is not None:
            self._hook(point)

    # ------------------------------------------------------------------ reading

    _COLUMNS = (
        "i.uuid, i.parent, i.layers, i.created_at, i.operation_uuid, i.config, "
        "(SELECT json_group_array(tag) FROM (SELECT tag FROM tags WHERE uuid = i.uuid "
        "ORDER BY tag)), i.source_digest"
    )
    _SELECT = f"SELECT {_COLUMNS} FROM images i"

    @staticmethod
    def _record(row: tuple[Any, ...]) -> ImageRecord:
        return ImageRecord(
            uuid=row[0],
            parent=row[1],
            layers=json.loads(row[2]),
            created_at=datetime.fromtimestamp(row[3], tz=UTC),
            operation_uuid=row[4],
            config=normalize_config(json.loads(row[5])),
            tags=json.loads(row[6]) if row[6] else [],
            source_digest=row[7],
        )

    def get(self, uuid: str) -> ImageRecord:
        """The image record; ImageNotFound if unknown."""
        with self._lock:
            row = self._db.execute(self._SELECT + " WHERE i.uuid = ?", (uuid,)).fetchone()
        if row is None:
            raise ImageNotFound(uuid)
        return self._record(row)

    def exists(self, uuid: str) -> bool:
        """True when an image with this uuid exists."""
        with self._lock:
            return (
                self._db.execute("SELECT 1 FROM images WHERE uuid = ?", (uuid,)).fetchone()
                is not None
            )

    def list(
        self,
        *,
        tagged: bool = False,
        tag_prefix: str | None = None,
        uuid: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[tuple[ImageRecord, str | None]]:
        """One row per (image, tag), untagged images once with tag None; newest first.

        ``tag_prefix`` filters tags by prefix and implies ``tagged``. Naive datetimes
        are taken as local time.
        """
        where: list[str] = []
        args: list[Any] = []
        if tagged or tag_prefix is not None:
            where.append("t.tag IS NOT NULL")
        if tag_prefix:
            where.append("substr(t.tag, 1, ?) = ?")
            args += [len(tag_prefix), tag_prefix]
        if uuid is not None:
            where.append("i.uuid = ?")
            args.append(uuid)
        if since is not None:
            where.append("i.created_at >= ?")
            args.append(since.timestamp())
        if until is not None:
            where.append("i.created_at <= ?")
            args.append(until.timestamp())
        sql = f"SELECT t.tag, {self._COLUMNS} FROM images i LEFT JOIN tags t ON t.uuid = i.uuid"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY i.created_at DESC, i.rowid DESC, t.tag LIMIT ? OFFSET ?"
        args += [max(0, int(limit)), max(0, int(offset))]
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [(self._record(r[1:]), r[0]) for r in rows]

    def resolve_tag(self, tag: str) -> str:
        """The uuid carrying ``tag``; TagNotFound otherwise."""
        with self._lock:
            row = self._db.execute("SELECT uuid FROM tags WHERE tag = ?", (tag,)).fetchone()
        if row is None:
            raise TagNotFound(tag)
        return str(row[0])

    def layer_paths(self, uuid: str) -> builtins.list[Path]:
        """Layer directories of the image, bottom..top (any depth; see MAX_LAYERS)."""
        return [self.layers_dir / lid for lid in self.get(uuid).layers]

    def view(self, uuid: str) -> ImageView:
        """A read-only merged view of the image's filesystem."""
        return ImageView(self.layer_paths(uuid))

    # ------------------------------------------------------------------ tags

    def set_tag(self, uuid: str, tag: str) -> None:
        """Put ``tag`` on the image, moving it from any other image."""
        validate_tag(tag)
        with self._lock:
            if not self.exists(uuid):
                raise ImageNotFound(uuid)
            self._db.execute(
                "INSERT INTO tags(tag, uuid) VALUES (?, ?) "
                "ON CONFLICT(tag) DO UPDATE SET uuid = excluded.uuid",
                (tag, uuid),
            )

    def remove_tag(self, uuid: str, tag: str | None) -> None:
        """Remove one tag from the image, or all of its tags when ``tag`` is None."""
        with self._lock:
            if not self.exists(uuid):
                raise ImageNotFound(uuid)
            if tag is None:
                self._db.execute("DELETE FROM tags WHERE uuid = ?", (uuid,))
                return
            cur = self._db.execute("DELETE FROM tags WHERE uuid = ? AND tag = ?", (uuid, tag))
            if cur.rowcount == 0:
                raise TagNotFound(tag)

    # ------------------------------------------------------------------ pins

    def _pin_ids(self, ids: Iterable[str]) -> None:
        with self._lock:
            self._pins.update(ids)

    def _unpin_ids(self, ids: Iterable[str]) -> None:
        with self._lock:
            self._pins.subtract(ids)
            for lid in [k for k, v in self._pins.items() if v <= 0]:
                del self._pins[lid]

    @contextlib.contextmanager
    def pin(self, layers: Iterable[str | Path]) -> Iterator[None]:
        """Keep these layers (ids or layer paths) on disk for the duration, even if
        every image referencing them is squashed or deleted meanwhile."""
        ids = [Path(x).name if isinstance(x, Path) else str(x) for x in layers]
        self._pin_ids(ids)
        try:
            yield
        finally:
            self._unpin_ids(ids)

    @contextlib.contextmanager
    def pinned_layers(self, uuid: str) -> Iterator[builtins.list[Path]]:
        """The image's layer paths (bottom..top), kept on disk for the duration (for
        readers such as a long download through ImageView)."""
        with self._lock:
            ids = self._layers_of(uuid)
            self._pin_ids(ids)
        try:
            yield [self.layers_dir / lid for lid in ids]
        finally:
            self._unpin_ids(ids)

    # ------------------------------------------------------------------ runs

    def new_run(self, parent: str | None = None) -> RunDir:
        """A fresh run directory with empty ``upper`` and ``work``.

        With ``parent`` (an image uuid) the returned ``RunDir.layers`` are that
        image's layer paths, pinned until ``commit``/``discard``: mount those. Without
        it, the run still holds back gc of any layer that left an image while the run
        is alive (it may have mounted a list fetched earlier).
        """
        while True:
            path = self.runs_dir / secrets.token_hex(6)
            try:
                path.mkdir()
                break
            except FileExistsError:
                continue
        layers: tuple[Path, ...] = ()
        if parent is not None and len(self._layers_of(parent)) > MAX_LAYERS:
            self.squash(parent)  # a store written before the limit counted the scaffold
        try:
            with self._lock:
                if parent is not None:
                    ids = self._layers_of(parent)
                    self._pin_ids(ids)
                    self._run_pins[path.name] = ids
                    layers = tuple(self.layers_dir / lid for lid in ids)
                else:
                    self._run_pins[path.name] = None
        except BaseException:
            path.rmdir()
            raise
        run = RunDir(path, path / "upper", path / "work", layers)
        run.upper.mkdir()
        run.work.mkdir()
        os.chmod(run.upper, 0o755)
        return run

    def _release(self, run: RunDir) -> None:
        with self._lock:
            ids = self._run_pins.pop(run.path.name, None)
            if ids:
                self._unpin_ids(ids)

    def discard(self, run: RunDir) -> None:
        """Delete a run directory and everything in it; its pins are released."""
        try:
            force_rmtree(run.path)
        finally:
            self._release(run)

    def _new_layer_id(self) -> str:
        while True:
            lid = secrets.token_hex(6)
            if not os.path.lexists(self.layers_dir / lid):
                return lid

    def _layers_of(self, uuid: str) -> builtins.list[str]:
        with self._lock:
            row = self._db.execute("SELECT layers FROM images WHERE uuid = ?", (uuid,)).fetchone()
        if row is None:
            raise ImageNotFound(uuid)
        return builtins.list(json.loads(row[0]))

    def _insert(
        self,
        parent: str | None,
        layers: builtins.list[str],
        operation_uuid: str | None,
        config: dict[str, Any],
        source_digest: str | None = None,
    ) -> str:
        new = str(uuidlib.uuid4())
        self._db.execute(
            "INSERT INTO images(uuid, parent, layers, created_at, operation_uuid, config, "
            "source_digest) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                new,
                parent,
                json.dumps(layers),
                datetime.now(UTC).timestamp(),
                operation_uuid,
                json.dumps(config, sort_keys=True),
                source_digest,
            ),
        )
        return new

    def commit(
        self,
        parent: str,
        run: RunDir,
        *,
        operation_uuid: str | None,
        config: dict[str, Any] | None = None,
        keep_mtime_only: bool = False,
    ) -> CommitResult:
        """Turn a finished run into an image, or keep ``parent`` when nothing changed.

        No-op copy-ups are pruned first. A changed upper is renamed into ``layers/``
        (O(1)) and one image row is inserted over the parent's current layer list. A
        parent already at the kernel's layer limit is squashed first, synchronously;
        a new image deeper than the squash threshold is queued for the background
        squasher. ``config`` (when given) replaces the parent's; a config change alone
        also makes a new image over the same layers. The run directory is gone
        afterwards in every case.
        """
        rec = self.get(parent)
        new_config = rec.config if config is None else normalize_config(config)
        try:
            pruned = snapshot.prune(
                run.upper,
                ImageView([self.layers_dir / lid for lid in rec.layers]),
                keep_mtime_only=keep_mtime_only,
            )
            upper_empty = snapshot.is_empty(run.upper)
            if upper_empty and new_config == rec.config:
                return CommitResult(parent, False, 0)
            if upper_empty:
                with self._lock:
                    # The current list: a squash may have replaced rec.layers, and the
                    # old ids are no longer protected from gc.
                    layers = self._layers_of(parent)
                    new = self._insert(parent, layers, operation_uuid, new_config)
                self._maybe_queue(new, len(layers))
                return CommitResult(new, True, 0)
            if len(self._layers_of(parent)) + 1 > MAX_LAYERS:
                self.squash(parent)
            size = pruned.kept_bytes
            with self._lock:
                layers = self._layers_of(parent)
                if len(layers) + 1 > MAX_LAYERS:
                    raise TooManyLayers(
                        f"image {parent} has {len(layers)} layers; overlayfs mounts at "
                        f"most {MAX_LAYERS}"
                    )
                lid = self._new_layer_id()
                os.chmod(run.upper, 0o755)
                self._at("commit:before-rename")
                os.rename(run.upper, self.layers_dir / lid)
                self._at("commit:renamed")
                layers.append(lid)
                new = self._insert(parent, layers, operation_uuid, new_config)
            self._maybe_queue(new, len(layers))
            return CommitResult(new, True, size)
        finally:
            self.discard(run)

    # ------------------------------------------------------------------ squashing

    def squash_needed(self, uuid: str) -> bool:
        """True when the image has more layers than the squash threshold."""
        return len(self._layers_of(uuid)) > self.squash_threshold

    def squash(self, uuid: str) -> bool:
        """Bound the image's layer stack: replace a prefix of its layer list by one
        flattened layer with the same merged view. Returns True when the list changed.

        The uuid, content and config stay the same. An existing squashed layer for the
        same prefix is reused (no copy); otherwise all but the top ``squash_keep``
        layers are flattened into ``tmp/``, renamed into ``layers/`` and swapped in by
        one transaction, so a run never sees a partial layer. Replaced layers remain
        while other images reference them or a live run pins them.
        """
        changed = False
        with self._squash_lock:
            while True:
                try:
                    layers = self._layers_of(uuid)
                except ImageNotFound:
                    return changed
                if len(layers) <= self.squash_threshold:
                    return changed
                if self._reuse_squash(uuid, layers):
                    changed = True
                    continue
                self._build_squash(uuid, layers[: len(layers) - self.squash_keep])
                changed = True

    def _note(self, event: SquashEvent) -> None:
        with self._lock:
            self.squash_log.append(event)
            del self.squash_log[:-1000]
        log.info(
            "squash %s: %d layers -> %s (%s, %.3f s)", event.image, event.replaced,
            event.layer, "built" if event.built else "reused", event.seconds,
        )  # fmt: skip

    def _swap_prefix(self, uuid: str, old: builtins.list[str], key: builtins.list[str],
                     lid: str) -> bool:  # fmt: skip
        """In the current transaction: replace ``key`` (a prefix of ``old``) by ``lid``
        in the image's list, if the list is still ``old``."""
        new = [lid, *old[len(key) :]]
        cur = self._db.execute(
            "UPDATE images SET layers = ? WHERE uuid = ? AND layers = ?",
            (json.dumps(new), uuid, json.dumps(old)),
        )
        return cur.rowcount == 1

    def _retire(self, ids: Iterable[str]) -> None:
        now = time.monotonic()
        for lid in ids:
            self._retired[lid] = now

    def _reuse_squash(self, uuid: str, layers: builtins.list[str]) -> bool:
        t0 = time.monotonic()
        with self._lock:
            rows = self._db.execute(
                "SELECT key, layer FROM squashes WHERE first = ? AND length <= ? "
                "AND length >= 2 ORDER BY length DESC",
                (layers[0], len(layers)),
            ).fetchall()
            for key_json, lid in rows:
                key = json.loads(key_json)
                if layers[: len(key)] != key or not (self.layers_dir / lid).is_dir():
                    continue
                if not self._swap_prefix(uuid, layers, key, lid):
                    return False
                self._retired.pop(lid, None)
                self._retire(key)
                break
            else:
                return False
        self._note(SquashEvent(uuid, lid, len(key), False, time.monotonic() - t0))
        return True

    def _build_squash(self, uuid: str, key: builtins.list[str]) -> None:
        t0 = time.monotonic()
        with self.pin(key):
            tmp = self.make_tmp("squash")
            try:
                stats = snapshot.flatten(
                    [self.layers_dir / lid for lid in key], tmp,
                    on_entry=(lambda _s: self._at("squash:copying")) if self._hook else None,
                )  # fmt: skip
                self._at("squash:built")
                with self._lock:
                    lid = self._new_layer_id()
                    os.rename(tmp, self.layers_dir / lid)
                    self._at("squash:renamed")
                    self._db.execute("BEGIN IMMEDIATE")
                    try:
                        self._db.execute(
                            "INSERT OR REPLACE INTO squashes(key, layer, first, length, "
                            "created_at) VALUES (?, ?, ?, ?, ?)",
                            (json.dumps(key), lid, key[0], len(key), time.time()),
                        )
                        layers = self._layers_of(uuid) if self.exists(uuid) else []
                        if layers[: len(key)] == key:
                            self._swap_prefix(uuid, layers, key, lid)
                        self._db.execute("COMMIT")
                    except BaseException:
                        self._db.execute("ROLLBACK")
                        raise
                    self._retire(key)
            except BaseException:
                force_rmtree(tmp)
                raise
        self._note(SquashEvent(uuid, lid, len(key), True, time.monotonic() - t0,
                               stats.entries, stats.bytes))  # fmt: skip

    def _maybe_queue(self, uuid: str, depth: int) -> None:
        sq = self._squasher
        if sq is not None and depth > self.squash_threshold:
            sq.enqueue(uuid)

    def start_background_squash(self) -> None:
        """Start the squasher thread (idempotent) and queue every image already deeper
        than the threshold. From then on commits queue deep images themselves, and the
        thread also runs gc when replaced layers have aged past the grace period."""
        with self._lock:
            if self._squasher is not None:
                return
            self._squasher = Squasher(self)
            rows = self._db.execute(
                "SELECT uuid FROM images WHERE json_array_length(layers) > ? "
                "ORDER BY created_at, rowid",
                (self.squash_threshold,),
            ).fetchall()
        self._squasher.start()
        for (uuid,) in rows:
            self._squasher.enqueue(uuid)

    def wait_for_squash(self, timeout: float | None = None) -> bool:
        """Block until the background squasher has nothing queued; False on timeout."""
        sq = self._squasher
        return True if sq is None else sq.wait_idle(timeout)

    def stop(self) -> None:
        """Stop the background squasher (a squash in progress finishes first)."""
        with self._lock:
            sq, self._squasher = self._squasher, None
        if sq is not None:
            sq.stop()

    # ------------------------------------------------------------------ base images

    def make_tmp(self, prefix: str = "t") -> Path:
        """A fresh scratch directory on the store's filesystem (renames into layers/
        from here are O(1)); recover() deletes leftovers."""
        while True:
            path = self.tmp_dir / f"{prefix}-{secrets.token_hex(6)}"
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue

    def _stage(self, src: Path, what: str) -> Path:
        """Move ``src`` under tmp/: a rename on the same filesystem, else ``cp -a``
        (xattrs, devices, hardlinks kept) and the source removed."""
        src = Path(src)
        if not src.is_dir():
            raise FileNotFoundError(f"{what} {src} is not a directory")
        staged = self.tmp_dir / f"layer-{secrets.token_hex(6)}"
        try:
            os.rename(src, staged)
            return staged
        except OSError:
            pass
        staged.mkdir()
        proc = subprocess.run(
            ["cp", "-a", "--", f"{src}/.", f"{staged}/"],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            force_rmtree(staged)
            msg = (proc.stderr.strip().splitlines() or ["cp failed"])[-1]
            raise OSError(f"copying {what} into the store failed: {msg}") from None
        force_rmtree(src)
        return staged

    def add_rootfs(
        self,
        rootfs: Path,
        *,
        tag: str | None,
        config: dict[str, Any] | None = None,
        operation_uuid: str | None = None,
    ) -> str:
        """Move a prepared rootfs directory in as a single-layer image; returns its uuid.

        The directory is renamed when it is on the store's filesystem, else copied with
        ``cp -a`` (xattrs, devices, hardlinks kept) and the source removed. The engine
        mount points (proc dev sys tmp etc, empty etc/hostname etc/hosts
        etc/resolv.conf) are created if missing.
        """
        if tag is not None:
            validate_tag(tag)
        staged = self._stage(rootfs, "rootfs")
        try:
            _ensure_mount_points(staged)
            os.chmod(staged, 0o755)
            with self._lock:
                lid = self._new_layer_id()
                os.rename(staged, self.layers_dir / lid)
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    new = self._insert(None, [lid], operation_uuid, normalize_config(config))
                    if tag is not None:
                        self.set_tag(new, tag)
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
        except BaseException:
            force_rmtree(staged)
            raise
        return new

    def find_by_digest(self, digest: str) -> str | None:
        """The newest image imported from this manifest digest, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT uuid FROM images WHERE source_digest = ? "
                "ORDER BY created_at DESC, rowid DESC LIMIT 1",
                (digest,),
            ).fetchone()
        return None if row is None else str(row[0])

    def add_layers(
        self,
        layer_dirs: builtins.list[Path],
        *,
        tag: str | None,
        config: dict[str, Any] | None,
        operation_uuid: str | None,
        source_digest: str | None,
    ) -> str:
        """Move converted overlay-format layer dirs (bottom..top) in as one image.

        Each dir is renamed into ``layers/`` (copied when on another filesystem); the
        engine mount points are added to the TOP layer where the merged view lacks them
        (a lower layer could be hidden by a whiteout or opaque dir above it). When an
        image with the same ``source_digest`` already exists, the dirs are dropped and
        that image is returned (re-tagged when ``tag`` is given): re-importing an
        unchanged remote image keeps its uuid. Images deeper than the squash threshold
        are squashed (synchronously beyond the kernel limit, else in the background).
        """
        if tag is not None:
            validate_tag(tag)
        dirs = [Path(d) for d in layer_dirs]
        if not dirs:
            raise ValueError("an image needs at least one layer")
        if source_digest:
            existing = self.find_by_digest(source_digest)
            if existing is not None:
                for d in dirs:
                    force_rmtree(d)
                if tag is not None:
                    self.set_tag(existing, tag)
                return existing
        staged: builtins.list[Path] = []
        try:
            for d in dirs:
                staged.append(self._stage(d, "layer"))
            _ensure_mount_points_on_top(staged)
            for d in staged:
                os.chmod(d, 0o755)
            with self._lock:
                ids: builtins.list[str] = []
                twin = self.find_by_digest(source_digest) if source_digest else None
                if twin is not None:  # a concurrent import of the same image won
                    for d in staged:
                        force_rmtree(d)
                    if tag is not None:
                        self.set_tag(twin, tag)
                    return twin
                try:
                    for d in staged:
                        lid = self._new_layer_id()
                        os.rename(d, self.layers_dir / lid)
                        ids.append(lid)
                        self._at("add_layers:renamed")
                    self._db.execute("BEGIN IMMEDIATE")
                    try:
                        new = self._insert(None, ids, operation_uuid, normalize_config(config),
                                           source_digest)  # fmt: skip
                        if tag is not None:
                            self.set_tag(new, tag)
                        self._db.execute("COMMIT")
                    except BaseException:
                        self._db.execute("ROLLBACK")
                        raise
                except BaseException:
                    for lid in ids:  # nothing references them: still under our lock
                        force_rmtree(self.layers_dir / lid)
                    raise
        except BaseException:
            for d in staged:
                force_rmtree(d)
            raise
        if len(ids) > MAX_LAYERS:
            self.squash(new)
        else:
            self._maybe_queue(new, len(ids))
        return new

    def delete_image(self, uuid: str) -> None:
        """Delete the image row and its tags. Its layers go at the next gc once no other
        image uses them; children keep working (their layer lists are their own)."""
        with self._lock:
            layers = self._layers_of(uuid)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM tags WHERE uuid = ?", (uuid,))
                self._db.execute("DELETE FROM images WHERE uuid = ?", (uuid,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._retire(layers)

    # ------------------------------------------------------------------ maintenance

    def _gc_due(self) -> bool:
        with self._lock:
            if not self._retired:
                return False
            return time.monotonic() - min(self._retired.values()) >= self.gc_grace

    def gc(self, *, min_age: float | None = None) -> int:
        """Delete layer directories no image references; returns how many.

        Kept anyway: layers pinned by a live run or reader, and layers that left an
        image less than ``min_age`` seconds ago (default: the store's grace period) or
        while a run made without a parent image is alive. Directories never referenced
        at all (crash leftovers) go at once. Squash records of deleted layers go too.
        """
        grace = self.gc_grace if min_age is None else float(min_age)
        doomed: builtins.list[Path] = []
        with self._lock:
            used: set[str] = set()
            for (layers,) in self._db.execute("SELECT layers FROM images"):
                used.update(json.loads(layers))
            blind_runs = any(ids is None for ids in self._run_pins.values())
            now = time.monotonic()
            removed_ids: builtins.list[str] = []
            for entry in os.scandir(self.layers_dir):
                name = entry.name
                if name in used or self._pins.get(name, 0) > 0:
                    continue
                retired_at = self._retired.get(name)
                if retired_at is not None and (blind_runs or now - retired_at < grace):
                    continue
                # Out of layers/ under the lock (atomic), the slow delete outside it.
                grave = self.tmp_dir / f"gc-{name}-{secrets.token_hex(3)}"
                os.rename(entry.path, grave)
                doomed.append(grave)
                removed_ids.append(name)
            for lid in removed_ids:
                self._retired.pop(lid, None)
            for lid in builtins.list(self._retired):
                if lid in used:
                    del self._retired[lid]
            if removed_ids:
                self._db.executemany(
                    "DELETE FROM squashes WHERE layer = ?", [(lid,) for lid in removed_ids]
                )
        for grave in doomed:
            force_rmtree(grave)
        return len(doomed)

    def recover(self) -> None:
        """At server start: drop leftover runs and scratch dirs (half-built squashes and
        imports, half-deleted layers), then gc orphan layers."""
        with self._lock:
            self._run_pins.clear()
        for d in (self.runs_dir, self.tmp_dir):
            for entry in os.scandir(d):
                force_rmtree(Path(entry.path))
        self.gc(min_age=0)


class Squasher:
    """The background squash worker: a daemon thread draining a queue of image uuids.

    Commits enqueue images that crossed the threshold; each is squashed in turn (later
    ones usually reuse an earlier squash of the same prefix). When idle, it runs gc once
    replaced layers are older than the store's grace period.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._queued: set[str] = set()
        self._cond = threading.Condition()
        self._pending = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._main, name="store-squash", daemon=True)

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def enqueue(self, uuid: str) -> None:
        """Queue an image for squashing (once, however often it is queued)."""
        with self._cond:
            if uuid in self._queued:
                return
            self._queued.add(uuid)
            self._pending += 1
        self._queue.put(uuid)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or being squashed; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def stop(self, timeout: float | None = None) -> None:
        """Finish the squash in progress, drop the rest of the queue, end the thread.
        (Dropped images are found again by the next start_background_squash.)"""
        self._stopping.set()
        self._queue.put(None)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _main(self) -> None:
        idle = max(0.05, min(self._store.gc_grace, 30.0))
        while True:
            try:
                uuid = self._queue.get(timeout=idle)
            except queue.Empty:
                self._maybe_gc()
                continue
            if uuid is None or self._stopping.is_set():
                with self._cond:
                    self._pending = 0
                    self._queued.clear()
                    self._cond.notify_all()
                return
            with self._cond:
                self._queued.discard(uuid)
            try:
                self._store.squash(uuid)
            except ImageNotFound:
                pass
            except Exception:
                log.exception("background squash of %s failed", uuid)
            finally:
                with self._cond:
                    self._pending -= 1
                    self._cond.notify_all()

    def _maybe_gc(self) -> None:
        try:
            if self._store._gc_due():
                self._store.gc()
        except Exception:
            log.exception("background gc failed")
