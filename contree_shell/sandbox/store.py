"""The image store: immutable overlay layers plus an SQLite index of images and tags.

Layout under ``root``::

    layers/<id>/          overlay upper-dir format, immutable once committed
    images.db             images(uuid, parent, layers, created_at, operation_uuid, config)
                          and tags(tag, uuid); SQLite in WAL mode
    runs/<run-id>/        upper/ and work/ of runs in flight (transient)
    tmp/                  scratch space on the store's filesystem (imports, rootfs builds)

Writes are ordered so a crash leaves at worst an unreferenced layer directory: a layer is
renamed into place first and the image row inserted after; ``gc`` removes layers no
image references.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import re
import secrets
import shutil
import sqlite3
import subprocess
import threading
import uuid as uuidlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from contree_shell.sandbox import snapshot
from contree_shell.sandbox.inspect import ImageView, NotADirectory, NotAFile, PathNotFound

__all__ = [
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
    "Store",
    "TagNotFound",
    "TooManyLayers",
    "validate_tag",
]

MAX_LAYERS = 500  # overlayfs refuses more lower layers (OVL_MAX_STACK)
SQUASH_THRESHOLD = 128  # chains this deep should be squashed (not implemented yet)

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


@dataclass(frozen=True)
class RunDir:
    """A run's private writable layer: ``upper`` and overlay's ``work`` under ``path``."""

    path: Path
    upper: Path
    work: Path

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


class Store:
    """Images, tags and layers under one root directory. Thread-safe."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.layers_dir = self.root / "layers"
        self.runs_dir = self.root / "runs"
        self.tmp_dir = self.root / "tmp"
        for d in (self.root, self.layers_dir, self.runs_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        # One connection, serialized by a lock: commits are short and the server is one
        # process. The same lock orders "rename layer + insert row" against gc().
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            self.root / "images.db", check_same_thread=False, isolation_level=None, timeout=30
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ reading

    _COLUMNS = (
        "i.uuid, i.parent, i.layers, i.created_at, i.operation_uuid, i.config, "
        "(SELECT json_group_array(tag) FROM (SELECT tag FROM tags WHERE uuid = i.uuid "
        "ORDER BY tag))"
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

    # ------------------------------------------------------------------ runs

    def new_run(self) -> RunDir:
        """A fresh run directory with empty ``upper`` and ``work``."""
        while True:
            path = self.runs_dir / secrets.token_hex(6)
            try:
                path.mkdir()
                break
            except FileExistsError:
                continue
        run = RunDir(path, path / "upper", path / "work")
        run.upper.mkdir()
        run.work.mkdir()
        os.chmod(run.upper, 0o755)
        return run

    def discard(self, run: RunDir) -> None:
        """Delete a run directory and everything in it."""
        force_rmtree(run.path)

    def _new_layer_id(self) -> str:
        while True:
            lid = secrets.token_hex(6)
            if not os.path.lexists(self.layers_dir / lid):
                return lid

    def _insert(
        self,
        parent: str | None,
        layers: builtins.list[str],
        operation_uuid: str | None,
        config: dict[str, Any],
    ) -> str:
        new = str(uuidlib.uuid4())
        self._db.execute(
            "INSERT INTO images(uuid, parent, layers, created_at, operation_uuid, config) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (
                new,
                parent,
                json.dumps(layers),
                datetime.now(UTC).timestamp(),
                operation_uuid,
                json.dumps(config, sort_keys=True),
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
        (O(1)) and one image row is inserted. ``config`` (when given) replaces the
        parent's; a config change alone also makes a new image over the same layers.
        The run directory is gone afterwards in every case.
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
                    new = self._insert(parent, rec.layers, operation_uuid, new_config)
                return CommitResult(new, True, 0)
            if len(rec.layers) + 1 > MAX_LAYERS:
                raise TooManyLayers(
                    f"image {parent} already has {len(rec.layers)} layers; overlayfs mounts "
                    f"at most {MAX_LAYERS} (squashing deep chains is not implemented yet)"
                )
            size = pruned.kept_bytes
            with self._lock:
                lid = self._new_layer_id()
                os.chmod(run.upper, 0o755)
                os.rename(run.upper, self.layers_dir / lid)
                new = self._insert(parent, [*rec.layers, lid], operation_uuid, new_config)
            return CommitResult(new, True, size)
        finally:
            self.discard(run)

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
        rootfs = Path(rootfs)
        if not rootfs.is_dir():
            raise FileNotFoundError(f"rootfs {rootfs} is not a directory")
        staged = self.tmp_dir / f"layer-{secrets.token_hex(6)}"
        try:
            os.rename(rootfs, staged)
        except OSError:
            staged.mkdir()
            proc = subprocess.run(
                ["cp", "-a", "--", f"{rootfs}/.", f"{staged}/"],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                force_rmtree(staged)
                msg = (proc.stderr.strip().splitlines() or ["cp failed"])[-1]
                raise OSError(f"copying rootfs into the store failed: {msg}") from None
            force_rmtree(rootfs)
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

    # ------------------------------------------------------------------ maintenance

    def gc(self) -> int:
        """Delete layer directories no image references; returns how many."""
        removed = 0
        with self._lock:
            used: set[str] = set()
            for (layers,) in self._db.execute("SELECT layers FROM images"):
                used.update(json.loads(layers))
            for entry in os.scandir(self.layers_dir):
                if entry.name not in used:
                    force_rmtree(Path(entry.path))
                    removed += 1
        return removed

    def recover(self) -> None:
        """At server start: drop leftover runs and scratch dirs, then gc orphan layers."""
        for d in (self.runs_dir, self.tmp_dir):
            for entry in os.scandir(d):
                force_rmtree(Path(entry.path))
        self.gc()
