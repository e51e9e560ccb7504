"""Open the client state database: one SQLite file per profile, shared by every
shell and command of that profile (sessions, shell history, completion cache).

WAL lets readers proceed while one writer commits; every read-modify-write runs in
``BEGIN IMMEDIATE`` (see :func:`transaction`) so two processes appending to one
session serialize instead of forking the DAG behind each other's back.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from contree_shell.state.errors import StateError

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "StateError",
    "connect",
    "db_timeout",
    "schema_version",
    "transaction",
    "utc_now",
]

DEFAULT_TIMEOUT = 30.0


# Each entry upgrades the schema from version i to i+1. Never edit a released
# entry; append a new one.
MIGRATIONS: list[str] = [
    # 1: sessions (history DAG, branches, state, env, pending files), shell
    #    history, completion cache.
    """
    CREATE TABLE IF NOT EXISTS session_history (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        session_key TEXT NOT NULL,
        image_uuid TEXT NOT NULL,
        parent_id INTEGER REFERENCES session_history(id) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        title TEXT NOT NULL DEFAULT '',
        operation_uuid TEXT,
        created_at TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS idx_history_session ON session_history(session_key, id);
    CREATE INDEX IF NOT EXISTS idx_history_parent ON session_history(parent_id);
    CREATE TABLE IF NOT EXISTS session_branches (
        session_key TEXT NOT NULL,
        branch_name TEXT NOT NULL,
        history_id INTEGER NOT NULL REFERENCES session_history(id) ON DELETE CASCADE,
        PRIMARY KEY (session_key, branch_name)
    );
    CREATE TABLE IF NOT EXISTS session_state (
        session_key TEXT PRIMARY KEY,
        active_branch TEXT NOT NULL DEFAULT 'main',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE IF NOT EXISTS session_env (
        session_key TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (session_key, key)
    );
    CREATE TABLE IF NOT EXISTS session_files (
        history_id INTEGER NOT NULL REFERENCES session_history(id) ON DELETE CASCADE,
        instance_path TEXT NOT NULL,
        file_uuid TEXT NOT NULL,
        uid INTEGER NOT NULL DEFAULT 0,
        gid INTEGER NOT NULL DEFAULT 0,
        mode INTEGER NOT NULL DEFAULT 420,
        PRIMARY KEY (history_id, instance_path)
    );
    CREATE TABLE IF NOT EXISTS shell_history (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        session_key TEXT NOT NULL,
        line TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS idx_shell_history_session ON shell_history(session_key, id);
    CREATE TABLE IF NOT EXISTS completion_cache (
        namespace TEXT NOT NULL,
        kind TEXT NOT NULL,
        value TEXT NOT NULL,
        fetched_at REAL NOT NULL,
        PRIMARY KEY (namespace, kind)
    );
    CREATE INDEX IF NOT EXISTS idx_completion_cache_age ON completion_cache(fetched_at);
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)

# Migrating once per (process, file) is enough; later opens only check the version.
_migrated: set[str] = set()
_migrated_lock = threading.Lock()


def db_timeout() -> float:
    """Seconds to wait for a lock: ``CONTREE_DB_TIMEOUT`` or 30."""
    raw = os.environ.get("CONTREE_DB_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        return DEFAULT_TIMEOUT
    return value if value >= 0 else DEFAULT_TIMEOUT


def utc_now() -> str:
    """Current UTC time as ISO 8601 with second precision (the official format)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def connect(path: Path | str, *, timeout: float | None = None) -> sqlite3.Connection:
    """Open (creating and migrating as needed) the state DB at ``path``.

    The connection is in autocommit mode: callers group statements with
    :func:`transaction`. It may be shared across threads if the caller serializes
    its use (the stores hold a lock).
    """
    path = Path(path)
    wait = db_timeout() if timeout is None else timeout
    fresh = False
    if str(path) != ":memory:":
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.exists():
            # Create it private before SQLite does, so tokens in caches never sit
            # in a world-readable file.
            fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
            fresh = True
    try:
        return _open(path, wait, fresh)
    except sqlite3.OperationalError as exc:
        if _is_busy(exc):
            raise _busy(wait) from exc
        raise StateError(f"Cannot open state DB {path}: {exc}") from exc
    except sqlite3.DatabaseError as exc:
        raise StateError(
            f"Cannot open state DB {path}: {exc} (move it aside to start afresh)"
        ) from exc


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _busy(wait: float) -> StateError:
    return StateError(
        f"State DB is locked by another contree process (waited {wait:g}s); "
        "try again or raise CONTREE_DB_TIMEOUT"
    )


def _open(path: Path, wait: float, fresh: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=wait, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(wait * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = NORMAL")
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        if str(mode).lower() != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        key = str(path.resolve()) if str(path) != ":memory:" else ""
        if fresh or not key or key not in _migrated:
            _migrate(conn)
            if key:
                with _migrated_lock:
                    _migrated.add(key)
    except BaseException:
        conn.close()
        raise
    return conn


def schema_version(conn: sqlite3.Connection) -> int:
    """Schema version recorded in the DB (0 for an empty DB)."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'"
    ).fetchone()
    if not exists:
        return 0
    row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def _too_new(version: int) -> StateError:
    return StateError(
        f"State DB schema {version} is newer than this contree-shell supports "
        f"({SCHEMA_VERSION}); upgrade contree-shell"
    )


def _migrate(conn: sqlite3.Connection) -> None:
    found = schema_version(conn)
    if found > SCHEMA_VERSION:
        raise _too_new(found)
    if found == SCHEMA_VERSION:
        return
    with transaction(conn):
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        current = schema_version(conn)  # re-read under the write lock
        if current > SCHEMA_VERSION:
            raise _too_new(current)
        for version in range(current, SCHEMA_VERSION):
            for statement in _split_sql(MIGRATIONS[version]):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version(version) VALUES (?)", (version + 1,))


def _split_sql(script: str) -> list[str]:
    # executescript() would COMMIT our transaction; our migrations contain no
    # semicolons inside literals, so a plain split is safe.
    return [s.strip() for s in script.split(";") if s.strip()]


@contextmanager
def transaction(
    conn: sqlite3.Connection, *, immediate: bool = True
) -> Iterator[sqlite3.Connection]:
    """Run a block in one transaction; ``immediate`` takes the write lock up front
    so a read-then-write block cannot be overtaken by another writer."""
    try:
        conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    except sqlite3.OperationalError as exc:
        if _is_busy(exc):
            wait = conn.execute("PRAGMA busy_timeout").fetchone()[0] / 1000
            raise _busy(wait) from exc
        raise
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
