"""Shell history: written line by line, shared between shells, deduped, capped."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from prompt_toolkit.history import ThreadedHistory

from contree_shell.state.history import MAX_LINES, PromptHistory, ShellHistory

KEY = "proj+00000000"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


def test_lines_are_stored_immediately_oldest_first(db: Path) -> None:
    h = ShellHistory(db, KEY)
    assert h.append("ls -l") is True
    assert h.append("cd /etc") is True
    # a fresh reader sees them without the writer closing or flushing anything
    assert ShellHistory(db, KEY).lines() == ["ls -l", "cd /etc"]


def test_two_shells_on_one_session_see_every_line(db: Path) -> None:
    a, b = ShellHistory(db, KEY), ShellHistory(db, KEY)
    a.append("one")
    b.append("two")
    a.append("three")
    assert a.lines() == b.lines() == ["one", "two", "three"]


def test_sessions_are_isolated(db: Path) -> None:
    ShellHistory(db, KEY).append("mine")
    ShellHistory(db, "other").append("theirs")
    assert ShellHistory(db, KEY).lines() == ["mine"]


def test_leading_space_and_blank_lines_are_not_stored(db: Path) -> None:
    h = ShellHistory(db, KEY)
    assert h.append(" secret --token abc") is False
    assert h.append("") is False
    assert h.append("   ") is False
    assert h.lines() == []


def test_consecutive_duplicate_is_skipped_even_across_shells(db: Path) -> None:
    a, b = ShellHistory(db, KEY), ShellHistory(db, KEY)
    a.append("make")
    assert b.append("make") is False
    a.append("make test")
    assert a.append("make") is True
    assert a.lines() == ["make", "make test", "make"]


def test_multiline_command_is_one_entry(db: Path) -> None:
    h = ShellHistory(db, KEY)
    h.append("for i in 1 2; do\n  echo $i\ndone")
    assert h.lines() == ["for i in 1 2; do\n  echo $i\ndone"]


def test_cap_trims_the_oldest(db: Path) -> None:
    h = ShellHistory(db, KEY, max_lines=5)
    for i in range(8):
        h.append(f"cmd {i}")
    assert h.lines() == [f"cmd {i}" for i in range(3, 8)]


def test_default_cap_is_ten_thousand_per_session(db: Path) -> None:
    h = ShellHistory(db, KEY)
    ShellHistory(db, "other").append("keep me")
    conn = sqlite3.connect(db)
    conn.executemany(
        "INSERT INTO shell_history(session_key, line, created_at) VALUES (?, ?, '')",
        [(KEY, f"old {i}") for i in range(MAX_LINES)],
    )
    conn.commit()
    h.append("new 1")
    h.append("new 2")
    lines = h.lines()
    assert MAX_LINES == 10_000
    assert len(lines) == 10_000
    assert lines[0] == "old 2" and lines[-2:] == ["new 1", "new 2"]
    assert ShellHistory(db, "other").lines() == ["keep me"]


def test_search_is_case_insensitive_substring(db: Path) -> None:
    h = ShellHistory(db, KEY)
    for line in ("git Status", "ls", "echo STATUS", "make"):
        h.append(line)
    assert h.search("status") == ["git Status", "echo STATUS"]
    assert h.search("zzz") == []


def test_last_limits_to_the_newest(db: Path) -> None:
    h = ShellHistory(db, KEY)
    for i in range(5):
        h.append(str(i))
    assert h.lines(last=2) == ["3", "4"]


def test_prompt_history_loads_newest_first_and_stores_through(db: Path) -> None:
    store = ShellHistory(db, KEY)
    store.append("first")
    store.append("second")
    ph = PromptHistory(store)
    assert list(ph.load_history_strings()) == ["second", "first"]
    ph.store_string("third")
    assert ShellHistory(db, KEY).lines() == ["first", "second", "third"]


def test_prompt_history_works_under_threaded_history(db: Path) -> None:
    import asyncio

    store = ShellHistory(db, KEY)
    store.append("a")
    store.append("b")
    threaded = ThreadedHistory(PromptHistory(store))

    async def load() -> list[str]:
        return [s async for s in threaded.load()]

    assert asyncio.run(load()) == ["b", "a"]
    threaded.append_string("c")
    assert store.lines() == ["a", "b", "c"]
    assert threaded.get_strings()[-1] == "c"
