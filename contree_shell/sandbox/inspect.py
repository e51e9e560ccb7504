"""Read an image's filesystem through its layer list in pure Python, without mounting.

The merge follows overlayfs: the topmost layer holding a name wins; a char device 0/0
(or an OCI ``.wh.NAME`` file) hides the name in the layers below; a directory marked
opaque (``trusted.overlay.opaque=y``, ``user.overlay.opaque=y`` or an OCI
``.wh..wh..opq`` file) stops the merge. Every path, including symlink targets, is
resolved against the image root: ``..`` never climbs above ``/`` and absolute symlinks
restart at the image root, so nothing outside the layers is ever read.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

MAX_SYMLINK_HOPS = 40  # same bound as the kernel's ELOOP
OCI_WHITEOUT = ".wh."
OCI_OPAQUE = ".wh..wh..opq"
_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")


class PathNotFound(FileNotFoundError):
    """The path does not exist in the image (or a middle component is not a directory)."""


class SymlinkLoop(PathNotFound):
    """More than MAX_SYMLINK_HOPS symlinks were followed while resolving a path."""


class NotADirectory(Exception):
    """A directory operation was asked of something that is not a directory."""


class NotAFile(Exception):
    """A file operation was asked of something that is not a regular file."""


@dataclass(frozen=True)
class EntryStat:
    """One merged directory entry, as ``lstat`` shows it in the topmost layer holding it."""

    name: str
    mode: int  # full st_mode, file-type bits included
    size: int
    uid: int
    gid: int
    mtime: int
    nlink: int
    symlink_to: str = ""
    rdev: int = 0  # device number of char/block devices
    # Where the entry physically lives; internal, never shown to users.
    host_path: str = field(default="", repr=False, compare=False)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_regular(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_socket(self) -> bool:
        return stat.S_ISSOCK(self.mode)

    @property
    def is_fifo(self) -> bool:
        return stat.S_ISFIFO(self.mode)


@dataclass(frozen=True)
class Hit:
    """A name found in a merged directory: its lstat, its file and, for a directory,
    the stack of layer directories (top first) that merge into it."""

    st: os.stat_result
    host_path: str
    stack: tuple[str, ...] = ()


def is_whiteout(st: os.stat_result) -> bool:
    """True for the kernel's whiteout marker: a char device with device number 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque(path: str) -> bool:
    """True when the layer directory at ``path`` hides everything below it."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        names = []
    for name in _OPAQUE_XATTRS:
        if name in names:
            try:
                if os.getxattr(path, name, follow_symlinks=False) == b"y":
                    return True
            except OSError:
                pass
    return os.path.lexists(os.path.join(path, OCI_OPAQUE))


def lookup(stack: tuple[str, ...] | list[str], name: str) -> Hit | None:
    """Find ``name`` in the merged directory made of ``stack`` (layer dirs, top first).

    Returns None when the name is absent or whited out. No symlink is followed.
    """
    if name.startswith(OCI_WHITEOUT):
        return None  # OCI markers are metadata, never entries
    top: Hit | None = None
    below: list[str] = []
    for i, d in enumerate(stack):
        path = d + "/" + name
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            if os.path.lexists(d + "/" + OCI_WHITEOUT + name):
                break  # whited out: nothing further down is visible
            continue
        except ValueError:  # NUL byte in the name
            return None
        except OSError:
            break  # unreadable layer dir (ENAMETOOLONG, EACCES): treat as the bottom
        if is_whiteout(st):
            break
        if top is None:
            if not stat.S_ISDIR(st.st_mode):
                return Hit(st, path)
            top = Hit(st, path)
            below = [path]
            if i == len(stack) - 1 or is_opaque(path):
                break
            continue
        # Below the winning directory: only directories keep merging.
        if not stat.S_ISDIR(st.st_mode):
            break
        below.append(path)
        if i < len(stack) - 1 and is_opaque(path):
            break
    if top is None:
        return None
    return Hit(top.st, top.host_path, tuple(below))


def _entry(name: str, hit: Hit) -> EntryStat:
    st = hit.st
    target = ""
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(hit.host_path)
        except OSError:
            target = ""
    return EntryStat(
        name=name,
        mode=st.st_mode,
        size=st.st_size,
        uid=st.st_uid,
        gid=st.st_gid,
        mtime=int(st.st_mtime),
        nlink=st.st_nlink,
        symlink_to=target,
        rdev=st.st_rdev,
        host_path=hit.host_path,
    )


def _components(path: str) -> list[str]:
    return [c for c in path.split("/") if c and c != "."]


class ImageView:
    """A read-only merged view of an image given its layers (bottom..top)."""

    def __init__(self, layers: list[Path]) -> None:
        if not layers:
            raise ValueError("an image needs at least one layer")
        self._root: tuple[str, ...] = tuple(os.fspath(p) for p in reversed(layers))

    @property
    def root_stack(self) -> tuple[str, ...]:
        """Layer root directories, top first (the merged ``/``)."""
        return self._root

    def _resolve(self, path: str, follow: bool) -> tuple[list[str], Hit]:
        """Walk ``path`` component by component inside the image.

        Returns the canonical components and the final hit. Symlinks in the middle are
        always followed, the last one only when ``follow``.
        """
        if path.endswith("/"):
            follow = True  # POSIX: a trailing slash resolves a final symlink
        root_st = os.lstat(self._root[0])
        root = Hit(root_st, self._root[0], self._root)
        names: list[str] = []
        hits: list[Hit] = [root]
        queue = deque(_components(path))
        hops = 0
        while queue:
            comp = queue.popleft()
            if comp == "..":
                if names:
                    names.pop()
                    hits.pop()
                continue
            parent = hits[-1]
            if not stat.S_ISDIR(parent.st.st_mode):
                raise PathNotFound(errno.ENOTDIR, "Not a directory", "/" + "/".join(names))
            hit = lookup(parent.stack, comp)
            if hit is None:
                raise PathNotFound(
                    errno.ENOENT, "No such file or directory", "/" + "/".join([*names, comp])
                )
            if stat.S_ISLNK(hit.st.st_mode) and (queue or follow):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise SymlinkLoop(errno.ELOOP, "Too many levels of symbolic links", path)
                try:
                    target = os.readlink(hit.host_path)
                except OSError as exc:
                    raise PathNotFound(errno.ENOENT, str(exc), path) from None
                if target.startswith("/"):
                    names, hits = [], [root]
                queue.extendleft(reversed(_components(target)))
                continue
            names.append(comp)
            hits.append(hit)
        return names, hits[-1]

    def stat(self, path: str, *, follow: bool = True) -> EntryStat:
        """Merged lstat (or stat with ``follow``) of ``path``; PathNotFound if missing."""
        names, hit = self._resolve(path, follow)
        return _entry(names[-1] if names else "/", hit)

    def normalize(self, path: str, *, follow: bool = True) -> str:
        """The canonical absolute path of ``path`` inside the image."""
        names, _ = self._resolve(path, follow)
        return "/" + "/".join(names)

    def listdir(self, path: str) -> tuple[str, list[EntryStat]]:
        """The normalized directory path and its merged entries sorted by name."""
        names, hit = self._resolve(path, True)
        if not stat.S_ISDIR(hit.st.st_mode):
            raise NotADirectory(f"{'/' + '/'.join(names)}: Not a directory")
        return "/" + "/".join(names), self.entries(hit.stack)

    @staticmethod
    def entries(stack: tuple[str, ...] | list[str]) -> list[EntryStat]:
        """Merged entries of the directory made of ``stack`` (layer dirs, top first)."""
        seen: set[str] = set()
        out: list[EntryStat] = []
        for d in stack:
            hidden: set[str] = set()
            try:
                it = os.scandir(d)
            except OSError:
                continue
            with it:
                for de in it:
                    name = de.name
                    if name.startswith(OCI_WHITEOUT):
                        if name != OCI_OPAQUE:
                            hidden.add(name[len(OCI_WHITEOUT) :])
                        continue
                    if name in seen:
                        continue
                    seen.add(name)
                    try:
                        st = de.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if is_whiteout(st):
                        continue
                    out.append(_entry(name, Hit(st, de.path)))
            seen |= hidden
        out.sort(key=lambda e: e.name)
        return out

    def walk(self, path: str = "/") -> Iterator[tuple[str, list[EntryStat]]]:
        """Depth-first, name-ordered ``(dir path, entries)`` for ``path`` and every
        directory below it. Symlinks below the start are reported, never followed."""
        names, hit = self._resolve(path, True)
        if not stat.S_ISDIR(hit.st.st_mode):
            raise NotADirectory(f"{'/' + '/'.join(names)}: Not a directory")
        todo: list[tuple[str, tuple[str, ...]]] = [("/" + "/".join(names), hit.stack)]
        while todo:
            dir_path, stack = todo.pop()
            entries = self.entries(stack)
            yield dir_path, entries
            prefix = dir_path.rstrip("/") + "/"
            for e in reversed(entries):
                if e.is_dir:
                    sub = lookup(stack, e.name)
                    if sub is not None:
                        todo.append((prefix + e.name, sub.stack))

    def open(self, path: str) -> BinaryIO:
        """Open a regular file for reading (symlinks followed inside the image)."""
        names, hit = self._resolve(path, True)
        if not stat.S_ISREG(hit.st.st_mode):
            raise NotAFile(f"{'/' + '/'.join(names)}: not a regular file")
        # O_NOFOLLOW: the host path's last component was lstat'ed as a regular file.
        fd = os.open(hit.host_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        return os.fdopen(fd, "rb")

    def read(self, path: str) -> bytes:
        """The whole content of a regular file."""
        with self.open(path) as f:
            return f.read()


# ------------------------------------------------------------------------ text listing

_SIX_MONTHS = 182 * 24 * 3600


def _ls_time(mtime: int, now: float) -> str:
    t = time.localtime(mtime)
    if abs(now - mtime) < _SIX_MONTHS:
        return time.strftime("%b %d %H:%M", t)
    return time.strftime("%b %d  %Y", t)


def format_ls(
    dir_path: str | Sequence[EntryStat],
    entries: Sequence[EntryStat] | None = None,
    *,
    now: float | None = None,
) -> str:
    """An ``ls -l``-like listing of ``entries``: ``total <KiB>`` then one row per entry.

    ``total`` approximates ls's allocated-size sum with 4 KiB blocks (fast symlinks use
    none). Rows show names only, so ``dir_path`` is informational; ``format_ls(entries)``
    is accepted too.
    """
    if entries is None:
        if isinstance(dir_path, str):
            raise TypeError("format_ls() needs the entries to list")
        entries = dir_path
    now = time.time() if now is None else now
    total = sum(0 if e.is_symlink else -(-e.size // 4096) * 4 for e in entries)
    rows = [
        (
            stat.filemode(e.mode),
            str(e.nlink),
            str(e.uid),
            str(e.gid),
            str(e.size),
            _ls_time(e.mtime, now),
            e.name + (" -> " + e.symlink_to if e.is_symlink else ""),
        )
        for e in entries
    ]
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(5)]
    lines = [f"total {total}"]
    for perm, nlink, uid, gid, size, when, name in rows:
        lines.append(
            f"{perm} {nlink:>{widths[1]}} {uid:<{widths[2]}} {gid:<{widths[3]}} "
            f"{size:>{widths[4]}} {when} {name}"
        )
    return "\n".join(lines) + "\n"
