"""Base rootfs builders: busybox tree, apt-sources mirror parsing, real debootstrap (opt-in)."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from contree_shell.sandbox.bootstrap import (
    BootstrapError,
    build_busybox_rootfs,
    busybox_applets,
    choose_mirror,
    debootstrap_rootfs,
    host_mirror,
    mirror_from_deb822,
    mirror_from_sources_list,
    unescape_mount_point,
)

DEB822 = """\
Types: deb
# http://snapshot.example/archive/debian/20250520T000000Z
URIs: http://mirror.example.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example.org/debian-security
Suites: bookworm-security
Components: main
"""

DEB822_SECURITY_FIRST = """\
Types: deb-src deb
URIs: http://sec.example.org/debian-security
Suites: bookworm-security
Components: main

Types: deb
Enabled: no
URIs: http://disabled.example.org/debian
Suites: bookworm
Components: main

Types: deb
URIs: https://local.example.net/pub/debian/
Suites: trixie
Components: contrib main non-free
"""

SOURCES_LIST = """\
# deb http://commented.example.org/debian bookworm main
deb-src http://src.example.org/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] http://security.example.org/debian-security bookworm-security main
deb http://updates.example.org/debian bookworm-updates main
deb [ arch=amd64 ] http://first.example.org/debian/ bookworm main contrib # trailing comment
deb http://second.example.org/debian bookworm main
"""


def test_deb822_first_debian_main_uri() -> None:
    assert mirror_from_deb822(DEB822) == "http://mirror.example.org/debian"


def test_deb822_skips_security_disabled_and_needs_main() -> None:
    assert mirror_from_deb822(DEB822_SECURITY_FIRST) == "https://local.example.net/pub/debian"
    assert (
        mirror_from_deb822(
            "Types: deb\nURIs: http://x/debian\nSuites: bookworm\nComponents: contrib\n"
        )
        is None
    )


def test_sources_list_first_debian_main_uri() -> None:
    assert mirror_from_sources_list(SOURCES_LIST) == "http://first.example.org/debian"


def test_sources_list_ignores_non_debian_archives() -> None:
    assert mirror_from_sources_list("deb http://archive.example.com/ubuntu jammy main\n") is None
    # A mirror whose path does not say "debian" is still recognised by its suite.
    assert mirror_from_sources_list("deb http://apt.example.com/ bookworm main\n") == (
        "http://apt.example.com"
    )


def test_mirror_choice_order(tmp_path: Path) -> None:
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    assert choose_mirror({}, apt) is None  # debootstrap's own default
    (apt / "sources.list.d/debian.sources").write_text(DEB822)
    (apt / "sources.list.d/other.list.disabled").write_text(
        "deb http://no.example/debian sid main\n"
    )
    assert host_mirror(apt) == "http://mirror.example.org/debian"
    (apt / "sources.list").write_text(SOURCES_LIST)
    assert choose_mirror({}, apt) == "http://first.example.org/debian"
    env = {"CONTREE_DEBIAN_MIRROR": "http://env.example/debian"}
    assert choose_mirror(env, apt) == "http://env.example/debian"


@pytest.mark.skipif(not Path("/bin/busybox").is_file(), reason="busybox-static not installed")
def test_busybox_rootfs_is_tiny_and_runs_sh(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chroot needs root")
    dest = tmp_path / "rootfs"
    build_busybox_rootfs(dest)
    assert os.readlink(dest / "bin/sh") == "busybox"
    assert os.readlink(dest / "usr/bin/env") == "../../bin/busybox"
    applets = busybox_applets()
    assert "sh" in applets and "ls" in applets
    for name in ("proc", "dev", "sys", "tmp"):
        assert (dest / name).is_dir()
    size = sum(p.lstat().st_size for p in dest.rglob("*"))
    assert size < 4 * 1024 * 1024
    out = subprocess.run(
        ["chroot", str(dest), "/bin/sh", "-c", "echo $((6*7)); id -un"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.split() == ["42", "root"]


def test_busybox_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BootstrapError, match="not found"):
        build_busybox_rootfs(tmp_path / "r", busybox=tmp_path / "no-busybox")


def test_debootstrap_rejects_odd_suite_names(tmp_path: Path) -> None:
    with pytest.raises(BootstrapError):
        debootstrap_rootfs(tmp_path / "r", "bookworm; rm -rf /", lambda _: None)


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("CONTREE_TEST_NETWORK") != "1", reason="set CONTREE_TEST_NETWORK=1"
)
def test_real_debootstrap_minbase(tmp_path: Path) -> None:
    lines: list[str] = []
    t0 = time.monotonic()
    debootstrap_rootfs(tmp_path / "deb", "bookworm", lines.append)
    assert time.monotonic() - t0 < 600
    assert (tmp_path / "deb/etc/debian_version").is_file()
    assert list((tmp_path / "deb/var/lib/apt/lists").iterdir()) == [
        tmp_path / "deb/var/lib/apt/lists/partial"
    ]
    assert any("Base system installed" in line for line in lines)


@pytest.mark.skipif(shutil.which("debootstrap") is None, reason="debootstrap not installed")
def test_debootstrap_failure_is_one_line_error_with_its_last_message(tmp_path: Path) -> None:
    lines: list[str] = []
    with pytest.raises(BootstrapError) as err:
        debootstrap_rootfs(
            tmp_path / "r", "bookworm", lines.append, mirror="http://127.0.0.1:9/debian"
        )
    assert "\n" not in str(err.value)
    assert "Failed getting release file" in str(err.value)
    assert lines[0].startswith("debootstrap --variant=minbase bookworm")


@pytest.mark.skipif(shutil.which("debootstrap") is None, reason="debootstrap not installed")
def test_debootstrap_cancel_stops_it(tmp_path: Path) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(BootstrapError, match="cancelled"):
        debootstrap_rootfs(
            tmp_path / "r", "bookworm", lambda _: None,
            mirror="http://127.0.0.1:9/debian", cancel=cancel,
        )  # fmt: skip


def test_mountinfo_escapes_are_decoded() -> None:
    assert unescape_mount_point(r"/srv/a\040b\011c\134d") == "/srv/a b\tc\\d"
