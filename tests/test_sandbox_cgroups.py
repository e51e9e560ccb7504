"""cgroup limits for sandbox runs: layout detection (pure) and real limits (root)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from contree_shell.sandbox import cgroups
from contree_shell.sandbox.cgroups import Layout, Limits, RunCgroup
from contree_shell.sandbox.runtime import ExitInfo, RunSpec, Sandbox

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2_MOUNTINFO = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def test_hybrid_layout_maps_v1_controllers_and_the_unified_mount() -> None:
    v1, v2 = cgroups.parse_mountinfo(HYBRID_MOUNTINFO)
    assert v1 == {"cpu": Path("/sys/fs/cgroup/cpu,cpuacct"),
                  "memory": Path("/sys/fs/cgroup/memory"), "pids": Path("/sys/fs/cgroup/pids")}
    assert v2 == Path("/sys/fs/cgroup/unified")
    assert Layout(v1=v1, v2=v2).mode == "hybrid"


def test_pure_v2_and_no_cgroup_layouts() -> None:
    v1, v2 = cgroups.parse_mountinfo(V2_MOUNTINFO)
    assert v1 == {} and Layout(v1=v1, v2=v2).mode == "v2"
    assert Layout().mode == "none"


def test_own_cgroup_paths_are_parsed_per_controller() -> None:
    text = "4:memory:/outer/inner\n1:cpu,cpuacct:/\n0::/user.slice\n9:name=systemd:/\n"
    assert cgroups.parse_proc_cgroup(text) == ({"memory": "/outer/inner", "cpu": "/"},
                                               "/user.slice")


def test_limits_name_only_the_controllers_they_need() -> None:
    assert Limits().controllers() == []
    assert Limits(memory_bytes=1, cpus=0.5).controllers() == ["memory", "cpu"]


@pytest.fixture(scope="module")
def image(busybox_image: Path) -> Path:
    return busybox_image


def run(image: Path, tmp_path: Path, script: str, limits: Limits) -> tuple[ExitInfo, bytes]:
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    out = bytearray()
    sb = Sandbox.start(lowers=[image], upper=upper, work=work,
                       spec=RunSpec(argv=["sh", "-c", script], env={"PATH": "/bin"},
                                    timeout=60, limits=limits),
                       on_output=lambda stream, chunk: out.extend(chunk))
    info = sb.wait(120)
    assert info is not None
    return info, bytes(out)


@pytest.mark.root
def test_memory_limit_oom_kills_the_run(image: Path, tmp_path: Path) -> None:
    if "memory" not in cgroups.detect().v1 | dict.fromkeys(cgroups.detect().v2_controllers):
        pytest.skip("no memory controller")
    info, _ = run(image, tmp_path, "dd if=/dev/zero of=/dev/null bs=200M count=1",
                  Limits(memory_bytes=32 * 1024 * 1024))
    assert info.signal == signal.SIGKILL and info.exit_code is None
    assert info.oom_killed


@pytest.mark.root
def test_pids_limit_makes_fork_fail(image: Path, tmp_path: Path) -> None:
    info, out = run(image, tmp_path,
                    "for i in 1 2 3 4 5 6 7 8 9 10; do sleep 5 & done 2>&1; echo end",
                    Limits(pids=5))
    assert not info.oom_killed  # ash gives up on the first failed fork (exit 2)
    assert b"can't fork" in out or b"Resource temporarily unavailable" in out


@pytest.mark.root
def test_run_cgroups_are_removed_afterwards(image: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[RunCgroup] = []
    real_create = RunCgroup.create

    def spy(limits: Limits, layout: Layout | None = None) -> RunCgroup:
        cg = real_create(limits, layout)
        made.append(cg)
        return cg

    monkeypatch.setattr(RunCgroup, "create", staticmethod(spy))
    info, out = run(image, tmp_path, "cat /proc/self/cgroup | grep -c contree; echo ok",
                    Limits(memory_bytes=256 * 1024 * 1024, pids=100, cpus=1.5))
    assert info.exit_code == 0 and out.endswith(b"ok\n")
    assert b"0\n" in out  # the cgroup namespace hides the host-side group names
    assert made and all(not os.path.exists(os.fsdecode(p)) for p in made[0].procs_files)


def test_startup_report_names_each_missing_controller_once() -> None:
    layout = Layout(v1={"memory": Path("/sys/fs/cgroup/memory")}, v2=Path("/sys/fs/cgroup/unified"),
                    v2_controllers=frozenset({"pids"}))
    if os.geteuid() == 0:
        report = cgroups.startup_report(layout)
        assert len(report) == 1 and "'cpu'" in report[0] and "hybrid" in report[0]
    assert cgroups.startup_report(Layout()) == [
        "no cgroup filesystem mounted: memory, pids and cpu limits are off"]
    assert cgroups.missing_controllers(layout) == ["cpu"]


@pytest.mark.root
def test_startup_report_is_quiet_on_this_host_when_all_controllers_exist() -> None:
    if cgroups.missing_controllers():
        pytest.skip("this host lacks a controller")
    assert cgroups.startup_report() == []


@pytest.mark.root
def test_fork_bomb_ends_its_run_only(image: Path, tmp_path: Path) -> None:
    missing = cgroups.missing_controllers()
    if "pids" in missing:
        pytest.skip("no pids controller")
    (tmp_path / "bomb").mkdir()
    (tmp_path / "other").mkdir()
    bomb_out = bytearray()
    upper, work = tmp_path / "bomb" / "upper", tmp_path / "bomb" / "work"
    upper.mkdir()
    work.mkdir()
    # The bomb runs until its 3 s timeout; meanwhile a concurrent run and the host must
    # still be able to fork.
    bomb = Sandbox.start(lowers=[image], upper=upper, work=work,
                         spec=RunSpec(argv=["sh", "-c", "b() { b | b & }; b; sleep 100"],
                                      env={"PATH": "/bin"}, timeout=3,
                                      limits=Limits(pids=64, memory_bytes=256 << 20)),
                         on_output=lambda stream, chunk: bomb_out.extend(chunk))
    try:
        assert bomb.wait_exec(30)
        info, out = run(image, tmp_path / "other", "echo alive; i=0; "
                        "while [ $i -lt 20 ]; do true & i=$((i+1)); done; wait; echo done",
                        Limits(pids=64))
        assert info.exit_code == 0 and out == b"alive\ndone\n"
        assert subprocess.run(["true"], check=False).returncode == 0  # the host can fork
    finally:
        bomb_info = bomb.wait(120)
    assert bomb_info is not None and bomb_info.timed_out
    assert b"can't fork" in bomb_out or b"Resource temporarily unavailable" in bomb_out


@pytest.mark.root
def test_max_rss_with_a_memory_limit_leaves_out_the_forked_server(image: Path,
                                                                  tmp_path: Path) -> None:  # fmt: skip
    if "memory" in cgroups.missing_controllers():
        pytest.skip("no memory controller")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain, _ = run(image, tmp_path / "a", "true", Limits())
    limited, _ = run(image, tmp_path / "b", "true", Limits(memory_bytes=256 << 20))
    assert 0 < limited.rusage["max_rss_kb"] < plain.rusage["max_rss_kb"]


@pytest.mark.root
def test_runtime_mode_as_root_reports_host_ids_and_limits() -> None:
    from contree_shell.sandbox import runtime

    mode = runtime.mode()
    assert mode["mode"] == "root" and mode["uid_map"] == "host"
    assert mode["limits"] == (cgroups.missing_controllers() != list(cgroups.CONTROLLERS))
    assert mode["network"] == runtime.NETWORK_SUPPORTED
    name, ok, _detail = runtime.preflight()[0]
    assert name == "runtime" and ok
