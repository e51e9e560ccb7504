"""Base root filesystems: a tiny busybox tree and a Debian minbase via debootstrap.

Both builders write a plain directory tree; ``Store.add_rootfs`` turns it into a layer.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

HOST_BUSYBOX = Path("/bin/busybox")
HOST_APT_DIR = Path("/etc/apt")
MIRROR_ENV = "CONTREE_DEBIAN_MIRROR"

# Suites of Debian proper; used to tell a Debian mirror from e.g. an Ubuntu one when the
# URI path does not say "debian".
_DEBIAN_SUITES = frozenset(
    {
        "buster", "bullseye", "bookworm", "trixie", "forky", "duke", "sid",
        "oldoldstable", "oldstable", "stable", "testing", "unstable",
    }
)  # fmt: skip

_PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "daemon:x:1:1:daemon:/usr/sbin:/bin/false\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
_GROUP = "root:x:0:\ndaemon:x:1:\ntty:x:5:\nstaff:x:50:\nnogroup:x:65534:\n"


class BootstrapError(RuntimeError):
    """A base image could not be built; the message is one line for the user."""


# --------------------------------------------------------------------------- busybox


def busybox_applets(busybox: Path = HOST_BUSYBOX) -> list[str]:
    """Applet names the given busybox binary provides (``busybox --list``)."""
    try:
        out = subprocess.run(
            [str(busybox), "--list"], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BootstrapError(f"cannot run {busybox} --list: {exc}") from exc
    return sorted({name for name in out.split() if name and "/" not in name})


def _usr_bin_applets(busybox: Path) -> set[str]:
    """Applets busybox itself places in usr/bin (``--list-full``); empty if unsupported."""
    try:
        out = subprocess.run(
            [str(busybox), "--list-full"], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return set()
    return {line[len("usr/bin/") :] for line in out.split() if line.startswith("usr/bin/")}


def build_busybox_rootfs(dest: Path, *, busybox: Path = HOST_BUSYBOX) -> None:
    """Build a tiny rootfs at ``dest`` from a static busybox binary.

    Every applet is a relative symlink in /bin; the ones busybox files under usr/bin (and
    always ``env``, for ``#!/usr/bin/env`` scripts) are also linked from /usr/bin. The
    engine mount points exist so that a run which does nothing leaves its upper dir empty.
    """
    if not busybox.is_file():
        raise BootstrapError(f"{busybox} not found: install a static busybox")
    dest.mkdir(parents=True, exist_ok=True)
    os.chmod(dest, 0o755)
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "home", "var/tmp",
              "run", "proc", "dev", "sys", "tmp"):  # fmt: skip
        (dest / d).mkdir(parents=True, exist_ok=True)
    os.chmod(dest / "root", 0o700)
    os.chmod(dest / "tmp", 0o1777)
    os.chmod(dest / "var/tmp", 0o1777)

    target = dest / "bin/busybox"
    shutil.copyfile(busybox, target)
    os.chmod(target, 0o755)

    applets = busybox_applets(busybox)
    usr_bin = (_usr_bin_applets(busybox) & set(applets)) | {"env"}
    for name in applets:
        if name == "busybox":
            continue
        link = dest / "bin" / name
        if not os.path.lexists(link):
            os.symlink("busybox", link)
    for name in sorted(usr_bin):
        link = dest / "usr/bin" / name
        if not os.path.lexists(link):
            os.symlink("../../bin/busybox", link)

    etc = dest / "etc"
    (etc / "passwd").write_text(_PASSWD)
    (etc / "group").write_text(_GROUP)
    for name in ("hostname", "hosts", "resolv.conf"):
        (etc / name).touch()


# ------------------------------------------------------------------- apt sources (pure)


def _is_debian_main(types: Iterable[str], uri: str, suites: list[str], comps: list[str]) -> bool:
    if "deb" not in types or "main" not in comps or not uri or not suites:
        return False
    suite = suites[0]
    if "security" in uri or suite.endswith("-security") or suite.endswith("/updates"):
        return False
    if "-" in suite:  # bookworm-updates, bookworm-backports: not a base suite
        return False
    return "debian" in uri.lower() or suite in _DEBIAN_SUITES


def mirror_from_sources_list(text: str) -> str | None:
    """First Debian ``main`` URI in one-line ``sources.list`` text, else None."""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        kind = words.pop(0)
        if words and words[0].startswith("["):
            # Options may span several words: "[arch=amd64 signed-by=...]".
            while words and not words[0].endswith("]"):
                words.pop(0)
            if words:
                words.pop(0)
        if len(words) < 3:
            continue
        uri, suite, comps = words[0], words[1], words[2:]
        if _is_debian_main([kind], uri, [suite], comps):
            return uri.rstrip("/")
    return None


def mirror_from_deb822(text: str) -> str | None:
    """First Debian ``main`` URI in deb822 ``*.sources`` text, else None."""
    paragraphs: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    key = ""
    for raw in [*text.splitlines(), ""]:
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if cur:
                paragraphs.append(cur)
            cur, key = {}, ""
            continue
        if raw[0] in " \t" and key:  # continuation line
            cur[key] += " " + raw.strip()
            continue
        if ":" in raw:
            key, _, value = raw.partition(":")
            key = key.strip().lower()
            cur[key] = value.strip()
    for p in paragraphs:
        if p.get("enabled", "yes").lower() == "no":
            continue
        types = p.get("types", "").split()
        suites = p.get("suites", "").split()
        comps = p.get("components", "").split()
        for uri in p.get("uris", "").split():
            if _is_debian_main(types, uri, suites, comps):
                return uri.rstrip("/")
    return None


def host_mirror(apt_dir: Path = HOST_APT_DIR) -> str | None:
    """The host's first Debian main mirror from its apt sources, or None."""
    candidates: list[tuple[Path, Callable[[str], str | None]]] = [
        (apt_dir / "sources.list", mirror_from_sources_list)
    ]
    parts = apt_dir / "sources.list.d"
    if parts.is_dir():
        for f in sorted(parts.iterdir()):
            if f.name.endswith(".sources"):
                candidates.append((f, mirror_from_deb822))
            elif f.name.endswith(".list"):
                candidates.append((f, mirror_from_sources_list))
    for path, parse in candidates:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        found = parse(text)
        if found:
            return found
    return None


def choose_mirror(env: dict[str, str] | None = None, apt_dir: Path = HOST_APT_DIR) -> str | None:
    """CONTREE_DEBIAN_MIRROR, else the host's apt sources, else None (debootstrap default)."""
    env = dict(os.environ) if env is None else env
    explicit = env.get(MIRROR_ENV, "").strip()
    if explicit:
        return explicit
    return host_mirror(apt_dir)


# ------------------------------------------------------------------------- debootstrap


def unescape_mount_point(field: str) -> str:
    """Decode /proc/self/mountinfo's octal escapes (``\\040`` for a space, ...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _unmount_below(dest: Path) -> None:
    """Lazily unmount anything left mounted under ``dest`` (debootstrap mounts proc/sys)."""
    prefix = str(dest.resolve()) + "/"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    points = []
    for line in lines:
        fields = line.split()
        if len(fields) > 4:
            point = unescape_mount_point(fields[4])
            if point.startswith(prefix):
                points.append(point)
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def debootstrap_rootfs(
    dest: Path,
    suite: str,
    progress: Callable[[str], None],
    *,
    mirror: str | None = None,
    cancel: threading.Event | None = None,
) -> None:
    """Build a Debian ``minbase`` rootfs for ``suite`` at ``dest``.

    debootstrap's output lines go to ``progress`` as they come. Afterwards the apt caches
    and lists are emptied and the host copies of hostname/resolv.conf are blanked, to keep
    the image small and free of host details. Setting ``cancel`` stops debootstrap at
    its next output line and raises BootstrapError.
    """
    exe = shutil.which("debootstrap")
    if exe is None:
        raise BootstrapError("debootstrap is not installed on the server host")
    if not suite or not all(c.isalnum() or c in "-_." for c in suite):
        raise BootstrapError(f"invalid Debian suite name: {suite!r}")
    dest = Path(dest).absolute()
    mirror = mirror or choose_mirror()
    argv = [exe, "--variant=minbase", suite, str(dest)]
    if mirror:
        argv.append(mirror)
    progress(f"debootstrap --variant=minbase {suite} ({mirror or 'default mirror'})")
    tail: deque[str] = deque(maxlen=5)
    try:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"},
            start_new_session=True,  # so a cancel reaches wget/dpkg children too
        )
        assert proc.stdout is not None
        with proc:
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                if line:
                    tail.append(line)
                    progress(line)
                if cancel is not None and cancel.is_set():
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGTERM)
                    break
        rc = proc.returncode
    finally:
        _unmount_below(dest)
    if cancel is not None and cancel.is_set():
        raise BootstrapError(f"debootstrap {suite} cancelled")
    if rc != 0:
        last = tail[-1] if tail else "no output"
        raise BootstrapError(f"debootstrap {suite} failed (exit {rc}): {last}")

    progress("cleaning apt caches")
    subprocess.run(["chroot", str(dest), "apt-get", "clean"], capture_output=True, check=False)
    lists = dest / "var/lib/apt/lists"
    if lists.is_dir():
        for entry in lists.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        (lists / "partial").mkdir(exist_ok=True)
    for name in ("hostname", "resolv.conf"):
        f = dest / "etc" / name
        if f.is_symlink():
            f.unlink()
        f.write_text("")
    progress("debootstrap done")
