"""Shell history per session key, written line by line.

The official shell loads history at start and saves it only at exit, so its own
`history` builtin misses the current lines and a crash loses them. Here every
accepted line is committed at once, and every reader queries the DB, so two shells
on one session see each other's lines.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

from prompt_toolkit.history import History

from contree_shell.state.db import connect, transaction, utc_now

__all__ = ["MAX_LINES", "PromptHistory", "ShellHistory"]

MAX_LINES = 10_000


class ShellHistory:
    """The ``shell_history`` rows of one session key."""

    def __init__(
        self, db_path: Path | str, session_key: str, *, max_lines: int = MAX_LINES
    ) -> None:
        self.db_path = Path(db_path)
        self.session_key = session_key
        self.max_lines = max_lines
        self._conn = connect(self.db_path)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the DB connection."""
        with self._lock:
            self._conn.close()

    def append(self, line: str) -> bool:
        """Store ``line`` now. Lines starting with a space, blank lines and a repeat
        of the session's previous line are skipped. Returns whether it was stored."""
        if not line.strip() or line.startswith(" "):
            return False
        key = self.session_key
        with self._lock, transaction(self._conn):
            prev = self._conn.execute(
                "SELECT line FROM shell_history WHERE session_key = ? ORDER BY id DESC LIMIT 1",
                (key,),
            ).fetchone()
            if prev is not None and prev[0] == line:
                return False
            self._conn.execute(
                "INSERT INTO shell_history(session_key, line, created_at) VALUES (?, ?, ?)",
                (key, line, utc_now()),
            )
            # Trim the oldest rows beyond the cap (keeps exactly max_lines).
            self._conn.execute(
                """
                DELETE FROM shell_history WHERE session_key = ? AND id <= (
                    SELECT id FROM shell_history WHERE session_key = ?
                    ORDER BY id DESC LIMIT 1 OFFSET ?
                )
                """,
                (key, key, self.max_lines),
            )
        return True

    def lines(self, *, last: int | None = None) -> list[str]:
        """Stored lines, oldest first (including lines other shells appended)."""
        sql = "SELECT line FROM shell_history WHERE session_key = ? ORDER BY id DESC"
        args: tuple[object, ...] = (self.session_key,)
        if last is not None:
            sql += " LIMIT ?"
            args = (self.session_key, max(0, last))
        with self._lock:
            rows = self._conn.execute(sql, args).fetchall()
        return [r[0] for r in reversed(rows)]

    def search(self, pattern: str) -> list[str]:
        """Lines containing ``pattern``, case-insensitively, oldest first."""
        needle = pattern.casefold()
        return [line for line in self.lines() if needle in line.casefold()]

    def clear(self) -> None:
        """Forget every line of this session."""
        with self._lock, transaction(self._conn):
            self._conn.execute(
                "DELETE FROM shell_history WHERE session_key = ?", (self.session_key,)
            )


class PromptHistory(History):
    """prompt_toolkit history backed by :class:`ShellHistory`.

    Loading queries SQLite, so wrap it in ``ThreadedHistory`` in the REPL.
    """

    def __init__(self, store: ShellHistory) -> None:
        super().__init__()
        self.store = store

    def load_history_strings(self) -> Iterable[str]:
        """Newest first, as prompt_toolkit expects."""
        return list(reversed(self.store.lines()))

    def store_string(self, string: str) -> None:
        """Persist one accepted line immediately."""
        self.store.append(string)
