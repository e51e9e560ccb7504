"""Named completion sources: where candidate values come from.

Every source returns [] on any failure (no client, server down, bad data), so Tab never
raises and never prints. Remote data (sandbox directory listings, images, operations)
goes through the persistent CompletionCache, per profile (and per image for listings):
fresh entries are served as is; stale ones are served at once and refreshed on a
background thread (stale-while-revalidate); only a miss waits for the server.
`refreshing` is true while a refresh runs (the toolbar says so) and `on_refreshed` is
called when one lands.

Invalidation (`after_command`): a new image or a different session drops the image and
operation lists; every command drops the operation list (it may have started one).
Directory listings are keyed by image uuid and images never change, so they stay valid.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

__all__ = ["DIR_TTL", "IMAGE_TTL", "OPERATION_TTL", "Entry", "Sources", "host_entries"]

log = logging.getLogger(__name__)

DIR_TTL = 30.0
IMAGE_TTL = 60.0
OPERATION_TTL = 5.0


@dataclass(frozen=True)
class Entry:
    """One directory entry offered for completion."""

    name: str
    is_dir: bool
    is_link: bool = False  # a symlink: its target may be a directory (Debian's /bin)


def _entries_from_listing(body: Any) -> list[Entry]:
    """`DirectoryList` JSON → entries (symlinks count as files: their target is unknown)."""
    files = body.get("files") if isinstance(body, dict) else None
    entries: list[Entry] = []
    for item in files or []:
        if not isinstance(item, dict):
            continue
        name = str(item.get("path") or item.get("name") or "").rstrip("/").rsplit("/", 1)[-1]
        if name and name not in (".", ".."):
            entries.append(Entry(name, bool(item.get("is_dir")), bool(item.get("is_symlink"))))
    return entries


class Sources:
    """Completion data for one shell. `ctx` is the CLI Context (store, client, profile)."""

    def __init__(self, ctx: Any, cache: Any = None, *,
                 on_refreshed: Callable[[], None] | None = None,
                 client: Callable[[], Any] | None = None) -> None:
        self.ctx = ctx
        self._client = client or (lambda: ctx.client)
        self.cache = cache
        self.on_refreshed = on_refreshed
        self._refresh = ThreadPoolExecutor(max_workers=1, thread_name_prefix="completion")
        self._inflight: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    @property
    def refreshing(self) -> bool:
        """Whether a background refresh is running."""
        with self._lock:
            return bool(self._inflight)

    def after_command(self, before: Any, after: Any) -> None:
        """Drop what a command may have made stale (`before`/`after`: status Snapshots)."""
        if self.cache is None:
            return
        try:
            self.cache.invalidate(self._namespace(), "operations")
            if (before.image, before.key) != (after.image, after.key):
                self.cache.invalidate(self._namespace(), "images")
        except Exception:
            log.debug("cache invalidation failed", exc_info=True)

    def close(self) -> None:
        """Stop the background refresher (pending refreshes are dropped)."""
        self._refresh.shutdown(wait=False, cancel_futures=True)

    # -- local sources ------------------------------------------------------------------

    def branches(self) -> list[str]:
        """Branch names of this session."""
        try:
            return [name for name, _tip, _active in self.ctx.store.branches(self.ctx.session_key)]
        except Exception:
            log.debug("branch completion failed", exc_info=True)
            return []

    def sessions(self) -> list[str]:
        """Session keys of this profile."""
        try:
            return [state.key for state in self.ctx.store.sessions()]
        except Exception:
            log.debug("session completion failed", exc_info=True)
            return []

    def profiles(self) -> list[str]:
        """Configured profile names plus the built-in `local`."""
        try:
            from contree_shell.config import list_profiles

            names = [p.name for p in list_profiles()[0]]
        except Exception:
            log.debug("profile completion failed", exc_info=True)
            names = []
        return names if "local" in names else [*names, "local"]

    # -- remote sources -----------------------------------------------------------------

    def _namespace(self, scope: str = "") -> str:
        name = getattr(getattr(self.ctx, "profile", None), "name", "local")
        return f"profile:{name}" + (f":{scope}" if scope else "")

    def _cached(self, namespace: str, kind: str, ttl: float, fetch: Callable[[], Any]) -> Any:
        """Stale-while-revalidate around `fetch`; None when nothing could be had."""
        hit = None
        if self.cache is not None:
            try:
                hit = self.cache.get(namespace, kind, ttl)
            except Exception:
                log.debug("cache read failed", exc_info=True)
        if hit is not None:
            value, fresh = hit
            if not fresh:
                self._revalidate(namespace, kind, fetch)
            return value
        # A miss waits for the server (on the completer's thread, never the prompt's);
        # the toolbar says so meanwhile.
        key = (namespace, kind)
        with self._lock:
            self._inflight.add(key)
        self._notify()
        try:
            value = fetch()
        finally:
            with self._lock:
                self._inflight.discard(key)
            self._notify()
        self._store(namespace, kind, value)
        return value

    def _notify(self) -> None:
        if self.on_refreshed is not None:
            try:
                self.on_refreshed()
            except Exception:
                log.debug("toolbar redraw failed", exc_info=True)

    def _store(self, namespace: str, kind: str, value: Any) -> None:
        if self.cache is None:
            return
        try:
            self.cache.put(namespace, kind, value)
        except Exception:
            log.debug("cache write failed", exc_info=True)

    def _revalidate(self, namespace: str, kind: str, fetch: Callable[[], Any]) -> None:
        key = (namespace, kind)
        with self._lock:
            if key in self._inflight:
                return
            self._inflight.add(key)

        def work() -> None:
            try:
                self._store(namespace, kind, fetch())
            except Exception:
                log.debug("background refresh failed", exc_info=True)
            finally:
                with self._lock:
                    self._inflight.discard(key)
                self._notify()

        self._notify()  # show "refreshing completions…"
        try:
            self._refresh.submit(work)
        except RuntimeError:  # shut down
            with self._lock:
                self._inflight.discard(key)

    def list_dir(self, image: str | None, path: str) -> list[Entry]:
        """Entries of sandbox directory `path` in `image`."""
        if not image:
            return []
        directory = path if path.endswith("/") else path + "/"

        def fetch() -> list[list[Any]]:
            body = self._client().list_dir(image, directory)
            return [[e.name, e.is_dir, e.is_link] for e in _entries_from_listing(body)]

        try:
            rows = self._cached(self._namespace(image), f"ls:{directory}", DIR_TTL, fetch)
            return [Entry(str(row[0]), bool(row[1]), bool(row[2]) if len(row) > 2 else False)
                    for row in rows or []]
        except Exception:
            log.debug("directory completion failed for %s", directory, exc_info=True)
            return []

    def images(self) -> list[tuple[str, str]]:
        """(`tag:NAME` or uuid, meta) for the first page of images; a tagged image is
        listed under its uuid too (meta `tag:NAME`), for typed text that looks hex."""

        def fetch() -> list[list[str]]:
            rows = self._client().list_images(limit=100)
            out: list[list[str]] = []
            for row in rows:
                uuid = str(row.get("uuid") or "")
                tag = row.get("tag")
                if tag:
                    out.append([f"tag:{tag}", uuid[:8]])
                    if uuid:
                        out.append([uuid, f"tag:{tag}"])
                elif uuid:
                    out.append([uuid, "untagged"])
            return out

        try:
            rows = self._cached(self._namespace(), "images", IMAGE_TTL, fetch)
            return [(str(a), str(b)) for a, b in rows or []]
        except Exception:
            log.debug("image completion failed", exc_info=True)
            return []

    def operations(self) -> list[tuple[str, str]]:
        """(uuid, "STATUS kind") of the newest operations."""

        def fetch() -> list[list[str]]:
            rows = self._client().list_operations(limit=100)
            return [[str(r.get("uuid") or ""), f"{r.get('status') or ''} {r.get('kind') or ''}"
                     .strip()] for r in rows if r.get("uuid")]

        try:
            rows = self._cached(self._namespace(), "operations", OPERATION_TTL, fetch)
            return [(str(a), str(b)) for a, b in rows or []]
        except Exception:
            log.debug("operation completion failed", exc_info=True)
            return []

    def env_keys(self) -> list[str]:
        """Keys of the session's environment."""
        try:
            return sorted(self.ctx.store.env(self.ctx.session_key))
        except Exception:
            log.debug("env completion failed", exc_info=True)
            return []


def host_entries(directory: str) -> list[Entry]:
    """Entries of a local directory (for arguments that name a file on this machine)."""
    import os

    try:
        with os.scandir(os.path.expanduser(directory or ".")) as it:
            return [Entry(e.name, e.is_dir()) for e in it]
    except OSError:
        return []
