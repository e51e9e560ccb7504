"""What the prompt and the toolbar show, read once per command (never per keystroke)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from contree_shell.shell.context import ShellContext

__all__ = ["ImageLabels", "Snapshot", "take_snapshot"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """The session as of the last command."""

    key: str
    branch: str
    image: str | None
    depth: int
    cwd: str  # as displayed ("/" for the image default)
    status: int
    duration: float
    ran: bool  # False before the first command (no status to show yet)


def take_snapshot(sh: ShellContext, *, ran: bool = True) -> Snapshot:
    """Read the session state; a broken store shows an empty session, never raises."""
    from contree_shell.cli.paths import display_cwd

    try:
        state = sh.ctx.store.state(sh.key)
    except Exception:
        log.debug("reading the session failed", exc_info=True)
        state = None
    if state is None:
        return Snapshot(sh.key, "main", None, 0, "/", sh.last.status, sh.last.duration, ran)
    image = state.tip.image if state.tip is not None else None
    return Snapshot(
        key=sh.key, branch=state.branch, image=image, depth=int(state.depth or 0),
        cwd=display_cwd(state.cwd or ""), status=sh.last.status, duration=sh.last.duration,
        ran=ran,
    )


class ImageLabels:
    """uuid → `tag` or short uuid. Tags are looked up on a background thread, once per
    image; `on_change` (the app's invalidate) redraws the toolbar when one arrives."""

    def __init__(self, client: Callable[[], Any], on_change: Callable[[], None] | None = None
                 ) -> None:
        self._client = client
        self._labels: dict[str, str] = {}
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self.on_change = on_change
        # Lookups wait for this (the REPL sets it once the first prompt is drawn, so
        # the first frame never shares the CPU with a network client starting up).
        self.ready = threading.Event()
        self.ready.set()

    def label(self, image: str | None) -> str:
        """The best label known now; starts a lookup for an unknown image."""
        if not image:
            return "-"
        with self._lock:
            known = self._labels.get(image)
            if known is not None:
                return known
            start = image not in self._pending
            self._pending.add(image)
        if start:
            threading.Thread(target=self._lookup, args=(image,), daemon=True,
                             name="image-label").start()
        return image[:8]

    def _lookup(self, image: str) -> None:
        self.ready.wait()
        label = image[:8]
        try:
            body = self._client().get_image(image)
            tag = body.get("tag") if isinstance(body, dict) else None
            tags = body.get("tags") if isinstance(body, dict) else None
            if not tag and isinstance(tags, list) and tags:
                tag = tags[0]
            if tag:
                label = str(tag)
        except Exception:
            log.debug("image label lookup failed", exc_info=True)
        with self._lock:
            self._labels[image] = label
            self._pending.discard(image)
        if self.on_change is not None and label != image[:8]:
            try:
                self.on_change()
            except Exception:
                log.debug("toolbar redraw failed", exc_info=True)
