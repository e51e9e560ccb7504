"""Completion data: persistent cache, stale-while-revalidate, invalidation, the toolbar flag.

The cache is the real SQLite one; the client is a stand-in whose listing the test can
hold open, so "while a refresh runs" is a state the test controls instead of a race.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from contree_shell.shell.completion.sources import Sources
from contree_shell.shell.status import Snapshot
from contree_shell.state.cache import CompletionCache


class HeldClient:
    """list_dir answers with `names`; while `gate` is clear it waits (a slow server)."""

    def __init__(self) -> None:
        self.names = ["etc"]
        self.calls = 0
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def list_dir(self, image: str, path: str) -> dict[str, Any]:
        self.calls += 1
        self.entered.set()
        self.gate.wait(10)
        return {"files": [{"path": n, "is_dir": True} for n in self.names]}

    def list_images(self, limit: int = 100) -> list[dict[str, Any]]:
        self.calls += 1
        return [{"uuid": "u" * 32, "tag": "busybox:latest"}]


def make(tmp_path: Path, clock: list[float]) -> tuple[Sources, HeldClient, list[int]]:
    client = HeldClient()
    ctx = SimpleNamespace(profile=SimpleNamespace(name="p"), client=client)
    redraws: list[int] = []
    cache = CompletionCache(tmp_path / "cache.db", clock=lambda: clock[0])
    return Sources(ctx, cache, on_refreshed=lambda: redraws.append(1)), client, redraws


def snap(image: str) -> Snapshot:
    return Snapshot("k", "main", image, 1, "/", 0, 0.0, True)


def test_a_miss_waits_and_says_refreshing_meanwhile(tmp_path: Path) -> None:
    sources, client, redraws = make(tmp_path, [1000.0])
    client.gate.clear()
    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(sources.list_dir("img", "/")))
    worker.start()
    assert client.entered.wait(10)
    assert sources.refreshing
    client.gate.set()
    worker.join(10)
    assert [e.name for e in result[0]] == ["etc"] and not sources.refreshing
    assert len(redraws) == 2
    sources.close()


def test_stale_entries_answer_at_once_and_refresh_in_the_background(tmp_path: Path) -> None:
    clock = [1000.0]
    sources, client, _ = make(tmp_path, clock)
    sources.list_dir("img", "/")
    clock[0] += 3600  # long past the TTL
    client.names = ["etc", "new"]
    client.gate.clear()
    client.entered.clear()
    assert [e.name for e in sources.list_dir("img", "/")] == ["etc"]  # stale, at once
    assert client.entered.wait(10) and sources.refreshing
    client.gate.set()
    while sources.refreshing:
        client.entered.wait(0.01)
    assert [e.name for e in sources.list_dir("img", "/")] == ["etc", "new"]
    sources.close()


def test_a_fresh_entry_is_served_from_the_cache(tmp_path: Path) -> None:
    sources, client, _ = make(tmp_path, [1000.0])
    sources.list_dir("img", "/")
    sources.list_dir("img", "/")
    assert client.calls == 1
    sources.close()


def test_a_new_image_drops_the_image_list_but_not_listings(tmp_path: Path) -> None:
    sources, client, _ = make(tmp_path, [1000.0])
    sources.images()
    sources.list_dir("img", "/")
    sources.after_command(snap("img"), snap("img2"))
    calls = client.calls
    sources.images()
    sources.list_dir("img", "/")
    assert client.calls == calls + 1  # the image list was fetched again, the listing not
    sources.close()
