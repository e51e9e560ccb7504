"""Sandbox path resolution against the session cwd (one rule for ls, cat, cd and the shell)."""

from __future__ import annotations

import posixpath


def resolve_path(cwd: str, path: str | None = None) -> str:
    """Return the absolute, normalised sandbox path for `path` typed in directory `cwd`.

    `cwd` is the session cwd ("" means the image default, shown as "/"). An empty or
    missing `path` means the cwd itself. `..` never climbs above "/".

    >>> resolve_path("/etc", "../tmp/./x/")
    '/tmp/x'
    >>> resolve_path("", None)
    '/'
    """
    base = cwd or "/"
    if not base.startswith("/"):
        base = "/" + base
    joined = posixpath.join(base, path) if path else base
    normal = posixpath.normpath(joined)
    # POSIX keeps a leading "//" as implementation-defined; the sandbox does not care.
    if normal.startswith("//"):
        normal = "/" + normal.lstrip("/")
    return normal


def display_cwd(cwd: str) -> str:
    """The cwd as people see it: the image default ("") is shown as "/"."""
    return cwd or "/"
