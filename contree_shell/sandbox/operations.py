"""Operations and their event logs, persisted in one SQLite database (WAL).

An operation is one asynchronous unit of work (an instance run or an image import).
Its event log is append-only; appending wakes every follower, both threads (a
Condition) and asyncio tasks (an `asyncio.Event` set through the owning loop), so
nothing that follows a log ever polls.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import sqlite3
import threading
import uuid as uuidlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

TERMINAL = frozenset({"SUCCESS", "FAILED", "CANCELLED"})
ACTIVE = frozenset({"PENDING", "ASSIGNED", "EXECUTING"})
STATUSES = TERMINAL | ACTIVE
KINDS = frozenset({"instance", "image_import"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS operations (
    uuid TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    started_at REAL NOT NULL,
    duration REAL,
    image_uuid TEXT,
    result_image_uuid TEXT,
    image_size INTEGER,
    consumed_cpu REAL,
    consumed_memory INTEGER,
    metadata TEXT NOT NULL,
    result TEXT
);
CREATE INDEX IF NOT EXISTS operations_created ON operations (created_at DESC, seq DESC);
CREATE INDEX IF NOT EXISTS operations_status ON operations (status);
CREATE TABLE IF NOT EXISTS events (
    op TEXT NOT NULL,
    id INTEGER NOT NULL,
    ts TEXT NOT NULL,
    spid INTEGER,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (op, id)
) WITHOUT ROWID;
"""


class OperationNotFound(KeyError):
    """No operation with that uuid."""


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def iso(dt: datetime) -> str:
    """ISO 8601 with at most 6 fractional digits and +00:00 (what the SDK parses)."""
    return dt.astimezone(UTC).isoformat(timespec="microseconds")


def iso_z(dt: datetime) -> str:
    """ISO 8601 with a `Z` suffix, the event timestamp style."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Operation:
    """One row of the operations table, decoded."""

    uuid: str
    kind: str
    status: str
    error: str | None
    created_at: datetime
    updated_at: datetime
    started_at: float  # time.time() at creation; drives the live duration
    duration: float | None
    image_uuid: str | None
    result_image_uuid: str | None
    image_size: int | None
    consumed_cpu: float | None
    consumed_memory: int | None
    metadata: dict[str, Any]
    result: dict[str, Any] | None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def live_duration(self) -> float:
        """Seconds so far (a number even while PENDING: the SDK requires it)."""
        if self.duration is not None:
            return self.duration
        return max(0.0, utcnow().timestamp() - self.started_at)


@dataclass
class Event:
    """One event of an operation's log."""

    id: int
    ts: str
    spid: int | None
    type: str
    data: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """The OperationEvent JSON object (no `spid` key when it has none)."""
        out: dict[str, Any] = {"id": self.id, "ts": self.ts}
        if self.spid is not None:
            out["spid"] = self.spid
        out["type"] = self.type
        out["data"] = self.data
        return out


@dataclass
class _Waiters:
    loops: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=set)
    # Keys with a wake-up already queued on their loop: a burst of appends (a run writes
    # init, spawn, exit, shutdown, completion within a millisecond) then costs the follower
    # one loop wake-up and one read instead of one per event.
    queued: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=set)


class Subscription:
    """An asyncio handle that is set whenever the operation's log grows.

    Use as: `sub.clear()`, read events, `await sub.wait(timeout)`; clearing before
    reading means no append between the read and the wait can be missed.
    """

    def __init__(self, db: OperationsDB, op: str) -> None:
        self._db = db
        self._op = op
        self._event = asyncio.Event()
        self._key = (asyncio.get_running_loop(), self._event)
        db._add_waiter(op, self._key)

    def clear(self) -> None:
        self._event.clear()

    async def wait(self, timeout: float | None) -> bool:
        """True when woken, False on timeout."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self._db._remove_waiter(self._op, self._key)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_COLUMNS = (
    "uuid, kind, status, error, created_at, updated_at, started_at, duration, image_uuid, "
    "result_image_uuid, image_size, consumed_cpu, consumed_memory, metadata, result"
)
_UPDATABLE = frozenset(
    {
        "status",
        "error",
        "duration",
        "image_uuid",
        "result_image_uuid",
        "image_size",
        "consumed_cpu",
        "consumed_memory",
        "metadata",
        "result",
    }
)


class OperationsDB:
    """The operations + events store. Thread-safe; one connection behind a lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)
        self._lock = threading.RLock()
        self.changed = threading.Condition(self._lock)
        self._next_id: dict[str, int] = {}
        self._waiters: dict[str, _Waiters] = {}
        row = self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM operations").fetchone()
        self._seq = int(row[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- operations ---------------------------------------------------------------

    def create(
        self,
        kind: str,
        metadata: dict[str, Any],
        *,
        image_uuid: str | None = None,
        op_uuid: str | None = None,
    ) -> Operation:
        """Insert a PENDING operation and return it."""
        now = utcnow()
        op = Operation(
            uuid=op_uuid or str(uuidlib.uuid4()),
            kind=kind,
            status="PENDING",
            error=None,
            created_at=now,
            updated_at=now,
            started_at=now.timestamp(),
            duration=None,
            image_uuid=image_uuid,
            result_image_uuid=None,
            image_size=None,
            consumed_cpu=None,
            consumed_memory=None,
            metadata=metadata,
            result=None,
        )
        with self._lock:
            self._seq += 1
            self._conn.execute(
                f"INSERT INTO operations (seq, {_COLUMNS}) VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    self._seq,
                    op.uuid,
                    kind,
                    op.status,
                    None,
                    iso(now),
                    iso(now),
                    op.started_at,
                    None,
                    image_uuid,
                    None,
                    None,
                    None,
                    None,
                    json.dumps(metadata),
                    None,
                ),
            )
            self._next_id[op.uuid] = 0
        return op

    def status(self, op_uuid: str) -> str:
        """Just the status (no decoding of the whole row); OperationNotFound if unknown."""
        with self._lock:
            row = self._conn.execute(
                "SELECT status FROM operations WHERE uuid = ?", (op_uuid,)
            ).fetchone()
        if row is None:
            raise OperationNotFound(op_uuid)
        return str(row[0])

    def get(self, op_uuid: str) -> Operation:
        """The operation; OperationNotFound if unknown."""
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_COLUMNS} FROM operations WHERE uuid = ?", (op_uuid,)
            ).fetchone()
        if row is None:
            raise OperationNotFound(op_uuid)
        return _decode(row)

    def list(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Operation]:
        """Operations newest first, filtered."""
        where: list[str] = []
        params: list[Any] = []
        if status:
            where.append("status = ?")
            params.append(status)
        if kind:
            where.append("kind = ?")
            params.append(kind)
        if since is not None:
            where.append("created_at >= ?")
            params.append(iso(since))
        if until is not None:
            where.append("created_at <= ?")
            params.append(iso(until))
        sql = f"SELECT {_COLUMNS} FROM operations"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, seq DESC LIMIT ? OFFSET ?"
        params += [limit, offset]
        with self._lock:
            rows = self._conn.execute(sql, params).fetchall()
        return [_decode(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Number of operations per status."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT status, COUNT(*) FROM operations GROUP BY status"
            ).fetchall()
        return {str(s): int(n) for s, n in rows}

    def update(self, op_uuid: str, **fields: Any) -> None:
        """Set columns of a non-terminal operation (terminal operations never change)."""
        self._set(op_uuid, fields, only_active=True)

    def finish(
        self, op_uuid: str, status: str, *, completion: dict[str, Any] | None = None, **fields: Any
    ) -> bool:
        """Move an active operation to a terminal status and append `completion` last.

        Atomic against concurrent finishers (cancel vs the worker): only the first one
        wins and gets True; the others change nothing.
        """
        assert status in TERMINAL
        with self._lock:
            op = self.get(op_uuid)
            if op.terminal:
                return False
            duration = fields.pop("duration", None)
            if duration is None:
                duration = op.live_duration()
            fields.update(status=status, duration=duration)
            self._set(op_uuid, fields, only_active=True)
            data = {
                "status": status,
                "result_image_uuid": fields.get("result_image_uuid"),
                "error": fields.get("error"),
                "duration_ms": round(duration * 1000),
                "image_size_bytes": fields.get("image_size"),
            }
            if completion:
                data.update(completion)
            self.append_event(op_uuid, "completion", data, spid=None)
        return True

    def _set(self, op_uuid: str, fields: dict[str, Any], *, only_active: bool) -> None:
        bad = set(fields) - _UPDATABLE
        if bad:
            raise ValueError(f"not updatable: {sorted(bad)}")
        cols = []
        params: list[Any] = []
        for key, value in fields.items():
            cols.append(f"{key} = ?")
            params.append(json.dumps(value) if key in ("metadata", "result") else value)
        cols.append("updated_at = ?")
        params.append(iso(utcnow()))
        sql = f"UPDATE operations SET {', '.join(cols)} WHERE uuid = ?"
        params.append(op_uuid)
        if only_active:
            sql += " AND status IN ('PENDING', 'ASSIGNED', 'EXECUTING')"
        with self._lock:
            self._conn.execute(sql, params)
            self.changed.notify_all()
        self._wake(op_uuid)

    # -- events -------------------------------------------------------------------

    def append_event(
        self, op_uuid: str, type_: str, data: dict[str, Any], *, spid: int | None = 0
    ) -> int:
        """Append one event and wake followers; returns its id."""
        ts = iso_z(utcnow())
        payload = json.dumps(data, separators=(",", ":"))
        with self._lock:
            next_id = self._next_id.get(op_uuid)
            if next_id is None:
                row = self._conn.execute(
                    "SELECT COALESCE(MAX(id) + 1, 0) FROM events WHERE op = ?", (op_uuid,)
                ).fetchone()
                next_id = int(row[0])
            self._conn.execute(
                "INSERT INTO events (op, id, ts, spid, type, data) VALUES (?, ?, ?, ?, ?, ?)",
                (op_uuid, next_id, ts, spid, type_, payload),
            )
            self._next_id[op_uuid] = next_id + 1
            self.changed.notify_all()
        self._wake(op_uuid)
        return next_id

    def events(
        self,
        op_uuid: str,
        *,
        after: int | None = None,
        spid: int | None = None,
        limit: int | None = None,
    ) -> builtins.list[Event]:
        """Events with id > after (all when None), optionally of one spid, in id order."""
        sql = "SELECT id, ts, spid, type, data FROM events WHERE op = ? AND id > ?"
        params: list[Any] = [op_uuid, -1 if after is None else after]
        if spid is not None:
            sql += " AND spid = ?"
            params.append(spid)
        sql += " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        with self._lock:
            rows = self._conn.execute(sql, params).fetchall()
        return [Event(int(i), str(ts), sp, str(t), json.loads(d)) for i, ts, sp, t, d in rows]

    def subscribe(self, op_uuid: str) -> Subscription:
        """An asyncio subscription to the operation's changes (call from a running loop)."""
        return Subscription(self, op_uuid)

    def _add_waiter(self, op: str, key: tuple[asyncio.AbstractEventLoop, asyncio.Event]) -> None:
        with self._lock:
            self._waiters.setdefault(op, _Waiters()).loops.add(key)

    def _remove_waiter(self, op: str, key: tuple[asyncio.AbstractEventLoop, asyncio.Event]) -> None:
        with self._lock:
            w = self._waiters.get(op)
            if w is not None:
                w.loops.discard(key)
                if not w.loops:
                    del self._waiters[op]

    def _wake(self, op: str) -> None:
        with self._lock:
            w = self._waiters.get(op)
            if w is None:
                return
            keys = [k for k in w.loops if k not in w.queued]
            w.queued.update(keys)
        for key in keys:
            try:
                key[0].call_soon_threadsafe(self._deliver, w, key)
            except RuntimeError:  # that loop is closed: its follower is gone
                with self._lock:
                    w.queued.discard(key)

    def _deliver(self, w: _Waiters, key: tuple[asyncio.AbstractEventLoop, asyncio.Event]) -> None:
        # On the follower's loop. Unqueue before setting: an append after this point
        # queues a new wake-up, so none is lost between the set and the follower's read.
        with self._lock:
            w.queued.discard(key)
        key[1].set()

    # -- startup ------------------------------------------------------------------

    def fail_unfinished(self, reason: str = "server restarted") -> builtins.list[str]:
        """Mark every non-terminal operation FAILED with a completion event."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT uuid FROM operations WHERE status IN ('PENDING','ASSIGNED','EXECUTING')"
            ).fetchall()
            uuids = [str(r[0]) for r in rows]
            for u in uuids:
                self.finish(u, "FAILED", error=reason)
        return uuids

    def active(self) -> Iterable[str]:
        """Uuids of the operations that are not terminal."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT uuid FROM operations WHERE status IN ('PENDING','ASSIGNED','EXECUTING')"
            ).fetchall()
        return [str(r[0]) for r in rows]


def _decode(row: tuple[Any, ...]) -> Operation:
    (
        u,
        kind,
        status,
        error,
        created,
        updated,
        started,
        duration,
        image_uuid,
        result_image,
        image_size,
        cpu,
        mem,
        metadata,
        result,
    ) = row
    return Operation(
        uuid=u,
        kind=kind,
        status=status,
        error=error,
        created_at=datetime.fromisoformat(created),
        updated_at=datetime.fromisoformat(updated),
        started_at=float(started),
        duration=duration,
        image_uuid=image_uuid,
        result_image_uuid=result_image,
        image_size=image_size,
        consumed_cpu=cpu,
        consumed_memory=mem,
        metadata=json.loads(metadata),
        result=json.loads(result) if result else None,
    )
