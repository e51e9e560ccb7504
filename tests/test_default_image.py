"""The default image, for real: debootstrap'd `debian:bookworm`, then apt inside it.

This is what the README's first command gives a newcomer. It needs Debian's package
mirror (the one the host's apt uses); when the host itself cannot reach it, the test
skips, and says so. When the host can, the sandbox must too — through its own network
namespace and user-mode NAT, never the host's network namespace.
"""

from __future__ import annotations

import os
import urllib.request

import pytest

from contree_shell.sandbox.bootstrap import choose_mirror
from tests.conftest import LocalServer, wait_operation

pytestmark = [pytest.mark.slow, pytest.mark.network]


def _mirror_reachable() -> str | None:
    """The host's Debian mirror if it answers, else None."""
    mirror = choose_mirror(dict(os.environ))
    if mirror is None:
        return None
    try:
        with urllib.request.urlopen(f"{mirror.rstrip('/')}/dists/bookworm/Release", timeout=10):
            return mirror
    except OSError:
        return None


@pytest.fixture(scope="module")
def debian(server: LocalServer) -> str:
    if os.environ.get("CONTREE_TEST_NETWORK", "1") == "0":
        pytest.skip("CONTREE_TEST_NETWORK=0")
    if _mirror_reachable() is None:
        pytest.skip("the host has no reachable Debian mirror in its apt sources")
    with server.http() as http:
        resp = http.post(
            "/v1/images/import",
            json={"registry": {"url": "debootstrap:bookworm"}, "tag": "debian:bookworm"},
        )
        assert resp.status_code == 201, resp.text
        op = wait_operation(http, resp.json()["uuid"], timeout=600)
        assert op["status"] == "SUCCESS", op
        events = http.get(f"/v1/operations/{op['uuid']}/events").text
        # Progress was visible while it ran: debootstrap's own lines are in the log.
        assert "Base system installed successfully" in events
        return str(op["result"]["image"])


def test_default_image_runs_apt_get_install_with_network(
    server: LocalServer, debian: str
) -> None:
    env = server.session_env()
    assert server.contree("use", "tag:debian:bookworm", env=env).returncode == 0
    result = server.contree(
        "run", "-t", "300", "-s",
        "apt-get update -qq && apt-get install -y -qq curl >/dev/null 2>&1 && curl --version",
        env=env, timeout=400,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout.startswith(b"curl ")
    # The install is a checkpoint: curl is in the session's new image.
    listing = server.contree("ls", "/usr/bin/curl", env=env)
    assert listing.returncode == 0 and b"curl" in listing.stdout


def test_default_image_reports_debian_and_home(server: LocalServer, debian: str) -> None:
    env = server.session_env()
    assert server.contree("use", "tag:debian:bookworm", env=env).returncode == 0
    out = server.contree("cat", "/etc/os-release", env=env)
    assert b"bookworm" in out.stdout
    home = server.contree("run", "-s", "echo $HOME", env=env)
    assert home.stdout.strip() == b"/root", home
