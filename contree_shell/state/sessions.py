"""The session store: a git-like history DAG per session key.

Concepts carry over from the official CLI's DB: every mutation *appends* a node to
``session_history`` whose parent is the branch tip, and moves the branch pointer
(``session_branches``) to it; ``session_state`` says which branch is checked out.
cwd and pending files are read from the chain behind the tip, so they follow
rollback and branches. Unlike the official store, every read-tip-then-write runs in
one ``BEGIN IMMEDIATE`` transaction, so concurrent appends to one session form a
linear chain and no node is lost.
"""

from __future__ import annotations

import os
import posixpath
import re
import sqlite3
import threading
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from contree_shell.state.db import connect, transaction, utc_now
from contree_shell.state.errors import NoSession, StateError

__all__ = [
    "DEFAULT_BRANCH",
    "NoSession",
    "Node",
    "PendingFile",
    "Ref",
    "SessionState",
    "SessionStore",
    "StateError",
    "derive_session_key",
    "display_cwd",
    "parse_ref",
    "parse_target",
    "resolve_path",
]

DEFAULT_BRANCH = "main"
# Branches created by detached/disposable runs; `prune` removes them.
PRUNABLE_PREFIXES = ("detached-", "disposable-")

_NODE_COLUMNS = "id, session_key, image_uuid, parent_id, kind, title, operation_uuid, created_at"


@dataclass(frozen=True)
class Node:
    """One entry of a session's history DAG."""

    id: int
    session_key: str
    image: str
    parent_id: int | None
    kind: str
    title: str
    operation_uuid: str | None
    created_at: str

    def as_row(self) -> dict[str, Any]:
        """The node as an output row (official column names)."""
        row = asdict(self)
        row["operation"] = row.pop("operation_uuid")
        return row


@dataclass(frozen=True)
class PendingFile:
    """A file staged for the next run (``session_files`` row of a ``file`` node)."""

    path: str
    file_uuid: str
    uid: int
    gid: int
    mode: int
    history_id: int


@dataclass
class SessionState:
    """Where a session stands: its checked-out branch and that branch's tip."""

    key: str
    branch: str
    tip: Node | None
    cwd: str
    depth: int
    updated_at: str = ""

    @property
    def image(self) -> str | None:
        """The current image (tip's image), or None for an empty session."""
        return self.tip.image if self.tip else None


# ---------------------------------------------------------------------------
# Pure helpers


@dataclass(frozen=True)
class Ref:
    """A parsed history reference: the tip, an absolute id, or N steps back/forward."""

    kind: Literal["tip", "abs", "back", "fwd"]
    n: int = 0


_REF_ABS = re.compile(r"[@:]?(\d+)")
_REF_BACK = re.compile(r"(?:[@:]-|HEAD~)(\d*)")
_REF_FWD = re.compile(r"[@:]\+(\d+)")
_TARGET = re.compile(r"([+-]?)(\d+)")


def parse_ref(ref: str) -> Ref:
    """Parse ``HEAD @ : @N :N N @-N :-N HEAD~N HEAD~ @+N :+N``.

    Raises StateError for malformed or zero references.
    """
    text = ref.strip()
    if text in ("HEAD", "@", ":"):
        return Ref("tip")
    for pattern, kind in ((_REF_ABS, "abs"), (_REF_BACK, "back"), (_REF_FWD, "fwd")):
        m = pattern.fullmatch(text)
        if m:
            digits = m.group(1)
            if kind == "back" and digits == "" and text == "HEAD~":
                return Ref("back", 1)
            if digits == "":
                break
            n = int(digits)
            if n == 0:
                raise StateError("History reference must be a non-zero number")
            return Ref(kind, n)  # type: ignore[arg-type]
    raise StateError(f"Invalid history reference '{ref}'")


def parse_target(target: str) -> Ref:
    """Parse a rollback target: ``-N`` back, ``+N`` forward, ``N`` absolute id
    (history reference forms such as ``HEAD~2`` are accepted too)."""
    text = target.strip()
    m = _TARGET.fullmatch(text)
    if m:
        n = int(m.group(2))
        if n == 0:
            raise StateError("Navigation target must not be 0")
        sign = m.group(1)
        return Ref("back" if sign == "-" else "fwd" if sign == "+" else "abs", n)
    try:
        return parse_ref(text)
    except StateError as exc:
        if "non-zero" in exc.message:
            raise StateError("Navigation target must not be 0") from None
        raise StateError(
            f"Invalid navigation target '{target}': use -N, +N or a history id"
        ) from None


def resolve_path(cwd: str, path: str) -> str:
    """Join ``path`` with a session cwd (``""`` = ``/``) and normalise it."""
    base = cwd if cwd.startswith("/") else "/" + cwd
    joined = posixpath.normpath(posixpath.join(base, path))
    if joined.startswith("//"):
        joined = "/" + joined.lstrip("/")
    return joined


def display_cwd(cwd: str) -> str:
    """A cwd as shown to users: the image default (``""``) is ``/``."""
    return cwd or "/"


def _tty_name() -> str:
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd):
                return os.ttyname(fd).replace("/", "_")
        except OSError:
            continue
    return "notty"


def derive_session_key(profile: str, explicit: str | None = None) -> str:
    """Session key: ``-S`` > ``CONTREE_SESSION`` > ``<dir>+<8 hex>``.

    The automatic key is stable for one terminal and parent shell per local
    directory name (the official rule, so both clients pick the same session).
    """
    if explicit:
        return explicit
    from_env = os.environ.get("CONTREE_SESSION", "").strip()
    if from_env:
        return from_env
    try:
        base = os.path.basename(os.getcwd())
    except OSError:
        base = ""
    seed = f"{profile}_{os.getppid()}_{_tty_name()}"
    digest = uuid.uuid5(uuid.NAMESPACE_OID, seed).hex[:8]
    return f"{base or 'session'}+{digest}"


def _kind_matches_sql(kind: str | None) -> tuple[str, list[Any]]:
    """SQL condition for a kind prefix: ``run`` matches ``run`` and ``run-detached``."""
    if not kind:
        return "", []
    return (
        " AND (kind = ? OR substr(kind, 1, ?) = ? OR substr(kind, 1, ?) = ?)",
        [kind, len(kind) + 1, kind + "-", len(kind) + 1, kind + " "],
    )


def _node(row: sqlite3.Row | tuple[Any, ...]) -> Node:
    return Node(
        id=int(row[0]),
        session_key=row[1],
        image=row[2],
        parent_id=row[3],
        kind=row[4],
        title=row[5],
        operation_uuid=row[6],
        created_at=row[7],
    )


# ---------------------------------------------------------------------------
# The store


class SessionStore:
    """Sessions in one profile's state DB. Safe to share between threads."""

    def __init__(self, db_path: Path | str) -> None:
        self.db_path = Path(db_path)
        self._conn = connect(self.db_path)
        self._lock = threading.RLock()

    def close(self) -> None:
        """Close the DB connection."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> SessionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- low-level reads (caller holds the lock; may be inside a transaction)

    def _get_node(self, node_id: int) -> Node | None:
        row = self._conn.execute(
            f"SELECT {_NODE_COLUMNS} FROM session_history WHERE id = ?", (node_id,)
        ).fetchone()
        return _node(row) if row else None

    def _session_node(self, key: str, node_id: int) -> Node:
        node = self._get_node(node_id)
        if node is None or node.session_key != key:
            raise StateError(f"History entry {node_id} not found in this session")
        return node

    def _active_branch(self, key: str) -> str | None:
        row = self._conn.execute(
            "SELECT active_branch FROM session_state WHERE session_key = ?", (key,)
        ).fetchone()
        return row[0] if row else None

    def _branch_tip(self, key: str, branch: str) -> Node | None:
        row = self._conn.execute(
            "SELECT history_id FROM session_branches WHERE session_key = ? AND branch_name = ?",
            (key, branch),
        ).fetchone()
        return self._get_node(int(row[0])) if row else None

    def _tip(self, key: str) -> tuple[str, Node | None]:
        branch = self._active_branch(key) or DEFAULT_BRANCH
        return branch, self._branch_tip(key, branch)

    def _require_tip(self, key: str) -> tuple[str, Node]:
        branch, tip = self._tip(key)
        if tip is None:
            raise NoSession(key)
        return branch, tip

    def _depth(self, node_id: int) -> int:
        row = self._conn.execute(
            """
            WITH RECURSIVE chain(id, parent_id) AS (
                SELECT id, parent_id FROM session_history WHERE id = ?
                UNION ALL
                SELECT h.id, h.parent_id FROM session_history h JOIN chain c ON h.id = c.parent_id
            )
            SELECT COUNT(*) FROM chain
            """,
            (node_id,),
        ).fetchone()
        return int(row[0])

    def _cwd(self, node_id: int) -> str:
        # Walk parents, stopping at the first cd node.
        row = self._conn.execute(
            """
            WITH RECURSIVE chain(id, parent_id, kind, title) AS (
                SELECT id, parent_id, kind, title FROM session_history WHERE id = ?
                UNION ALL
                SELECT h.id, h.parent_id, h.kind, h.title
                FROM session_history h JOIN chain c ON h.id = c.parent_id
                WHERE c.kind != 'cd'
            )
            SELECT title FROM chain WHERE kind = 'cd' LIMIT 1
            """,
            (node_id,),
        ).fetchone()
        return row[0] if row else ""

    def _touch(self, key: str, branch: str | None = None) -> None:
        now = utc_now()
        self._conn.execute(
            """
            INSERT INTO session_state(session_key, active_branch, created_at, updated_at)
            VALUES (?, ?, ?, ?)
            ON CONFLICT(session_key) DO UPDATE SET
                updated_at = excluded.updated_at,
                active_branch = COALESCE(?, session_state.active_branch)
            """,
            (key, branch or DEFAULT_BRANCH, now, now, branch),
        )

    def _set_branch(self, key: str, branch: str, node_id: int) -> None:
        self._conn.execute(
            """
            INSERT INTO session_branches(session_key, branch_name, history_id) VALUES (?, ?, ?)
            ON CONFLICT(session_key, branch_name) DO UPDATE SET history_id = excluded.history_id
            """,
            (key, branch, node_id),
        )

    def _insert_node(
        self,
        key: str,
        *,
        parent: Node | None,
        kind: str,
        image: str,
        title: str,
        operation_uuid: str | None,
    ) -> Node:
        created = utc_now()
        cur = self._conn.execute(
            """
            INSERT INTO session_history
                (session_key, image_uuid, parent_id, kind, title, operation_uuid, created_at)
            VALUES (?, ?, ?, ?, ?, ?, ?)
            """,
            (key, image, parent.id if parent else None, kind, title, operation_uuid, created),
        )
        node_id = cur.lastrowid
        assert node_id is not None
        return Node(
            node_id, key, image, parent.id if parent else None, kind, title, operation_uuid, created
        )

    def _state(self, key: str) -> SessionState | None:
        row = self._conn.execute(
            "SELECT active_branch, updated_at FROM session_state WHERE session_key = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        branch, updated = row[0], row[1]
        tip = self._branch_tip(key, branch)
        if tip is None:
            return SessionState(key, branch, None, "", 0, updated)
        return SessionState(key, branch, tip, self._cwd(tip.id), self._depth(tip.id), updated)

    # -- reading

    def state(self, key: str) -> SessionState | None:
        """The session's state, or None if it has never been used."""
        with self._lock:
            return self._state(key)

    def tip(self, key: str) -> Node | None:
        """Tip of the active branch, or None for an unknown session."""
        with self._lock:
            return self._tip(key)[1]

    def cwd(self, key: str) -> str:
        """Title of the nearest ``cd`` node behind the tip; ``""`` = image default."""
        with self._lock:
            _, tip = self._tip(key)
            return self._cwd(tip.id) if tip else ""

    def depth(self, key: str) -> int:
        """Number of nodes from the tip to the root (0 for an empty session)."""
        with self._lock:
            _, tip = self._tip(key)
            return self._depth(tip.id) if tip else 0

    def node(self, key: str, node_id: int) -> Node:
        """History entry ``node_id`` of this session (StateError if absent)."""
        with self._lock:
            return self._session_node(key, node_id)

    def history(
        self, key: str, *, last: int | None = 20, kind: str | None = None, all: bool = False
    ) -> list[Node]:
        """Nodes of the session's DAG (every branch), newest last.

        ``kind`` is a prefix: ``run`` matches ``run`` and ``run-detached``.
        ``all`` (or ``last=None``) returns every node instead of the last ``last``.
        """
        cond, params = _kind_matches_sql(kind)
        sql = f"SELECT {_NODE_COLUMNS} FROM session_history WHERE session_key = ?{cond} ORDER BY id DESC"
        args: list[Any] = [key, *params]
        if not all and last is not None:
            sql += " LIMIT ?"
            args.append(max(0, last))
        with self._lock:
            rows = self._conn.execute(sql, args).fetchall()
        return [_node(r) for r in reversed(rows)]

    def history_count(self, key: str, *, kind: str | None = None) -> int:
        """How many nodes :meth:`history` could return (for "Showing last N of M")."""
        cond, params = _kind_matches_sql(kind)
        with self._lock:
            row = self._conn.execute(
                f"SELECT COUNT(*) FROM session_history WHERE session_key = ?{cond}",
                [key, *params],
            ).fetchone()
        return int(row[0])

    def ancestry(self, key: str, *, last: int | None = None) -> list[Node]:
        """The chain from the root to the active tip (newest last)."""
        with self._lock:
            _, tip = self._tip(key)
            if tip is None:
                return []
            rows = self._conn.execute(
                f"""
                WITH RECURSIVE chain(id, parent_id, n) AS (
                    SELECT id, parent_id, 0 FROM session_history WHERE id = ?
                    UNION ALL
                    SELECT h.id, h.parent_id, c.n + 1
                    FROM session_history h JOIN chain c ON h.id = c.parent_id
                )
                SELECT {", ".join("h." + c.strip() for c in _NODE_COLUMNS.split(","))}
                FROM chain JOIN session_history h ON h.id = chain.id
                ORDER BY chain.n {"LIMIT ?" if last is not None else ""}
                """,
                (tip.id, last) if last is not None else (tip.id,),
            ).fetchall()
        return [_node(r) for r in reversed(rows)]

    def branch_labels(self, key: str) -> dict[int, list[str]]:
        """Map node id → names of the branches pointing at it (for ``show``)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT history_id, branch_name FROM session_branches WHERE session_key = ? "
                "ORDER BY branch_name",
                (key,),
            ).fetchall()
        labels: dict[int, list[str]] = {}
        for node_id, name in rows:
            labels.setdefault(int(node_id), []).append(name)
        return labels

    def resolve_ref(self, key: str, ref: str) -> Node:
        """Resolve a history reference (see :func:`parse_ref`) to a node."""
        parsed = parse_ref(ref)
        with self._lock:
            return self._navigate(key, parsed)

    def _navigate(self, key: str, ref: Ref) -> Node:
        if ref.kind == "abs":
            return self._session_node(key, ref.n)
        _, tip = self._require_tip(key)
        if ref.kind == "tip":
            return tip
        node = tip
        if ref.kind == "back":
            for step in range(ref.n):
                parent = self._get_node(node.parent_id) if node.parent_id is not None else None
                if parent is None:
                    raise StateError(
                        f"Cannot go back {ref.n} steps: only {step} ancestors available"
                    )
                node = parent
            return node
        for step in range(ref.n):
            row = self._conn.execute(
                f"SELECT {_NODE_COLUMNS} FROM session_history WHERE parent_id = ? "
                "ORDER BY id DESC LIMIT 1",
                (node.id,),
            ).fetchone()
            if row is None:
                raise StateError(f"Cannot go forward {ref.n} steps: only {step} children available")
            node = _node(row)
        return node

    # -- writing

    def append(
        self,
        key: str,
        *,
        kind: str,
        image: str,
        title: str = "",
        operation_uuid: str | None = None,
        branch: str | None = None,
    ) -> Node:
        """Append a node at the tip of the active branch (or of ``branch``) and move
        that branch to it, in one transaction. The first append creates the session
        on ``main``. A ``branch`` that does not exist yet forks from the active tip
        (used for ``detached-<op>`` / ``disposable-<op>``); the active branch is
        not changed by it."""
        with self._lock, transaction(self._conn):
            return self._append(
                key,
                kind=kind,
                image=image,
                title=title,
                operation_uuid=operation_uuid,
                branch=branch,
            )

    def _append(
        self,
        key: str,
        *,
        kind: str,
        image: str | None,
        title: str,
        operation_uuid: str | None,
        branch: str | None,
    ) -> Node:
        active, active_tip = self._tip(key)
        target = branch or active
        parent = active_tip if target == active else (self._branch_tip(key, target) or active_tip)
        if image is None:
            if parent is None:
                raise NoSession(key)
            image = parent.image
        node = self._insert_node(
            key, parent=parent, kind=kind, image=image, title=title, operation_uuid=operation_uuid
        )
        self._set_branch(key, target, node.id)
        self._touch(key)
        return node

    def add_file(
        self,
        key: str,
        path: str,
        file_uuid: str,
        uid: int = 0,
        gid: int = 0,
        mode: int = 0o644,
        *,
        title: str | None = None,
    ) -> Node:
        """Stage a file for the next run: a ``file`` node (same image as the tip)
        plus its ``session_files`` row, in one transaction."""
        with self._lock, transaction(self._conn):
            node = self._append(
                key,
                kind="file",
                image=None,
                title=title if title is not None else f"Change file {path}",
                operation_uuid=None,
                branch=None,
            )
            self._conn.execute(
                "INSERT INTO session_files(history_id, instance_path, file_uuid, uid, gid, mode) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (node.id, path, file_uuid, uid, gid, mode),
            )
            return node

    def pending_files(self, key: str) -> list[PendingFile]:
        """Files staged since the last run on this branch; the newest per path wins."""
        with self._lock:
            _, tip = self._tip(key)
            if tip is None:
                return []
            rows = self._conn.execute(
                """
                WITH RECURSIVE chain(id, parent_id, kind, n) AS (
                    SELECT id, parent_id, kind, 0 FROM session_history WHERE id = ?
                    UNION ALL
                    SELECT h.id, h.parent_id, h.kind, c.n + 1
                    FROM session_history h JOIN chain c ON h.id = c.parent_id
                    WHERE c.kind != 'run' AND c.kind NOT LIKE 'run-%'
                )
                SELECT f.instance_path, f.file_uuid, f.uid, f.gid, f.mode, f.history_id
                FROM chain JOIN session_files f ON f.history_id = chain.id
                WHERE chain.kind = 'file'
                ORDER BY chain.n
                """,
                (tip.id,),
            ).fetchall()
        seen: dict[str, PendingFile] = {}
        for path, file_uuid, uid, gid, mode, hid in rows:
            if path not in seen:
                seen[path] = PendingFile(path, file_uuid, int(uid), int(gid), int(mode), int(hid))
        return [seen[p] for p in sorted(seen)]

    def rollback(self, key: str, target: str = "-1") -> Node:
        """Move the active branch pointer: ``-N`` back, ``+N`` forward (newest
        child at a fork), ``N`` to history id N of this session. Nothing is deleted."""
        ref = parse_target(target)
        with self._lock, transaction(self._conn):
            branch, _ = self._require_tip(key)
            node = self._navigate(key, ref)
            self._set_branch(key, branch, node.id)
            self._touch(key)
            return node

    # -- branches

    def branches(self, key: str) -> list[tuple[str, Node, bool]]:
        """(name, tip, active) for every branch of the session, by name."""
        with self._lock:
            active = self._active_branch(key)
            rows = self._conn.execute(
                f"SELECT b.branch_name, {', '.join('h.' + c.strip() for c in _NODE_COLUMNS.split(','))} "
                "FROM session_branches b JOIN session_history h ON h.id = b.history_id "
                "WHERE b.session_key = ? ORDER BY b.branch_name",
                (key,),
            ).fetchall()
        return [(r[0], _node(r[1:]), r[0] == active) for r in rows]

    @staticmethod
    def _check_branch_name(name: str) -> None:
        if (
            not name
            or name != name.strip()
            or any(c.isspace() for c in name)
            or name.startswith("-")
        ):
            raise StateError(f"Invalid branch name '{name}'")

    def create_branch(self, key: str, name: str, *, from_branch: str | None = None) -> Node:
        """Create branch ``name`` at the tip of ``from_branch`` (default: active)."""
        self._check_branch_name(name)
        with self._lock, transaction(self._conn):
            if self._branch_tip(key, name) is not None:
                raise StateError(f"Branch '{name}' already exists")
            if from_branch is None:
                _, source = self._require_tip(key)
            else:
                found = self._branch_tip(key, from_branch)
                if found is None:
                    raise StateError(f"Branch '{from_branch}' does not exist")
                source = found
            self._set_branch(key, name, source.id)
            self._touch(key)
            return source

    def checkout(self, key: str, name: str) -> Node:
        """Make ``name`` the active branch; returns its tip."""
        with self._lock, transaction(self._conn):
            tip = self._branch_tip(key, name)
            if tip is None:
                raise StateError(f"Branch '{name}' does not exist")
            self._touch(key, branch=name)
            return tip

    def delete_branch(self, key: str, name: str) -> None:
        """Delete a branch pointer (its nodes stay in the DAG)."""
        with self._lock, transaction(self._conn):
            if self._branch_tip(key, name) is None:
                raise StateError(f"Branch '{name}' does not exist")
            if (self._active_branch(key) or DEFAULT_BRANCH) == name:
                raise StateError("Cannot delete the active branch")
            self._conn.execute(
                "DELETE FROM session_branches WHERE session_key = ? AND branch_name = ?",
                (key, name),
            )
            self._touch(key)

    def prune_branches(self, key: str) -> list[str]:
        """Delete every non-active ``detached-*`` / ``disposable-*`` branch."""
        with self._lock, transaction(self._conn):
            active = self._active_branch(key) or DEFAULT_BRANCH
            names = [
                r[0]
                for r in self._conn.execute(
                    "SELECT branch_name FROM session_branches WHERE session_key = ? "
                    "ORDER BY branch_name",
                    (key,),
                )
                if r[0] != active and r[0].startswith(PRUNABLE_PREFIXES)
            ]
            self._conn.executemany(
                "DELETE FROM session_branches WHERE session_key = ? AND branch_name = ?",
                [(key, n) for n in names],
            )
            if names:
                self._touch(key)
            return names

    # -- sessions

    def sessions(self, filter: str | None = None) -> list[SessionState]:
        """Every session (``filter`` = substring of the key), most recently updated first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT session_key FROM session_state ORDER BY updated_at DESC, rowid DESC"
            ).fetchall()
            out = []
            for (key,) in rows:
                if filter and filter not in key:
                    continue
                st = self._state(key)
                if st is not None:
                    out.append(st)
            return out

    def find_session(self, ref: str) -> str:
        """Resolve a session reference: the exact key, else a unique key ending in
        ``ref`` (a literal suffix match, unlike the official LIKE pattern)."""
        with self._lock:
            keys = [r[0] for r in self._conn.execute("SELECT session_key FROM session_state")]
        if ref in keys:
            return ref
        matches = sorted(k for k in keys if ref and k.endswith(ref))
        if not matches:
            raise StateError(f"Session '{ref}' not found")
        if len(matches) > 1:
            raise StateError(f"Ambiguous session '{ref}': matches {', '.join(matches)}")
        return matches[0]

    def delete(self, key: str) -> bool:
        """Delete everything stored for a session (history, branches, state, env,
        pending files, shell history). Returns whether it existed."""
        with self._lock, transaction(self._conn):
            existed = (
                self._conn.execute(
                    "SELECT 1 FROM session_state WHERE session_key = ? UNION ALL "
                    "SELECT 1 FROM session_history WHERE session_key = ? LIMIT 1",
                    (key, key),
                ).fetchone()
                is not None
            )
            self._conn.execute("DELETE FROM session_branches WHERE session_key = ?", (key,))
            self._conn.execute(
                "DELETE FROM session_files WHERE history_id IN "
                "(SELECT id FROM session_history WHERE session_key = ?)",
                (key,),
            )
            self._conn.execute("DELETE FROM session_history WHERE session_key = ?", (key,))
            self._conn.execute("DELETE FROM session_state WHERE session_key = ?", (key,))
            self._conn.execute("DELETE FROM session_env WHERE session_key = ?", (key,))
            self._conn.execute("DELETE FROM shell_history WHERE session_key = ?", (key,))
            return existed

    # -- env (per session; not versioned, like the official store)

    def env(self, key: str) -> dict[str, str]:
        """The session's environment variables, sorted by name."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT key, value FROM session_env WHERE session_key = ? ORDER BY key", (key,)
            ).fetchall()
        return {k: v for k, v in rows}

    def set_env(self, key: str, name: str, value: str) -> None:
        """Set one session environment variable."""
        if not name or "=" in name:
            raise StateError(f"Invalid environment variable name '{name}'")
        with self._lock, transaction(self._conn):
            self._conn.execute(
                "INSERT INTO session_env(session_key, key, value) VALUES (?, ?, ?) "
                "ON CONFLICT(session_key, key) DO UPDATE SET value = excluded.value",
                (key, name, value),
            )

    def unset_env(self, key: str, names: Iterable[str]) -> list[str]:
        """Remove variables; returns the names that were set."""
        removed: list[str] = []
        with self._lock, transaction(self._conn):
            for name in names:
                cur = self._conn.execute(
                    "DELETE FROM session_env WHERE session_key = ? AND key = ?", (key, name)
                )
                if cur.rowcount:
                    removed.append(name)
        return removed
