"""`run -F/--file SPEC`: parse `host[:/inst/path][:uUID][:gGID][:mMODE]` and expand directories.

Pure apart from reading the host filesystem (stat, walk). Tags may come in any order;
the instance path is the tag starting with `/`. Unspecified owner and mode come from the
host file; a relative host path without an instance path lands at the same relative
path under the session cwd. Directories are walked recursively, skipping the default
excludes and `--file-excludes` (a pattern matches the whole relative path or any single
path component). Unlike the official CLI, a bad mode or unknown tag is an error, never
a silent 0.
"""

from __future__ import annotations

import fnmatch
import grp
import os
import posixpath
import pwd
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_EXCLUDES",
    "FileSpec",
    "FileSpecError",
    "MappedFile",
    "excluded",
    "expand",
    "parse_spec",
]

DEFAULT_EXCLUDES = (
    ".*", ".git", "*.pyc", "__pycache__", ".mypy_cache", ".pytest_cache", ".venv",
    "node_modules", "dist", "build",
)


class FileSpecError(ValueError):
    """A `--file` spec that cannot be used; `.message` is the one-line reason."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class FileSpec:
    """One parsed `--file` argument (None = take it from the host file)."""

    host: str
    instance_path: str | None = None
    uid: int | None = None
    gid: int | None = None
    mode: int | None = None


@dataclass(frozen=True)
class MappedFile:
    """One host file to send to one instance path."""

    host: Path
    instance_path: str
    uid: int
    gid: int
    mode: int

    def payload(self, file_uuid: str) -> dict[str, object]:
        """The `files` entry of the spawn payload."""
        return {"uuid": file_uuid, "uid": self.uid, "gid": self.gid, "mode": f"{self.mode:04o}"}


def _owner(text: str, what: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        if what == "u":
            return pwd.getpwnam(text).pw_uid
        return grp.getgrnam(text).gr_gid
    except KeyError:
        kind = "user" if what == "u" else "group"
        raise FileSpecError(f"unknown {kind} '{text}' (use a number)") from None


def parse_spec(spec: str) -> FileSpec:
    """Parse `host[:/inst/path][:uUID][:gGID][:mMODE]` (tags in any order)."""
    host, *tags = spec.split(":")
    if not host:
        raise FileSpecError(f"--file '{spec}': missing host path")
    inst: str | None = None
    uid = gid = mode = None
    for tag in tags:
        if tag.startswith("/"):
            if inst is not None:
                raise FileSpecError(f"--file '{spec}': two instance paths")
            inst = posixpath.normpath(tag)
        elif tag[:1] in ("u", "g") and len(tag) > 1:
            if tag[0] == "u":
                uid = _owner(tag[1:], "u")
            else:
                gid = _owner(tag[1:], "g")
        elif tag[:1] == "m" and len(tag) > 1:
            try:
                mode = int(tag[1:], 8)
            except ValueError:
                raise FileSpecError(f"--file '{spec}': bad mode '{tag[1:]}' (octal, e.g. m755)") from None
            if not 0 <= mode <= 0o7777:
                raise FileSpecError(f"--file '{spec}': bad mode '{tag[1:]}' (octal, e.g. m755)")
        else:
            raise FileSpecError(
                f"--file '{spec}': unknown part '{tag}' (expected /PATH, uUID, gGID or mMODE)"
            )
    return FileSpec(host, inst, uid, gid, mode)


def excluded(relpath: str, patterns: Sequence[str]) -> bool:
    """True when a pattern matches the whole relative path or any single component."""
    parts = relpath.split("/")
    for pattern in patterns:
        if fnmatch.fnmatchcase(relpath, pattern):
            return True
        if any(fnmatch.fnmatchcase(part, pattern) for part in parts):
            return True
    return False


def _mapped(path: Path, st: os.stat_result, inst: str, spec: FileSpec) -> MappedFile:
    return MappedFile(
        host=path, instance_path=inst,
        uid=spec.uid if spec.uid is not None else st.st_uid,
        gid=spec.gid if spec.gid is not None else st.st_gid,
        mode=spec.mode if spec.mode is not None else stat.S_IMODE(st.st_mode),
    )


def expand(spec: FileSpec, *, cwd: str, excludes: Iterable[str] = ()) -> list[MappedFile]:
    """The files one spec sends (a directory becomes every file below it)."""
    host = Path(os.path.expanduser(spec.host))
    if spec.instance_path is not None:
        target = spec.instance_path
    elif host.is_absolute():
        target = posixpath.normpath(str(host))
    else:
        target = posixpath.normpath(posixpath.join(cwd or "/", str(host)))
    try:
        st = host.stat()
    except OSError:
        raise FileSpecError(f"host path '{spec.host}' is neither file nor directory") from None
    if stat.S_ISREG(st.st_mode):
        return [_mapped(host, st, target, spec)]
    if not stat.S_ISDIR(st.st_mode):
        raise FileSpecError(f"host path '{spec.host}' is neither file nor directory")
    patterns = [*DEFAULT_EXCLUDES, *excludes]
    out: list[MappedFile] = []
    for root, dirs, files in os.walk(host):
        rel_root = os.path.relpath(root, host)
        rel_root = "" if rel_root == "." else rel_root
        dirs[:] = sorted(d for d in dirs if not excluded(posixpath.join(rel_root, d), patterns))
        for name in sorted(files):
            rel = posixpath.join(rel_root, name)
            if excluded(rel, patterns):
                continue
            path = Path(root) / name
            try:
                fst = path.stat()
            except OSError:
                continue  # vanished while walking
            if stat.S_ISREG(fst.st_mode):
                out.append(_mapped(path, fst, posixpath.join(target, rel), spec))
    return out
