"""Uploading host files for `run -F` and `file cp`: deduplicated, cached, parallel.

A local cache maps (server URL, absolute path, inode, mtime_ns, size) to the uploaded
file UUID, so an unchanged file is never hashed or sent again; misses go through
`ensure_file` (the server deduplicates by sha256) on up to 8 threads. The cache lives in
its own small SQLite file next to the session DBs: `<config>/cli/uploads/<profile>.db`.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

__all__ = ["CACHE_DAYS", "UploadCache", "upload_all"]

CACHE_DAYS = 90
MAX_WORKERS = 8


def _cache_path(profile: str) -> Path:
    from contree_shell.config import config_dir

    return config_dir() / "cli" / "uploads" / f"{profile}.db"


class UploadCache:
    """(url, path, inode, mtime_ns, size) → file UUID, kept for CACHE_DAYS."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS uploads (key TEXT PRIMARY KEY, uuid TEXT NOT NULL, "
            "path TEXT NOT NULL, uploaded_at REAL NOT NULL)"
        )
        self._conn.commit()
        self._lock = threading.Lock()
        self._clock = clock

    @staticmethod
    def key(url: str, path: Path, st: os.stat_result) -> str:
        """The cache key of one host file version."""
        return f"{url}\0{path}\0{st.st_ino}\0{st.st_mtime_ns}\0{st.st_size}"

    def get(self, key: str) -> str | None:
        """The cached UUID, or None when absent or older than CACHE_DAYS."""
        with self._lock:
            row = self._conn.execute(
                "SELECT uuid, uploaded_at FROM uploads WHERE key = ?", (key,)
            ).fetchone()
        if row is None or self._clock() - float(row[1]) > CACHE_DAYS * 86400:
            return None
        return str(row[0])

    def put(self, key: str, file_uuid: str, path: Path) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO uploads(key, uuid, path, uploaded_at) VALUES (?, ?, ?, ?)",
                (key, file_uuid, str(path), self._clock()),
            )
            self._conn.commit()

    def sources(self) -> dict[str, str]:
        """file UUID → the host path it was last uploaded from (for `file ls`)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT uuid, path FROM uploads ORDER BY uploaded_at"
            ).fetchall()
        return {str(u): str(p) for u, p in rows}

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def open_cache(profile: str) -> UploadCache | None:
    """The profile's upload cache, or None when it cannot be opened (uploads still work)."""
    try:
        return UploadCache(_cache_path(profile))
    except (OSError, sqlite3.Error):
        return None


def upload_all(
    client: Any, url: str, paths: Sequence[Path], *, cache: UploadCache | None,
    workers: int | None = None,
) -> tuple[dict[Path, str], int]:
    """UUIDs of the uploaded `paths` (each distinct path once) and how many were sent."""
    unique = list(dict.fromkeys(Path(os.path.abspath(p)) for p in paths))
    result: dict[Path, str] = {}
    misses: list[tuple[Path, str]] = []
    for path in unique:
        st = path.stat()
        key = UploadCache.key(url, path, st)
        hit = cache.get(key) if cache is not None else None
        if hit:
            result[path] = hit
        else:
            misses.append((path, key))

    def send(item: tuple[Path, str]) -> tuple[Path, str, str]:
        path, key = item
        return path, key, client.ensure_file(path)

    if misses:
        limit = workers or int(os.environ.get("CONTREE_CONCURRENCY", MAX_WORKERS) or MAX_WORKERS)
        with ThreadPoolExecutor(max_workers=max(1, min(limit, len(misses)))) as pool:
            for path, key, file_uuid in pool.map(send, misses):
                result[path] = file_uuid
                if cache is not None:
                    cache.put(key, file_uuid, path)
    return {Path(os.path.abspath(p)): result[Path(os.path.abspath(p))] for p in paths}, len(misses)
