"""Completion cache: TTL freshness, stale-while-revalidate, invalidation, bounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from contree_shell.state.cache import CompletionCache
from contree_shell.state.sessions import SessionStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cache(tmp_path: Path, clock: Clock) -> CompletionCache:
    return CompletionCache(tmp_path / "state.db", clock=clock)


def test_missing_entry_is_none(cache: CompletionCache) -> None:
    assert cache.get("profile:local", "images", 60) is None


def test_value_is_fresh_within_ttl_then_stale(cache: CompletionCache, clock: Clock) -> None:
    cache.put("profile:local", "images", [{"uuid": "u1", "tag": "busybox"}])
    assert cache.get("profile:local", "images", 60) == ([{"uuid": "u1", "tag": "busybox"}], True)
    clock.now += 59
    assert cache.get("profile:local", "images", 60) == ([{"uuid": "u1", "tag": "busybox"}], True)
    clock.now += 2
    # stale values are still served, flagged for a background refresh
    assert cache.get("profile:local", "images", 60) == ([{"uuid": "u1", "tag": "busybox"}], False)
    cache.put("profile:local", "images", ["new"])
    assert cache.get("profile:local", "images", 60) == (["new"], True)


def test_entries_older_than_a_day_are_gone(cache: CompletionCache, clock: Clock) -> None:
    cache.put("ns", "k", 1)
    clock.now += 86_401
    assert cache.get("ns", "k", 10**9) is None
    cache.put("ns", "other", 2)  # any write purges old rows
    assert cache.count() == 1


def test_invalidate_namespace_and_kind_prefix(cache: CompletionCache) -> None:
    cache.put("profile:a", "images", 1)
    cache.put("profile:a", "images:bu", 2)
    cache.put("profile:a", "operations", 3)
    cache.put("profile:a", "images_x", 9)
    cache.put("profile:b", "images", 4)
    assert cache.invalidate("profile:a", "images:") == 1
    assert cache.get("profile:a", "images", 60) is not None
    assert cache.invalidate("profile:a", "images") == 2  # images and images_x
    assert cache.get("profile:a", "operations", 60) == (3, True)
    assert cache.invalidate("profile:a") == 1
    assert cache.get("profile:b", "images", 60) == (4, True)


def test_kind_prefix_is_literal_not_a_like_pattern(cache: CompletionCache) -> None:
    cache.put("ns", "files:/a_b/", 1)
    cache.put("ns", "files:/axb/", 2)
    assert cache.invalidate("ns", "files:/a_") == 1
    assert cache.get("ns", "files:/axb/", 60) == (2, True)


def test_invalidate_scope_covers_sub_scopes_only(cache: CompletionCache) -> None:
    cache.put("profile:dev", "images", 1)
    cache.put("profile:dev:img1", "files:/", 2)
    cache.put("profile:dev2", "images", 3)
    assert cache.invalidate_scope("profile:dev") == 2
    assert cache.get("profile:dev2", "images", 60) == (3, True)


def test_size_cap_evicts_the_oldest(tmp_path: Path, clock: Clock) -> None:
    cache = CompletionCache(tmp_path / "c.db", max_rows=10, clock=clock)
    for i in range(15):
        clock.now += 1
        cache.put("ns", f"k{i}", i)
    assert cache.count() == 10
    assert cache.get("ns", "k4", 10**6) is None
    assert cache.get("ns", "k5", 10**6) == (5, True)


def test_shares_the_state_db_with_sessions(tmp_path: Path, clock: Clock) -> None:
    db = tmp_path / "local.db"
    store = SessionStore(db)
    store.append("s", kind="use", image="i", title="i")
    cache = CompletionCache(db, clock=clock)
    cache.put("profile:local", "images", {"a": [1, 2]})
    other = CompletionCache(db, clock=clock)
    assert other.get("profile:local", "images", 5) == ({"a": [1, 2]}, True)
    assert store.tip("s") is not None


def test_non_ascii_values_round_trip(cache: CompletionCache) -> None:
    cache.put("ns", "k", {"name": "日本語", "n": None, "ok": True})
    assert cache.get("ns", "k", 60) == ({"name": "日本語", "n": None, "ok": True}, True)
