"""Content-addressed uploaded files: blobs named by SHA-256, one record per content.

Uploads stream to a temporary file while hashing, then rename into place, so a blob
on disk is always complete and its name is its verified hash.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import tempfile
import threading
import uuid as uuidlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from contree_shell.sandbox.operations import iso, utcnow

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    uuid TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
"""


class FileNotFound(KeyError):
    """No uploaded file with that uuid or sha256."""


@dataclass
class FileRecord:
    """One uploaded content."""

    uuid: str
    sha256: str
    size: int
    created_at: str
    updated_at: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "sha256": self.sha256,
            "size": self.size,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


class Upload:
    """An upload in progress: feed chunks, then `finish()` (or `abort()`)."""

    def __init__(self, store: FileStore) -> None:
        self._store = store
        fd, name = tempfile.mkstemp(dir=store.tmp_dir, prefix="upload-")
        self._file = os.fdopen(fd, "wb")
        self._path = Path(name)
        self._hash = hashlib.sha256()
        self._size = 0

    def write(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        self._size += len(chunk)
        self._file.write(chunk)

    def finish(self) -> FileRecord:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._store._adopt(self._path, self._hash.hexdigest(), self._size)

    def abort(self) -> None:
        self._file.close()
        self._path.unlink(missing_ok=True)


class FileStore:
    """Blobs under `<root>/blobs/<sha256>` plus an index in `<root>/files.db`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.tmp_dir = root / "tmp"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.tmp_dir.iterdir():  # interrupted uploads
            stale.unlink(missing_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            str(root / "files.db"), check_same_thread=False, isolation_level=None
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def begin(self) -> Upload:
        """Start a streamed upload."""
        return Upload(self)

    def put_bytes(self, data: bytes) -> FileRecord:
        """Store a whole content at once."""
        up = self.begin()
        up.write(data)
        return up.finish()

    def _adopt(self, tmp: Path, sha: str, size: int) -> FileRecord:
        blob = self.blobs / sha
        now = iso(utcnow())
        with self._lock:
            if blob.exists():
                tmp.unlink(missing_ok=True)
            else:
                os.replace(tmp, blob)
            row = self._conn.execute(
                "SELECT uuid, created_at FROM files WHERE sha256 = ?", (sha,)
            ).fetchone()
            if row is None:
                rec = FileRecord(str(uuidlib.uuid4()), sha, size, now, now)
                self._conn.execute(
                    "INSERT INTO files (uuid, sha256, size, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (rec.uuid, sha, size, now, now),
                )
            else:
                rec = FileRecord(str(row[0]), sha, size, str(row[1]), now)
                self._conn.execute("UPDATE files SET updated_at = ? WHERE sha256 = ?", (now, sha))
        return rec

    def by_sha(self, sha: str) -> FileRecord:
        return self._one("sha256", sha.lower())

    def by_uuid(self, file_uuid: str) -> FileRecord:
        return self._one("uuid", file_uuid)

    def _one(self, column: str, value: str) -> FileRecord:
        with self._lock:
            row = self._conn.execute(
                f"SELECT uuid, sha256, size, created_at, updated_at FROM files WHERE {column} = ?",
                (value,),
            ).fetchone()
        if row is None or not (self.blobs / str(row[1])).exists():
            raise FileNotFound(value)
        return FileRecord(*row)

    def blob_path(self, rec: FileRecord) -> Path:
        return self.blobs / rec.sha256

    def list(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[FileRecord]:
        """Files newest first."""
        where: list[str] = []
        params: list[Any] = []
        if since is not None:
            where.append("created_at >= ?")
            params.append(iso(since))
        if until is not None:
            where.append("created_at <= ?")
            params.append(iso(until))
        sql = "SELECT uuid, sha256, size, created_at, updated_at FROM files"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, uuid LIMIT ? OFFSET ?"
        params += [limit, offset]
        with self._lock:
            rows = self._conn.execute(sql, params).fetchall()
        return [FileRecord(*r) for r in rows]
