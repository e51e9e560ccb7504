"""Per-run resource limits with cgroups (v1, v2 or the hybrid layout of both).

A run with limits gets one cgroup per controller it needs, created below the server's own
cgroup for that controller (so limits set on the server still cover its sandboxes). The
sandbox's first child joins them (by writing "0" to each ``cgroup.procs``) before it
unshares its cgroup namespace, so everything in the sandbox inherits them.

Controllers: memory (hard limit, no extra swap), pids (max tasks), cpu (CFS quota).
A controller is taken from cgroup2 when the unified hierarchy offers it, else from v1.
:func:`startup_report` gives the server one-line warnings for missing controllers (and
for rootless mode, where no limits apply); :func:`limits_available` feeds
``runtime.mode()``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

CONTROLLERS = ("memory", "pids", "cpu")
_CPU_PERIOD_US = 100_000


class CgroupError(Exception):
    """Limits were requested but cannot be applied on this host."""


@dataclass(frozen=True)
class Limits:
    """Resource limits for one run; None means unlimited."""

    memory_bytes: int | None = None
    pids: int | None = None
    cpus: float | None = None  # CPU time per wall second, e.g. 0.5

    def controllers(self) -> list[str]:
        wanted = {"memory": self.memory_bytes, "pids": self.pids, "cpu": self.cpus}
        return [c for c in CONTROLLERS if wanted[c] is not None]


@dataclass
class Layout:
    """Where each controller lives: ``v1`` maps controller → mount point."""

    v1: dict[str, Path] = field(default_factory=dict)
    v2: Path | None = None
    v2_controllers: frozenset[str] = frozenset()

    @property
    def mode(self) -> str:
        """"v1", "v2", "hybrid" or "none"."""
        if self.v1 and self.v2 is not None:
            return "hybrid"
        if self.v1:
            return "v1"
        return "v2" if self.v2 is not None else "none"


def parse_mountinfo(text: str) -> tuple[dict[str, Path], Path | None]:
    """(v1 controller → mount point, cgroup2 mount point) from /proc/self/mountinfo text."""
    v1: dict[str, Path] = {}
    v2: Path | None = None
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        mount_point = left.split()[4]
        fstype, _source, options = [*right.split(), "", ""][:3]
        if fstype == "cgroup2" and v2 is None:
            v2 = Path(mount_point)
        elif fstype == "cgroup":
            for opt in options.split(","):
                if opt in CONTROLLERS and opt not in v1:
                    v1[opt] = Path(mount_point)
    return v1, v2


def parse_proc_cgroup(text: str) -> tuple[dict[str, str], str | None]:
    """(v1 controller → path, v2 path) of a process from /proc/PID/cgroup text."""
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _hid, ctrls, path = parts
        if ctrls == "":
            v2 = path
        for c in ctrls.split(","):
            if c in CONTROLLERS:
                v1[c] = path
    return v1, v2


def detect() -> Layout:
    """The cgroup layout of this host, as this process sees it."""
    try:
        v1, v2 = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    except OSError:
        return Layout()
    ctrls: frozenset[str] = frozenset()
    if v2 is not None:
        with contextlib.suppress(OSError):
            ctrls = frozenset((v2 / "cgroup.controllers").read_text().split())
    return Layout(v1=v1, v2=v2, v2_controllers=ctrls)


def missing_controllers(layout: Layout | None = None) -> list[str]:
    """Controllers of :data:`CONTROLLERS` this host offers neither in v1 nor in v2."""
    layout = layout or detect()
    return [c for c in CONTROLLERS if c not in layout.v1 and c not in layout.v2_controllers]


def limits_available(layout: Layout | None = None) -> bool:
    """True when this process can create run cgroups for at least one controller."""
    if os.geteuid() != 0:
        return False  # v1 is never delegated; v2 delegation is not set up for us
    layout = layout or detect()
    return len(missing_controllers(layout)) < len(CONTROLLERS)


def startup_report(layout: Layout | None = None) -> list[str]:
    """One-line warnings for the server to print at start (empty when all is well)."""
    layout = layout or detect()
    if layout.mode == "none":
        return ["no cgroup filesystem mounted: memory, pids and cpu limits are off"]
    if os.geteuid() != 0:
        return ["running unprivileged: memory, pids and cpu limits are off (cgroups are "
                "not delegated to this user); only the timeout bounds a run"]  # fmt: skip
    return [f"cgroup controller {c!r} is not available ({layout.mode} layout): "
            f"{_WHAT[c]} limits are off" for c in missing_controllers(layout)]  # fmt: skip


_WHAT = {"memory": "memory", "pids": "process-count", "cpu": "CPU"}


class RunCgroup:
    """The cgroups of one run. Create in the server; children only write ``procs_files``."""

    def __init__(self, dirs: dict[str, Path], v2_dir: Path | None) -> None:
        self._dirs = dirs  # controller → its cgroup dir (v1 dirs or the one v2 dir)
        self._v2_dir = v2_dir
        unique = {*dirs.values()}
        self.procs_files: list[bytes] = [os.fsencode(d / "cgroup.procs") for d in sorted(unique)]

    @classmethod
    def create(cls, limits: Limits, layout: Layout | None = None) -> RunCgroup:
        """Create the run's cgroups and write the limits; CgroupError if impossible."""
        layout = layout or detect()
        try:
            own_v1, _own_v2 = parse_proc_cgroup(Path("/proc/self/cgroup").read_text())
        except OSError as e:
            raise CgroupError(f"cannot read own cgroup: {e}") from e
        name = f"contree-{secrets.token_hex(6)}"
        dirs: dict[str, Path] = {}
        v2_dir: Path | None = None
        made: list[Path] = []
        try:
            for ctrl in limits.controllers():
                if layout.v2 is not None and ctrl in layout.v2_controllers:
                    if v2_dir is None:
                        v2_dir = cls._make_v2(layout.v2, made, name)
                    dirs[ctrl] = v2_dir
                elif ctrl in layout.v1:
                    base = layout.v1[ctrl] / own_v1.get(ctrl, "/").lstrip("/")
                    path = base / name
                    path.mkdir()
                    made.append(path)
                    dirs[ctrl] = path
                else:
                    raise CgroupError(f"cgroup controller {ctrl!r} is not available")
            cg = cls(dirs, v2_dir)
            cg._write_limits(limits)
            return cg
        except OSError as e:
            for path in reversed(made):
                with contextlib.suppress(OSError):
                    path.rmdir()
            raise CgroupError(f"cannot set up cgroup limits: {e}") from e

    @staticmethod
    def _make_v2(root: Path, made: list[Path], name: str) -> Path:
        # Under cgroup2 a group with processes cannot delegate controllers, so run groups
        # live in a dedicated "contree" group at the root, with the controllers enabled.
        parent = root / "contree"
        with contextlib.suppress(FileExistsError):
            parent.mkdir()
        enable = " ".join(f"+{c}" for c in CONTROLLERS)
        for level in (root, parent):
            with contextlib.suppress(OSError):
                (level / "cgroup.subtree_control").write_text(enable)
        path = parent / name
        path.mkdir()
        made.append(path)
        return path

    def _write(self, ctrl: str, name: str, value: str) -> None:
        (self._dirs[ctrl] / name).write_text(value)

    def _is_v2(self, ctrl: str) -> bool:
        return self._v2_dir is not None and self._dirs.get(ctrl) == self._v2_dir

    def _write_limits(self, limits: Limits) -> None:
        if limits.memory_bytes is not None:
            mem = str(int(limits.memory_bytes))
            if self._is_v2("memory"):
                self._write("memory", "memory.max", mem)
                with contextlib.suppress(OSError):
                    self._write("memory", "memory.swap.max", "0")
            else:
                self._write("memory", "memory.limit_in_bytes", mem)
                with contextlib.suppress(OSError):  # no swap accounting on some kernels
                    self._write("memory", "memory.memsw.limit_in_bytes", mem)
        if limits.pids is not None:
            self._write("pids", "pids.max", str(int(limits.pids)))
        if limits.cpus is not None:
            quota = max(1000, int(limits.cpus * _CPU_PERIOD_US))
            if self._is_v2("cpu"):
                self._write("cpu", "cpu.max", f"{quota} {_CPU_PERIOD_US}")
            else:
                self._write("cpu", "cpu.cfs_period_us", str(_CPU_PERIOD_US))
                self._write("cpu", "cpu.cfs_quota_us", str(quota))

    def _read(self, ctrl: str, name: str) -> str | None:
        try:
            return (self._dirs[ctrl] / name).read_text()
        except (KeyError, OSError):
            return None

    def peak_memory(self) -> int | None:
        """Peak memory use of the run in bytes (None without a memory cgroup)."""
        name = "memory.peak" if self._is_v2("memory") else "memory.max_usage_in_bytes"
        text = self._read("memory", name)
        return int(text.split()[0]) if text else None

    def oom_killed(self) -> bool:
        """True when the kernel OOM-killed a process of the run."""
        name = "memory.events" if self._is_v2("memory") else "memory.oom_control"
        for line in (self._read("memory", name) or "").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value) > 0
        return False

    def remove(self) -> None:
        """Remove the run's cgroups (their processes are gone by now)."""
        for path in sorted({*self._dirs.values()}):
            for _ in range(50):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        break
                    time.sleep(0.01)  # a dying task can hold the group for a moment
