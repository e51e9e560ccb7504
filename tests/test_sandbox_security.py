"""Escape attempts from inside a sandbox: each must fail, and the test asserts the failure.

Not covered here because busybox has no applet that issues the syscall: keyctl/add_key,
bpf, userfaultfd, perf_event_open, open_by_handle_at (the seccomp filter denies them; the
tests check the filter is installed and that unshare/nsenter/mount, which busybox can
express, are refused).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from contree_shell.sandbox.runtime import ExitInfo, RunSpec, Sandbox

pytestmark = pytest.mark.root

ENV = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/root"}


@pytest.fixture(scope="module")
def image(busybox_image: Path) -> Path:
    return busybox_image


class Result:
    def __init__(self, info: ExitInfo, stdout: bytes, stderr: bytes, upper: Path) -> None:
        self.info, self.stdout, self.stderr, self.upper = info, stdout, stderr, upper

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")


@pytest.fixture
def sh(image: Path, tmp_path: Path) -> Iterator:
    counter = [0]

    def run(script: str, **spec: object) -> Result:
        counter[0] += 1
        upper, work = tmp_path / f"u{counter[0]}", tmp_path / f"w{counter[0]}"
        upper.mkdir()
        work.mkdir()
        out, err = bytearray(), bytearray()

        def collect(stream: str, chunk: bytes) -> None:
            (out if stream == "stdout" else err).extend(chunk)

        spec.setdefault("env", dict(ENV))
        spec.setdefault("timeout", 60)
        sb = Sandbox.start(lowers=[image], upper=upper, work=work,
                           spec=RunSpec(argv=["sh", "-c", script], **spec),  # type: ignore[arg-type]
                           on_output=collect)  # fmt: skip
        info = sb.wait(120)
        assert info is not None
        return Result(info, bytes(out), bytes(err), upper)

    yield run


def test_mounting_a_tmpfs_is_refused(sh) -> None:
    r = sh("mkdir -p /mnt/x; mount -t tmpfs none /mnt/x; echo rc=$?; grep -c ' /mnt/x ' /proc/mounts")
    assert "rc=0" not in r.out and r.out.endswith("0\n")


def test_mknod_of_a_block_device_is_refused(sh) -> None:
    r = sh("mknod /tmp/disk b 8 0; echo rc=$?; test -e /tmp/disk && echo exists")
    assert r.out == "rc=1\n"


def test_host_root_is_not_reachable_through_proc_or_dotdot(sh, tmp_path: Path) -> None:
    marker = tmp_path / "host-only-marker"
    marker.write_text("secret\n")
    r = sh(f"cat /proc/1/root{marker}; cat /../../..{marker}; cat /proc/self/root/../..{marker};"
           f" cd /; cd ../../..; pwd; ls /proc/1/root/ | grep -c pytest")  # fmt: skip
    assert "secret" not in r.out
    assert r.out.split() == ["/", "0"]


def test_hostname_and_clock_of_the_host_are_untouched(sh) -> None:
    host = socket.gethostname()
    r = sh("hostname evil-host; echo rc=$?; date -s '2001-01-01 00:00:00' >/dev/null; "
           "date +%Y; hostname")  # fmt: skip
    lines = r.out.split()
    assert lines[0] == "rc=1" and lines[2] == "linuxkit"
    assert int(lines[1]) > 2001  # busybox date exits 0 even when settimeofday fails
    assert "can't set date: Operation not permitted" in r.stderr.decode()
    assert socket.gethostname() == host
    assert time.gmtime().tm_year > 2001


def test_new_namespaces_cannot_be_created(sh) -> None:
    r = sh("unshare -U true; echo user=$?; unshare -m true; echo mnt=$?; "
           "unshare -n true; echo net=$?; nsenter -t 1 -m true; echo enter=$?")  # fmt: skip
    assert r.out == "user=1\nmnt=1\nnet=1\nenter=1\n"


def test_only_sandbox_processes_are_visible(sh) -> None:
    r = sh("sleep 5 & ps -o pid,comm; kill %1")
    lines = r.out.strip().splitlines()[1:]
    pids = sorted(int(line.split()[0]) for line in lines)
    assert pids == list(range(1, len(pids) + 1)) and len(pids) <= 5


def test_writes_never_reach_the_image_layers(sh, image: Path) -> None:
    before = (image / "etc/group").read_bytes()
    r = sh("echo pwned > /etc/group; rm -f /bin/ls; echo pwned > /bin/busybox.new; echo ok")
    assert r.out == "ok\n"
    assert (image / "etc/group").read_bytes() == before
    assert os.path.lexists(image / "bin/ls") and not (image / "bin/busybox.new").exists()
    assert (r.upper / "etc/group").read_bytes() == b"pwned\n"


def test_kernel_interfaces_are_read_only_or_masked(sh) -> None:
    r = sh("echo 3 > /proc/sys/vm/drop_caches; echo sys=$?; echo b > /proc/sysrq-trigger; "
           "echo sysrq=$?; touch /sys/x; echo sysfs=$?; ls /proc/acpi 2>/dev/null | wc -l; "
           "for f in kcore keys timer_list sched_debug; do "
           "  test -e /proc/$f && echo $f=$(wc -c < /proc/$f); done")  # fmt: skip
    lines = r.out.split()
    assert lines[:4] == ["sys=1", "sysrq=1", "sysfs=1", "0"]
    # Whichever of the masked files this kernel has reads as empty (/dev/null).
    assert lines[4:] and all(line.endswith("=0") for line in lines[4:])


def test_capabilities_are_reduced_and_seccomp_is_on(sh) -> None:
    r = sh("grep -E '^(CapBnd|CapEff|CapPrm|CapInh|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status")
    fields = dict(line.split(":\t") for line in r.out.strip().splitlines())
    assert fields["CapBnd"] == fields["CapEff"] == fields["CapPrm"] == "00000000a00425fb"
    assert fields["CapInh"] == fields["CapAmb"] == "0000000000000000"
    assert fields["NoNewPrivs"] == "1" and fields["Seccomp"] == "2"


def test_only_harmless_devices_exist(sh) -> None:
    r = sh("ls /dev; cat /dev/sda 2>/dev/null; echo sda=$?; head -c 4 /dev/zero | wc -c;"
           " echo x > /dev/full; echo full=$?")  # fmt: skip
    names = r.out.split()
    assert names[: names.index("sda=1")] == ["fd", "full", "null", "ptmx", "pts", "random",
                                              "shm", "stderr", "stdin", "stdout", "tty",
                                              "urandom", "zero"]  # fmt: skip
    assert names[-2:] == ["4", "full=1"]


def test_loading_kernel_modules_and_rebooting_are_refused(sh) -> None:
    r = sh("insmod /nonexistent.ko; echo insmod=$?; reboot -f; echo reboot=$?; "
           "swapoff -a; echo swap=$?; pivot_root / /; echo pivot=$?; echo alive")  # fmt: skip
    codes = dict(line.split("=") for line in r.out.split()[:4])
    assert codes["insmod"] != "0" and codes["reboot"] != "0" and codes["pivot"] != "0"
    assert r.out.endswith("alive\n") and r.info.exit_code == 0


def test_unprivileged_user_cannot_regain_root(sh) -> None:
    r = sh("id -u; su -c id root </dev/null; echo su=$?; cat /proc/self/status | grep CapEff",
           uid=1000, gid=1000)  # fmt: skip
    assert r.out.splitlines()[0] == "1000"
    assert "su=0" not in r.out and "CapEff:\t0000000000000000" in r.out


def test_image_mount_points_that_are_symlinks_are_refused(image: Path, tmp_path: Path) -> None:
    # Mounts happen before pivot_root: a symlinked /dev would resolve on the host.
    evil = tmp_path / "evil"
    (evil / "dev").mkdir(parents=True)
    os.rmdir(evil / "dev")
    os.symlink(str(tmp_path / "host-target"), evil / "dev")
    (tmp_path / "host-target").mkdir()
    (evil / "etc").mkdir()
    os.symlink("/etc/shadow", evil / "etc/hosts")  # left alone, never bound over
    upper, work = tmp_path / "u", tmp_path / "w"
    upper.mkdir()
    work.mkdir()
    sb = Sandbox.start(lowers=[image, evil], upper=upper, work=work,
                       spec=RunSpec(argv=["true"], env=ENV), on_output=lambda s, c: None)
    info = sb.wait(60)
    assert info is not None and info.exit_code is None
    assert info.error == "sandbox setup failed at mount-dev: Too many levels of symbolic links"
    assert list((tmp_path / "host-target").iterdir()) == []


def test_symlinked_etc_files_are_left_alone_not_bound_through(sh, image: Path,
                                                               tmp_path: Path) -> None:  # fmt: skip
    layer = tmp_path / "links"
    (layer / "etc").mkdir(parents=True)
    os.symlink("/etc/passwd", layer / "etc/hosts")
    upper, work = tmp_path / "u", tmp_path / "w"
    upper.mkdir()
    work.mkdir()
    out = bytearray()
    sb = Sandbox.start(lowers=[image, layer], upper=upper, work=work,
                       spec=RunSpec(argv=["sh", "-c", "readlink /etc/hosts; cat /etc/hostname"],
                                    env=ENV), on_output=lambda s, c: out.extend(c))  # fmt: skip
    info = sb.wait(60)
    assert info is not None and info.exit_code == 0
    assert bytes(out) == b"/etc/passwd\nlinuxkit\n"
    assert (image / "etc/passwd").read_text().startswith("root:")
