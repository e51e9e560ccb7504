"""`auth`: save (verified with whoami), list, switch, remove; `-p NAME auth` targets NAME."""

from __future__ import annotations

import configparser
import json
import stat
from pathlib import Path

import pytest

from tests.conftest import LocalServer
from tests.test_cli_commands import contree, err, out

pytestmark = pytest.mark.root


@pytest.fixture
def home_env(server: LocalServer, tmp_path: Path) -> dict[str, str]:
    """The server env with a private config dir, so saved profiles stay in this test."""
    env = server.session_env()
    env["CONTREE_HOME"] = str(tmp_path / "home")
    env.pop("CONTREE_PROFILE", None)
    env.pop("CONTREE_SESSION_DB", None)
    return env


def _auth_ini(env: dict[str, str]) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(Path(env["CONTREE_HOME"]) / "auth.ini")
    return parser


def test_auth_saves_a_verified_profile_0600(server: LocalServer, home_env: dict[str, str]) -> None:
    result = contree(server, home_env, "auth", "--type", "jwt", "--url", server.url,
                     "--token", "secret-token", "-p", "mine")
    assert result.returncode == 0, err(result)
    path = Path(home_env["CONTREE_HOME"]) / "auth.ini"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ini = _auth_ini(home_env)
    assert ini["profile:mine"]["token"] == "secret-token"
    assert ini["profile:mine"]["type"] == "jwt"
    assert "secret-token" not in out(result) + err(result)
    # The saved profile is active and works.
    used = contree(server, home_env, "use", "tag:busybox:latest")
    assert used.returncode == 0, err(used)


def test_root_profile_flag_names_the_saved_profile(server: LocalServer, home_env: dict[str, str]) -> None:
    result = contree(server, home_env, "-p", "staging", "auth", "--type", "jwt",
                     "--url", server.url, "--token", "t")
    assert result.returncode == 0, err(result)
    ini = _auth_ini(home_env)
    assert ini.has_section("profile:staging") and not ini.has_section("profile:default")


def test_auth_refuses_an_unreachable_api_and_keeps_the_config(
    server: LocalServer, home_env: dict[str, str], tmp_path: Path
) -> None:
    result = contree(server, home_env, "auth", "--type", "jwt", "--token", "t",
                     "--url", f"unix://{tmp_path}/no.sock", timeout=60)
    assert result.returncode == 1
    assert "Token verification failed: " in err(result) and "Profile not changed." in err(result)
    assert not (Path(home_env["CONTREE_HOME"]) / "auth.ini").exists()


def test_existing_profile_needs_force(server: LocalServer, home_env: dict[str, str]) -> None:
    args = ("auth", "--type", "jwt", "--url", server.url, "--token", "t", "-p", "p1")
    assert contree(server, home_env, *args).returncode == 0
    again = contree(server, home_env, *args)
    assert again.returncode == 1 and "Aborted." in err(again)
    assert contree(server, home_env, *args, "-f").returncode == 0


def test_list_switch_remove(server: LocalServer, home_env: dict[str, str]) -> None:
    for name in ("one", "two"):
        result = contree(server, home_env, "auth", "--type", "jwt", "--url", server.url,
                         "--token", f"tok-{name}", "-p", name)
        assert result.returncode == 0, err(result)
    listed = contree(server, home_env, "-o", "json", "auth", "list")
    rows = {r["name"]: r for r in map(json.loads, listed.stdout.splitlines())}
    assert rows["two"]["active"] is True and rows["two"]["status"] == "ok"
    assert rows["one"]["status"] == "inactive"
    assert len(rows["one"]["token_sha256"]) == 16 and "tok-one" not in out(listed)
    offline = contree(server, home_env, "-o", "json", "auth", "ls", "-O")
    assert {json.loads(r)["status"] for r in offline.stdout.splitlines()} >= {"offline mode"}
    assert contree(server, home_env, "auth", "switch", "one").returncode == 0
    assert _auth_ini(home_env)["DEFAULT"]["profile"] == "one"
    missing = contree(server, home_env, "auth", "switch", "nope")
    assert missing.returncode == 1 and "Profile 'nope' does not exist" in err(missing)
    # Removing the active profile makes the next one active and drops its session DB.
    assert contree(server, home_env, "use", "tag:busybox:latest").returncode == 0
    db = Path(home_env["CONTREE_HOME"]) / "cli" / "sessions" / "one.db"
    assert db.exists()
    refused = contree(server, home_env, "auth", "remove", "one")
    assert refused.returncode == 1 and "use -f" in err(refused)
    removed = contree(server, home_env, "auth", "rm", "-f", "one")
    assert removed.returncode == 0, err(removed)
    assert not db.exists()
    ini = _auth_ini(home_env)
    assert not ini.has_section("profile:one") and ini["DEFAULT"]["profile"] == "two"
