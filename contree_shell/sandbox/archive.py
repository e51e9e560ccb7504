"""Stream a PAX tar of a path inside an image, straight from its overlay layers.

The archive is produced as a generator of byte chunks: headers come from the standard
library's ``tarfile.TarInfo`` (PAX flavour, so long names, big sizes, non-UTF-8 names and
xattrs all fit), file contents are copied in ``chunk``-sized reads, and nothing is ever
held whole in memory. Validation happens in :func:`archive_check`, which the HTTP layer
calls before it sends the status line, so errors map to 404/422 instead of a cut stream.

Naming follows the Contree API: a directory's members are rooted at its basename
(``/etc`` → ``etc/``, ``etc/hosts``), a single file is one member named by its basename,
and ``/`` gives relative names without a prefix (no member for the root itself).
The requested path's own symlinks are resolved inside the image (``/bin`` → ``usr/bin``
is archived as ``bin/…``); symlinks below it are stored as symlinks, never followed.
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
import zlib
from collections.abc import Iterator

from contree_shell.sandbox.inspect import (
    EntryStat,
    ImageView,
    NotAFile,
    PathNotFound,
    lookup,
)

BLOCK = 512
RECORD = 20 * BLOCK  # tar's historical record size; readers accept shorter, writers pad
DEFAULT_CHUNK = 64 * 1024
GZIP_LEVEL = 6
# Overlay bookkeeping, never part of the image's content.
_SKIPPED_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")


class NotArchivable(NotAFile):
    """The requested path is neither a regular file, a directory nor a symlink to one
    (a socket, fifo or device): the HTTP layer answers 422."""


def _components(path: str) -> list[str]:
    return [c for c in path.split("/") if c and c != "."]


def archive_check(view: ImageView, path: str) -> str:
    """Validate ``path`` for :func:`iter_archive` and return its normalized form.

    The result keeps the requested final name (its last symlink is not resolved, middle
    ones and ``..`` are), so ``iter_archive(view, archive_check(view, p))`` archives the
    same thing with the same member names as ``iter_archive(view, p)``.
    Raises PathNotFound (404) or NotArchivable, a NotAFile (422).
    """
    normalized = view.normalize(path or "/", follow=False)
    target = view.stat(path or "/", follow=True)
    if not (target.is_dir or target.is_regular):
        raise NotArchivable(f"{normalized}: not a regular file or directory")
    return normalized


def archive_filename(path: str, *, gzip: bool = False) -> str:
    """The download name: the path with ``/`` → ``_`` plus ``.tar`` (``/bin/true`` →
    ``bin_true.tar``); ``/`` is ``root.tar``. Quotes, backslashes and control characters
    become ``_`` so the name is safe inside a Content-Disposition header."""
    name = "_".join(_components(path)) or "root"
    name = "".join("_" if (c in '"\\' or ord(c) < 0x20 or ord(c) == 0x7F) else c for c in name)
    return name + (".tar.gz" if gzip else ".tar")


# ------------------------------------------------------------------------ owners


def _id_names(view: ImageView, path: str) -> dict[int, str]:
    """``id → name`` from an image's passwd/group file; empty when absent or unreadable."""
    try:
        st = view.stat(path)
        if not st.is_regular or st.size > 16 * 1024 * 1024:
            return {}
        data = view.read(path)
    except (OSError, NotAFile):
        return {}
    out: dict[int, str] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[0] and not fields[0].startswith("#"):
            try:
                out.setdefault(int(fields[2]), fields[0])
            except ValueError:
                continue
    return out


# ------------------------------------------------------------------------ members


def _xattrs(host_path: str) -> dict[str, str]:
    """PAX records for a file's extended attributes, overlay markers left out.

    Values are raw bytes; surrogateescape lets tarfile write them back byte for byte
    (it switches the header to ``hdrcharset=BINARY`` when needed)."""
    try:
        names = os.listxattr(host_path, follow_symlinks=False)
    except OSError:
        return {}
    out: dict[str, str] = {}
    for name in sorted(names):
        if name.startswith(_SKIPPED_XATTR_PREFIXES):
            continue
        try:
            value = os.getxattr(host_path, name, follow_symlinks=False)
        except OSError:
            continue
        out["SCHILY.xattr." + name] = value.decode("utf-8", "surrogateescape")
    return out


class _Writer:
    """Turns members into tar bytes, coalescing small pieces into ``chunk``-sized yields
    and optionally gzip-compressing the whole stream."""

    def __init__(self, view: ImageView, chunk: int, gzip: bool) -> None:
        self.chunk = max(BLOCK, chunk)
        self.users = _id_names(view, "/etc/passwd")
        self.groups = _id_names(view, "/etc/group")
        self.inodes: dict[tuple[int, int], str] = {}
        self.buf = bytearray()
        self.total = 0
        self.z = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31) if gzip else None

    # -- output plumbing
    def _out(self, data: bytes | bytearray | memoryview) -> Iterator[bytes]:
        self.total += len(data)
        if self.z is not None:
            data = self.z.compress(data)
            if not data:
                return
        if len(data) >= self.chunk and not self.buf:
            yield bytes(data)
            return
        self.buf += data
        if len(self.buf) >= self.chunk:
            out = bytes(self.buf)
            self.buf.clear()
            yield out

    def finish(self) -> Iterator[bytes]:
        # Two zero blocks end the archive; pad to a whole record like tar(1) does.
        end = 2 * BLOCK
        end += -(self.total + end) % RECORD
        yield from self._out(bytes(end))
        tail = bytes(self.buf)
        self.buf.clear()
        if self.z is not None:
            tail += self.z.flush()
        if tail:
            yield tail

    # -- members
    def member(self, name: str, e: EntryStat) -> Iterator[bytes]:
        """Header (and content) for one entry; sockets are skipped like tar(1) does."""
        info = tarfile.TarInfo(name)
        info.mode = stat.S_IMODE(e.mode)
        info.uid, info.gid = e.uid, e.gid
        info.uname = self.users.get(e.uid, "")
        info.gname = self.groups.get(e.gid, "")
        info.mtime = e.mtime
        info.pax_headers = _xattrs(e.host_path) if not e.is_symlink else {}
        content = False
        if e.is_dir:
            info.type = tarfile.DIRTYPE
        elif e.is_symlink:
            info.type = tarfile.SYMTYPE
            info.linkname = e.symlink_to
        elif e.is_regular:
            key = self._inode_key(e)
            first = self.inodes.get(key) if key else None
            if first is not None:
                info.type = tarfile.LNKTYPE
                info.linkname = first
            else:
                if key:
                    self.inodes[key] = name
                info.type = tarfile.REGTYPE
                info.size = e.size
                content = True
        elif stat.S_ISCHR(e.mode) or stat.S_ISBLK(e.mode):
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(e.mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(e.rdev), os.minor(e.rdev)
        elif e.is_fifo:
            info.type = tarfile.FIFOTYPE
        else:
            return  # sockets cannot be archived
        if content:
            # Open before the header goes out so an unreadable file is skipped whole
            # instead of leaving a header without its data.
            try:
                fd = os.open(e.host_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                return
            try:
                yield from self._out(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
                yield from self._content(fd, e.size)
            finally:
                os.close(fd)
        else:
            yield from self._out(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def _inode_key(self, e: EntryStat) -> tuple[int, int] | None:
        if e.nlink < 2:
            return None
        try:
            st = os.lstat(e.host_path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def _content(self, fd: int, size: int) -> Iterator[bytes]:
        """Exactly ``size`` bytes of the file then block padding; a file that shrank
        underneath is padded with zeros so the archive stays well-formed."""
        left = size
        while left > 0:
            data = os.read(fd, min(self.chunk, left))
            if not data:
                data = bytes(min(self.chunk, left))
            left -= len(data)
            yield from self._out(data)
        pad = -size % BLOCK
        if pad:
            yield from self._out(bytes(pad))


def iter_archive(
    view: ImageView, path: str, *, gzip: bool = False, chunk: int = DEFAULT_CHUNK
) -> Iterator[bytes]:
    """Yield a PAX tar of ``path`` (see the module docstring for naming) in chunks of
    roughly ``chunk`` bytes, gzip-compressed when ``gzip``.

    Errors the caller must map (PathNotFound, NotArchivable) are raised before the first
    byte is produced: the generator validates eagerly on its first ``next()``; call
    :func:`archive_check` first to fail before committing a response.
    """
    normalized = archive_check(view, path)
    target_path = view.normalize(normalized, follow=True)
    root = view.stat(normalized, follow=True)
    name = normalized.rsplit("/", 1)[-1]
    w = _Writer(view, chunk, gzip)
    if root.is_regular:
        yield from w.member(name, root)
        yield from w.finish()
        return
    stack = _stack_of(view, target_path)
    prefix = "" if target_path == "/" and not name else name + "/"
    if prefix:
        yield from w.member(name, root)
    # Depth-first, name-ordered, with an explicit stack so deep trees cannot overflow.
    todo: list[tuple[str, Iterator[EntryStat], tuple[str, ...]]] = [
        (prefix, iter(ImageView.entries(stack)), stack)
    ]
    while todo:
        base, entries, dir_stack = todo[-1]
        e = next(entries, None)
        if e is None:
            todo.pop()
            continue
        member = base + e.name
        yield from w.member(member, e)
        if e.is_dir:
            sub = lookup(dir_stack, e.name)
            if sub is not None:
                todo.append((member + "/", iter(ImageView.entries(sub.stack)), sub.stack))
    yield from w.finish()


def _stack_of(view: ImageView, resolved: str) -> tuple[str, ...]:
    """The layer directories (top first) merging into the directory ``resolved``, a
    path already free of symlinks and ``..``."""
    stack = view.root_stack
    for comp in _components(resolved):
        hit = lookup(stack, comp)
        if hit is None or not hit.stack:
            raise PathNotFound(errno.ENOENT, "No such file or directory", resolved)
        stack = hit.stack
    return stack
