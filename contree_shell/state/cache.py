"""Completion cache: small JSON values keyed by (namespace, kind) with a TTL.

Stale-while-revalidate: a value past its TTL is still returned (``fresh=False``)
so Tab answers at once while a background refresh fetches the new one. Unlike the
official cache, rows are bounded: anything older than a day is purged and the
table is capped, evicting the oldest rows.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contree_shell.state.db import connect, transaction

__all__ = ["MAX_AGE", "MAX_ROWS", "CompletionCache"]

MAX_ROWS = 5_000
MAX_AGE = 86_400.0


class CompletionCache:
    """The ``completion_cache`` table of a state DB. Safe to share between threads."""

    def __init__(
        self,
        db_path: Path | str,
        *,
        max_rows: int = MAX_ROWS,
        max_age: float = MAX_AGE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db_path = Path(db_path)
        self.max_rows = max_rows
        self.max_age = max_age
        self._clock = clock
        self._conn = connect(self.db_path)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the DB connection."""
        with self._lock:
            self._conn.close()

    def get(self, namespace: str, kind: str, ttl: float) -> tuple[Any, bool] | None:
        """``(value, fresh)`` for a cached entry, ``fresh`` being age < ``ttl``;
        None when absent, older than the purge age, or unreadable."""
        with self._lock:
            row = self._conn.execute(
                "SELECT value, fetched_at FROM completion_cache WHERE namespace = ? AND kind = ?",
                (namespace, kind),
            ).fetchone()
        if row is None:
            return None
        age = self._clock() - float(row[1])
        if age > self.max_age:
            return None
        try:
            value = json.loads(row[0])
        except ValueError:
            return None
        return value, age < ttl

    def put(self, namespace: str, kind: str, value: Any) -> None:
        """Store a JSON-serialisable value, then purge old rows and enforce the cap."""
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        now = self._clock()
        with self._lock, transaction(self._conn):
            self._conn.execute(
                "INSERT INTO completion_cache(namespace, kind, value, fetched_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT(namespace, kind) DO UPDATE SET "
                "value = excluded.value, fetched_at = excluded.fetched_at",
                (namespace, kind, text, now),
            )
            self._conn.execute(
                "DELETE FROM completion_cache WHERE fetched_at < ?", (now - self.max_age,)
            )
            self._conn.execute(
                """
                DELETE FROM completion_cache WHERE rowid IN (
                    SELECT rowid FROM completion_cache
                    ORDER BY fetched_at DESC, rowid DESC LIMIT -1 OFFSET ?
                )
                """,
                (self.max_rows,),
            )

    def invalidate(self, namespace: str, kind_prefix: str | None = None) -> int:
        """Drop a namespace's entries (only kinds starting with ``kind_prefix`` when
        given, matched literally). Returns the number of rows removed."""
        with self._lock, transaction(self._conn):
            if kind_prefix is None:
                cur = self._conn.execute(
                    "DELETE FROM completion_cache WHERE namespace = ?", (namespace,)
                )
            else:
                cur = self._conn.execute(
                    "DELETE FROM completion_cache WHERE namespace = ? AND substr(kind, 1, ?) = ?",
                    (namespace, len(kind_prefix), kind_prefix),
                )
            return cur.rowcount

    def invalidate_scope(self, namespace: str) -> int:
        """Drop every entry of ``namespace`` and of its sub-scopes
        ``<namespace>:*`` (``profile:dev`` clears ``profile:dev:<image>`` too, but
        not ``profile:dev2``). Returns the number of rows removed."""
        prefix = namespace + ":"
        with self._lock, transaction(self._conn):
            cur = self._conn.execute(
                "DELETE FROM completion_cache WHERE namespace = ? OR substr(namespace, 1, ?) = ?",
                (namespace, len(prefix), prefix),
            )
            return cur.rowcount

    def count(self) -> int:
        """Number of cached rows."""
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM completion_cache").fetchone()[0])
