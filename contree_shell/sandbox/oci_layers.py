"""OCI/Docker layer tars → overlay upper-dir layers, safely.

A layer tar is untrusted input. Every entry name is normalised and refused when it is
absolute or climbs with ``..``; the extraction walks to each parent with
``O_NOFOLLOW|O_DIRECTORY`` directory fds, so nothing is ever written through a symlink
(``a -> /etc`` followed by ``a/passwd`` fails instead of touching the host). Hard links
may only point at earlier entries of the same layer; device nodes are refused. OCI
whiteouts become what the kernel writes itself: ``.wh.NAME`` → a char device 0/0 named
NAME, ``.wh..wh..opq`` → ``trusted.overlay.opaque=y`` on the parent directory.

The tar is read as a stream (``tarfile`` ``r|`` mode): memory use does not grow with the
layer size.
"""

from __future__ import annotations

import base64
import errno
import gzip
import hashlib
import os
import shutil
import stat
import tarfile
import urllib.parse
import zlib
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any, BinaryIO

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"

_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Xattrs a layer may carry into the store. Overlay's own trusted.* markers (opaque,
# redirect, metacopy, origin) are refused: a layer must not be able to forge them.
_XATTR_PREFIXES = ("user.", "security.capability", "system.posix_acl_")


class ImportFailed(Exception):
    """A user-caused import failure; ``str(exc)`` is one line for the user."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class HashingReader:
    """Wraps a binary stream and hashes every byte read through it."""

    def __init__(self, raw: IO[bytes], algorithm: str = "sha256") -> None:
        self.raw = raw
        self.hash = hashlib.new(algorithm)
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.hash.update(data)
        self.count += len(data)
        return data

    def drain(self) -> None:
        """Read (and hash) what is left: trailing padding counts toward the digest."""
        while self.read(_CHUNK):
            pass

    def digest(self) -> str:
        return f"{self.hash.name}:{self.hash.hexdigest()}"


def sniff_compression(head: bytes) -> str | None:
    """Compression of a layer from its first bytes: "gzip", "zstd" or None (plain tar)."""
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    return None


class _Peekable:
    """A stream whose first bytes were read for sniffing and are served again."""

    def __init__(self, raw: IO[bytes], head: bytes) -> None:
        self.raw = raw
        self.head = head

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n < 0:
                data, self.head = self.head + self.raw.read(), b""
                return data
            data, self.head = self.head[:n], self.head[n:]
            if len(data) < n:
                data += self.raw.read(n - len(data))
            return data
        return self.raw.read(n)


def _decompressor(raw: IO[bytes], compression: str | None) -> IO[bytes]:
    if compression == "auto":
        head = raw.read(4)
        raw = _Peekable(raw, head)  # type: ignore[assignment]
        compression = sniff_compression(head)
    if compression is None:
        return raw
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if compression == "zstd":
        try:
            import zstandard  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            raise ImportFailed(
                "zstd-compressed layer: install the 'zstandard' Python package to import it"
            ) from None
        return zstandard.ZstdDecompressor().stream_reader(  # type: ignore[no-any-return]
            raw, read_across_frames=True
        )
    raise ImportFailed(f"unsupported layer compression: {compression}")


def normalize_member_name(name: str) -> list[str]:
    """Path components of a tar entry name; ``[]`` is the layer root.

    Raises ImportFailed for absolute names and any ``..`` component (even one that would
    stay inside after normalisation: a well-formed layer never needs it).
    """
    if name.startswith("/"):
        raise ImportFailed(f"unsafe tar entry {name!r}: absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImportFailed(f"unsafe tar entry {name!r}: '..' component")
    return parts


def _xattrs_of(member: tarfile.TarInfo) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            name = key[len("SCHILY.xattr.") :]
            # tarfile decodes PAX values as UTF-8 with surrogateescape; undo it for
            # binary values such as security.capability.
            out[name] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr.") :])
            try:
                out[name] = base64.b64decode(value + "=" * (-len(value) % 4))
            except ValueError:
                continue
    return {k: v for k, v in out.items() if k.startswith(_XATTR_PREFIXES)}


def _set_xattrs(target: int | str, xattrs: dict[str, bytes], *, follow: bool = True) -> None:
    for name, value in xattrs.items():
        try:
            os.setxattr(target, name, value, follow_symlinks=follow)
        except OSError as exc:
            # "where the kernel allows": file systems without user xattrs, ACLs the
            # kernel rejects, capabilities in a user namespace... are dropped.
            if exc.errno not in (errno.EOPNOTSUPP, errno.EPERM, errno.EINVAL, errno.EACCES):
                raise


class _LayerWriter:
    """Applies tar entries to one layer directory through directory fds."""

    def __init__(self, dest: Path) -> None:
        created = not dest.exists()
        dest.mkdir(parents=True, exist_ok=True)
        self.root = os.open(dest, _DIR_FLAGS)
        if created:
            os.fchmod(self.root, 0o755)
        self.bytes = 0
        # Directory metadata is applied at the end: entries created inside a directory
        # change its mtime, and a read-only mode must not get in the way.
        self.dir_meta: dict[tuple[str, ...], tarfile.TarInfo] = {}
        self.entries: set[tuple[str, ...]] = set()

    def close(self) -> None:
        os.close(self.root)

    # -- walking ------------------------------------------------------------------

    def _open_parent(self, parts: list[str], name: str, *, create: bool) -> int:
        """A new fd on the directory holding ``parts[-1]``; never follows a symlink."""
        fd = os.dup(self.root)
        try:
            for i, comp in enumerate(parts[:-1]):
                try:
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    # Implicit parent (the tar has no entry for it): a plain 0755 dir.
                    os.mkdir(comp, 0o755, dir_fd=fd)
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                    os.fchmod(nfd, 0o755)  # whatever the server's umask is
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        where = "/".join(parts[: i + 1])
                        st = self._lstat(fd, comp)
                        link = st is not None and stat.S_ISLNK(st.st_mode)
                        what = "a symlink" if link else "not a directory"
                        raise ImportFailed(
                            f"unsafe tar entry {name!r}: parent {where!r} is {what}"
                        ) from None
                    raise
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _lstat(fd: int, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    @staticmethod
    def _remove(fd: int, name: str, st: os.stat_result) -> None:
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=fd)  # fd-based, never follows symlinks
        else:
            os.unlink(name, dir_fd=fd)

    # -- entries ------------------------------------------------------------------

    def apply(self, member: tarfile.TarInfo, data: IO[bytes] | None) -> None:
        parts = normalize_member_name(member.name)
        if not parts:
            return  # the layer root: its metadata is the store's business
        base = parts[-1]
        if any(p.startswith(WHITEOUT_PREFIX) for p in parts[:-1]):
            # A directory named like a whiteout would read as one in ImageView but as a
            # plain directory to the kernel: refuse the ambiguity.
            raise ImportFailed(f"tar entry {member.name!r}: whiteout name used as a directory")
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(member, parts)
            return
        fd = self._open_parent(parts, member.name, create=True)
        try:
            if member.isdir():
                self._mkdir(fd, parts)
            elif member.isreg():
                self._file(fd, parts, member, data)
            elif member.issym():
                self._symlink(fd, parts, member)
            elif member.islnk():
                self._hardlink(fd, parts, member)
            elif member.isfifo():
                self._replace(fd, base)
                os.mkfifo(base, 0o600, dir_fd=fd)
                self._meta(fd, base, member)
                self.entries.add(tuple(parts))
            elif member.ischr() or member.isblk():
                raise ImportFailed(f"tar entry {member.name!r}: device nodes are not allowed")
            else:
                raise ImportFailed(f"tar entry {member.name!r}: unsupported type {member.type!r}")
        finally:
            os.close(fd)

    def _replace(self, fd: int, name: str) -> None:
        """Later entries for a path replace earlier ones."""
        st = self._lstat(fd, name)
        if st is not None:
            self._remove(fd, name, st)

    def _whiteout(self, member: tarfile.TarInfo, parts: list[str]) -> None:
        base = parts[-1]
        if base == OPAQUE_MARKER:
            fd = self._open_parent(parts, member.name, create=True)
            try:
                os.setxattr(fd, OPAQUE_XATTR, b"y")
            finally:
                os.close(fd)
            return
        if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return  # other AUFS metadata (.wh..wh.plnk, ...): meaningless here
        target = base[len(WHITEOUT_PREFIX) :]
        if target in ("", ".", ".."):
            raise ImportFailed(f"unsafe tar entry {member.name!r}: bad whiteout name")
        fd = self._open_parent(parts, member.name, create=True)
        try:
            st = self._lstat(fd, target)
            if st is None:
                os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=fd)
            elif stat.S_ISDIR(st.st_mode):
                # A whiteout only hides lower layers; this layer's own dir stays and
                # must hide what is below it.
                dfd = os.open(target, _DIR_FLAGS, dir_fd=fd)
                try:
                    os.setxattr(dfd, OPAQUE_XATTR, b"y")
                finally:
                    os.close(dfd)
            # Any other entry of this layer already hides the lower path.
        finally:
            os.close(fd)

    def _mkdir(self, fd: int, parts: list[str]) -> None:
        base = parts[-1]
        st = self._lstat(fd, base)
        opaque = False
        if st is not None and not stat.S_ISDIR(st.st_mode):
            # A directory replacing this layer's whiteout must hide the lower dir.
            opaque = stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
            self._remove(fd, base, st)
            st = None
        if st is None:
            os.mkdir(base, 0o700, dir_fd=fd)
        if opaque:
            dfd = os.open(base, _DIR_FLAGS, dir_fd=fd)
            try:
                os.setxattr(dfd, OPAQUE_XATTR, b"y")
            finally:
                os.close(dfd)

    def _file(
        self, fd: int, parts: list[str], member: tarfile.TarInfo, data: IO[bytes] | None
    ) -> None:
        base = parts[-1]
        self._replace(fd, base)
        ffd = os.open(
            base,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=fd,
        )
        try:
            if data is not None:
                while chunk := data.read(_CHUNK):
                    _write_all(ffd, chunk)
                    self.bytes += len(chunk)
            self._meta(ffd, None, member)
        finally:
            os.close(ffd)
        self.entries.add(tuple(parts))

    def _symlink(self, fd: int, parts: list[str], member: tarfile.TarInfo) -> None:
        base = parts[-1]
        self._replace(fd, base)
        # The target is stored as is: it is resolved inside the image at read time.
        os.symlink(member.linkname, base, dir_fd=fd)
        os.chown(base, member.uid, member.gid, dir_fd=fd, follow_symlinks=False)
        os.utime(base, ns=_times(member), dir_fd=fd, follow_symlinks=False)
        self.entries.add(tuple(parts))

    def _hardlink(self, fd: int, parts: list[str], member: tarfile.TarInfo) -> None:
        target = normalize_member_name(member.linkname)
        if tuple(target) not in self.entries:
            raise ImportFailed(
                f"unsafe tar entry {member.name!r}: hard link to {member.linkname!r}, "
                "which is not an earlier entry of this layer"
            )
        if target == parts:
            return
        sfd = self._open_parent(target, member.name, create=False)
        try:
            st = self._lstat(sfd, target[-1])
            if st is None or not (
                stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode) or stat.S_ISFIFO(st.st_mode)
            ):
                raise ImportFailed(
                    f"tar entry {member.name!r}: hard link target {member.linkname!r} is gone"
                )
            base = parts[-1]
            self._replace(fd, base)
            os.link(target[-1], base, src_dir_fd=sfd, dst_dir_fd=fd, follow_symlinks=False)
        finally:
            os.close(sfd)
        self.entries.add(tuple(parts))

    def _meta(self, fd: int, name: str | None, member: tarfile.TarInfo) -> None:
        """Owner, mode (setuid kept: chown first, it clears it), xattrs, mtime."""
        if name is None:
            os.fchown(fd, member.uid, member.gid)
            os.fchmod(fd, stat.S_IMODE(member.mode))
            _set_xattrs(fd, _xattrs_of(member))
            os.utime(fd, ns=_times(member))
        else:
            os.chown(name, member.uid, member.gid, dir_fd=fd, follow_symlinks=False)
            os.chmod(name, stat.S_IMODE(member.mode), dir_fd=fd)
            os.utime(name, ns=_times(member), dir_fd=fd)

    def finish_dirs(self) -> None:
        """Apply the remembered directory metadata, deepest first."""
        for parts in sorted(self.dir_meta, key=len, reverse=True):
            member = self.dir_meta[parts]
            try:
                pfd = self._open_parent(list(parts), member.name, create=False)
            except (FileNotFoundError, ImportFailed):
                continue  # replaced or removed by a later entry
            try:
                try:
                    dfd = os.open(parts[-1], _DIR_FLAGS, dir_fd=pfd)
                except OSError:
                    continue
                try:
                    self._meta(dfd, None, member)
                finally:
                    os.close(dfd)
            finally:
                os.close(pfd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _times(member: tarfile.TarInfo) -> tuple[int, int]:
    ns = int(member.mtime * 1_000_000_000)
    return (ns, ns)


def _members(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    # TarFile keeps every TarInfo it has read in `members`; on a stream nobody looks
    # them up again, so drop them to keep memory flat on layers with many entries.
    while True:
        member = tf.next()
        tf.members.clear()  # type: ignore[attr-defined]
        if member is None:
            return
        yield member


def convert_layer(
    tar: BinaryIO | IO[bytes] | Path,
    dest: Path,
    *,
    compression: str | None,
    diff_id: str | None = None,
) -> int:
    """Extract one layer tar into the overlay-format directory ``dest``.

    ``compression`` is "gzip", "zstd", None (plain tar) or "auto" (sniffed from the
    magic bytes). ``diff_id``, when given, is checked against the digest of the
    uncompressed tar (OCI config ``rootfs.diff_ids``). Returns the number of file content
    bytes written. Raises ImportFailed on an unsafe or malformed layer; ``dest`` is then
    left partially written for the caller to remove, and nothing outside it is touched.
    """
    writer = _LayerWriter(dest)
    try:
        with ExitStack() as stack:
            raw: IO[bytes] = stack.enter_context(open(tar, "rb")) if isinstance(tar, Path) else tar
            plain: Any = _decompressor(raw, compression)
            hashed = HashingReader(plain, "sha256")
            try:
                _extract(writer, hashed)
                hashed.drain()
            except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
                raise ImportFailed(f"bad layer archive: {exc}") from None
            except ImportFailed:
                raise
            except Exception as exc:
                # zstandard.ZstdError is a plain Exception from an optional module.
                if type(exc).__module__.startswith("zstandard"):
                    raise ImportFailed(f"bad layer archive: {exc}") from None
                raise
            if diff_id is not None and hashed.digest() != diff_id:
                raise ImportFailed(
                    f"layer content does not match its diff_id {diff_id} (got {hashed.digest()})"
                )
        writer.finish_dirs()
        return writer.bytes
    finally:
        writer.close()


def _extract(writer: _LayerWriter, stream: HashingReader) -> None:
    try:
        tf = tarfile.open(fileobj=stream, mode="r|")  # type: ignore[call-overload]  # noqa: SIM115
    except tarfile.ReadError:
        if stream.count == 0:
            return  # a zero-byte layer: nothing to apply
        raise
    with tf:
        for member in _members(tf):
            if member.isdir():
                writer.apply(member, None)
                parts = normalize_member_name(member.name)
                if parts:
                    writer.dir_meta[tuple(parts)] = member
            elif member.isreg():
                data = tf.extractfile(member)
                writer.apply(member, data)
            else:
                writer.apply(member, None)
