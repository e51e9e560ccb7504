"""Prune no-op copy-ups from a run's overlay upper dir before it becomes a layer.

overlayfs copies a file up on any write-open or metadata change, and leaves copied-up
parent directories behind after create+delete. Removing every upper entry that is
identical to what the lower layers already show makes "did this run change anything?"
a cheap emptiness test, and keeps new layers small.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from contree_shell.sandbox.inspect import Hit, ImageView, is_opaque, is_whiteout, lookup

_OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")
_CHUNK = 1 << 16


@dataclass
class PruneStats:
    """How many upper entries were removed and how many remain (recursively), and the
    bytes the remaining non-directories hold."""

    removed: int = 0
    kept: int = 0
    kept_bytes: int = 0


def _xattrs(path: str) -> dict[str, bytes]:
    """Non-overlay xattrs of ``path`` (overlay's own markers are bookkeeping, not data)."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out: dict[str, bytes] = {}
    for name in names:
        if name.startswith(_OVERLAY_XATTR_PREFIXES):
            continue
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
    return out


def _has_redirect(path: str) -> bool:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return False
    return any(n.endswith("overlay.redirect") for n in names)


def same_bytes(a: str, b: str, size: int) -> bool:
    """Byte-compare two files already known to have ``size`` bytes; stop at the first
    difference."""
    if size == 0:
        return True
    try:
        with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
            while True:
                ca = fa.read(_CHUNK)
                cb = fb.read(_CHUNK)
                if ca != cb:
                    return False
                if not ca:
                    return True
    except OSError:
        return False


def _same_meta(up: os.stat_result, lo: os.stat_result, up_path: str, lo_path: str) -> bool:
    return (
        up.st_mode == lo.st_mode
        and up.st_uid == lo.st_uid
        and up.st_gid == lo.st_gid
        and _xattrs(up_path) == _xattrs(lo_path)
    )


def _same_leaf(up: os.stat_result, up_path: str, lower: Hit, keep_mtime_only: bool) -> bool:
    """True when a non-directory upper entry matches the lower one exactly."""
    lo = lower.st
    if stat.S_IFMT(up.st_mode) != stat.S_IFMT(lo.st_mode):
        return False
    if up.st_size != lo.st_size:
        return False
    if keep_mtime_only and up.st_mtime_ns != lo.st_mtime_ns:
        return False
    if not _same_meta(up, lo, up_path, lower.host_path):
        return False
    mode = up.st_mode
    if stat.S_ISREG(mode):
        return same_bytes(up_path, lower.host_path, up.st_size)
    if stat.S_ISLNK(mode):
        try:
            return os.readlink(up_path) == os.readlink(lower.host_path)
        except OSError:
            return False
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return up.st_rdev == lo.st_rdev
    return True  # fifo, socket: type and metadata are all there is


def _lower_is_empty(stack: tuple[str, ...]) -> bool:
    return not ImageView.entries(stack)


def _prune_dir(
    upper: str, lower: tuple[str, ...] | None, keep_mtime_only: bool, stats: PruneStats
) -> bool:
    """Prune inside ``upper`` (compared against the merged lower dir ``lower``, or
    nothing). Returns True when ``upper`` is empty afterwards."""
    kept = 0
    with os.scandir(upper) as it:
        entries = list(it)
    for de in entries:
        path = de.path
        try:
            st = os.lstat(path)
        except OSError:
            continue
        low = lookup(lower, de.name) if lower else None

        if is_whiteout(st):
            if low is None:  # hides nothing
                os.unlink(path)
                stats.removed += 1
            else:
                kept += 1
                stats.kept += 1
            continue

        if stat.S_ISDIR(st.st_mode):
            lower_dir = low if low is not None and stat.S_ISDIR(low.st.st_mode) else None
            opaque = is_opaque(path)
            if opaque and lower_dir is not None and not _lower_is_empty(lower_dir.stack):
                child_lower: tuple[str, ...] | None = None  # lower content is hidden
                removable = False
            else:
                child_lower = lower_dir.stack if lower_dir is not None else None
                removable = (
                    lower_dir is not None
                    and not _has_redirect(path)
                    and _same_meta(st, lower_dir.st, path, lower_dir.host_path)
                )
            empty = _prune_dir(path, child_lower, keep_mtime_only, stats)
            if empty and removable:
                os.rmdir(path)
                stats.removed += 1
            else:
                kept += 1
                stats.kept += 1
            continue

        if low is not None and _same_leaf(st, path, low, keep_mtime_only):
            os.unlink(path)
            stats.removed += 1
        else:
            kept += 1
            stats.kept += 1
            stats.kept_bytes += st.st_size
    return kept == 0


def prune(
    upper: os.PathLike[str] | str, lower: ImageView, *, keep_mtime_only: bool = False
) -> PruneStats:
    """Remove upper entries that change nothing in the merged view over ``lower``.

    Removed: files, symlinks and special files with the same type, mode, owner,
    non-overlay xattrs and content as below (mtime ignored unless ``keep_mtime_only``);
    whiteouts of names absent below; directories left empty that match the lower
    directory apart from mtime (directory mtimes are always ignored: create+delete
    inside leaves only that). Returns counts; the upper dir itself is never removed.
    """
    stats = PruneStats()
    _prune_dir(os.fspath(upper), lower.root_stack, keep_mtime_only, stats)
    return stats


def is_empty(path: os.PathLike[str] | str) -> bool:
    """True when the directory has no entries (the fast "nothing changed" test)."""
    with os.scandir(path) as it:
        return next(it, None) is None


# ------------------------------------------------------------------------ flattening

_FICLONE = 0x40049409  # ioctl(dest_fd, FICLONE, src_fd): share extents (btrfs, xfs)


@dataclass
class FlattenStats:
    """What a flatten copied: entries written and bytes of regular-file data."""

    entries: int = 0
    bytes: int = 0


def _copy_data(src: str, dest: str, size: int) -> None:
    """Copy a regular file's bytes: a reflink when the filesystem can, else an in-kernel
    copy, else a plain read/write loop."""
    fd_in = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fd_out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if size == 0:
                return
            try:
                import fcntl

                fcntl.ioctl(fd_out, _FICLONE, fd_in)
                return
            except OSError:
                pass
            done = 0
            try:
                while done < size:
                    n = os.copy_file_range(fd_in, fd_out, size - done)
                    if n == 0:
                        break
                    done += n
                return
            except OSError:
                os.lseek(fd_in, done, os.SEEK_SET)
                os.lseek(fd_out, done, os.SEEK_SET)
            while True:
                chunk = os.read(fd_in, 1 << 20)
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd_out, view) :]
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)


def copy_metadata(src: str, dest: str, st: os.stat_result) -> None:
    """Owner, mode, non-overlay xattrs and timestamps of ``src`` onto ``dest``.

    Order matters: chown clears set-id bits and file capabilities, so mode and xattrs
    come after it; writing xattrs touches ctime only, so times go last.
    """
    is_link = stat.S_ISLNK(st.st_mode)
    os.chown(dest, st.st_uid, st.st_gid, follow_symlinks=False)
    if not is_link:
        os.chmod(dest, stat.S_IMODE(st.st_mode))
    for name, value in _xattrs(src).items():
        try:
            os.setxattr(dest, name, value, follow_symlinks=False)
        except OSError:
            continue  # e.g. user.* on a symlink: the kernel allows none there
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _flatten_dir(
    stack: tuple[str, ...],
    dest: str,
    links: dict[tuple[int, int], str],
    stats: FlattenStats,
    on_entry: Callable[[FlattenStats], None] | None,
) -> None:
    for e in ImageView.entries(stack):
        src = e.host_path
        target = dest + "/" + e.name
        try:
            st = os.lstat(src)
        except OSError:
            continue
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            hit = lookup(stack, e.name)
            os.mkdir(target, 0o700)
            if hit is not None:
                _flatten_dir(hit.stack, target, links, stats, on_entry)
            copy_metadata(src, target, st)
        else:
            key = (st.st_dev, st.st_ino)
            first = links.get(key) if st.st_nlink > 1 else None
            if first is not None:
                os.link(first, target, follow_symlinks=False)  # keep hardlinks hardlinked
            else:
                if stat.S_ISREG(mode):
                    _copy_data(src, target, st.st_size)
                    stats.bytes += st.st_size
                elif stat.S_ISLNK(mode):
                    os.symlink(os.readlink(src), target)
                else:  # char/block devices, fifos, sockets
                    os.mknod(target, stat.S_IFMT(mode) | 0o600, st.st_rdev)
                copy_metadata(src, target, st)
                if st.st_nlink > 1:
                    links[key] = target
        stats.entries += 1
        if on_entry is not None:
            on_entry(stats)


def flatten(
    layers: Sequence[os.PathLike[str] | str],
    dest: os.PathLike[str] | str,
    *,
    on_entry: Callable[[FlattenStats], None] | None = None,
) -> FlattenStats:
    """Write the merged view of ``layers`` (bottom..top) into the empty directory
    ``dest`` as one plain layer.

    Types, modes, owners, mtimes, device numbers, symlink targets and xattrs are kept
    (overlay's own markers are not: the result is a bottom layer, nothing below it to
    hide). Names hardlinked in a source layer stay hardlinked in the copy. Whiteouts
    and opaque directories are resolved, never copied. File data is reflinked when the
    filesystem can. ``on_entry`` is called after every entry (progress, tests).
    """
    stack = tuple(os.fspath(p) for p in reversed(list(layers)))
    if not stack:
        raise ValueError("nothing to flatten")
    out = os.fspath(dest)
    stats = FlattenStats()
    _flatten_dir(stack, out, {}, stats, on_entry)
    copy_metadata(stack[0], out, os.lstat(stack[0]))
    return stats
