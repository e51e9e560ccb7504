"""Profiles, auth.ini and XDG paths (pure file handling, temp dirs per test)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from contree_shell import config
from contree_shell.config import ConfigError, Profile


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in list(os.environ):
        if name.startswith(("CONTREE_", "XDG_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def test_config_dir_prefers_contree_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert config.config_dir() == tmp_path / "xdg" / "contree"
    monkeypatch.setenv("CONTREE_HOME", str(tmp_path / "ch"))
    assert config.config_dir() == tmp_path / "ch"


def test_config_dir_defaults_to_dot_config(tmp_path: Path) -> None:
    assert config.config_dir() == tmp_path / "home" / ".config" / "contree"


def test_server_home_from_env_then_xdg_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert config.server_home() == tmp_path / "home" / ".local" / "share" / "contree" / "server"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert config.server_home() == tmp_path / "data" / "contree" / "server"
    monkeypatch.setenv("CONTREE_SERVER_HOME", str(tmp_path / "srv"))
    assert config.server_home() == tmp_path / "srv"


def test_no_auth_ini_selects_builtin_local_profile(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONTREE_SERVER_HOME", str(tmp_path / "srv"))
    profile = config.load_profile()
    assert profile.name == "local"
    assert profile.type == "local"
    assert profile.token is None
    assert profile.url == f"unix://{tmp_path / 'srv' / 'server.sock'}"


def test_local_profile_url_is_absolute(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONTREE_SERVER_HOME", "relative/srv")
    assert config.local_profile().url == f"unix://{tmp_path / 'relative' / 'srv' / 'server.sock'}"


def _write_auth(tmp_path: Path, text: str) -> None:
    home = tmp_path / "cfg"
    home.mkdir(exist_ok=True)
    (home / "auth.ini").write_text(text)


AUTH = """\
[DEFAULT]
profile = work

[profile:work]
url = https://contree.example.com
token = tok-work
type = iam
project = proj-1

[profile:legacy]
url = https://old.example.com
token = tok-legacy
"""


def test_profile_selection_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONTREE_HOME", str(tmp_path / "cfg"))
    _write_auth(tmp_path, AUTH)
    assert config.load_profile().name == "work"  # [DEFAULT] profile
    monkeypatch.setenv("CONTREE_PROFILE", "legacy")
    assert config.load_profile().name == "legacy"  # env beats [DEFAULT]
    assert config.load_profile("local").name == "local"  # -p beats env
    assert config.load_profile("work").project == "proj-1"


def test_missing_type_means_jwt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONTREE_HOME", str(tmp_path / "cfg"))
    _write_auth(tmp_path, AUTH)
    legacy = config.load_profile("legacy")
    assert legacy == Profile(
        name="legacy", url="https://old.example.com", token="tok-legacy", project=None, type="jwt"
    )


def test_default_profile_does_not_leak_into_profiles(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONTREE_HOME", str(tmp_path / "cfg"))
    _write_auth(tmp_path, "[DEFAULT]\nprofile = work\ntoken = leaked\n[profile:work]\nurl = https://x.example\n")
    assert config.load_profile().token is None


def test_unknown_profile_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONTREE_HOME", str(tmp_path / "cfg"))
    with pytest.raises(ConfigError) as err:
        config.load_profile("nope")
    assert err.value.message == "Profile 'nope' does not exist. Run `contree auth` first."
    monkeypatch.setenv("CONTREE_PROFILE", "ghost")
    with pytest.raises(ConfigError, match="Profile 'ghost' does not exist"):
        config.load_profile()


def test_save_profile_round_trip_is_private(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONTREE_HOME", str(tmp_path / "cfg"))
    old_umask = os.umask(0o022)
    try:
        _save_round_trip(tmp_path)
    finally:
        os.umask(old_umask)


def _save_round_trip(tmp_path: Path) -> None:
    saved = Profile(name="prod", url="https://c.example.com", token="s3cret", project="p", type="iam")
    path = config.save_profile(saved)
    assert path == tmp_path / "cfg" / "auth.ini"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert config.load_profile() == saved  # became the default
    other = Profile(name="dev", url="https://d.example.com", token="t2")
    config.save_profile(other, make_default=False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    profiles, default = config.list_profiles()
    assert [p.name for p in profiles] == ["prod", "dev"]
    assert default == "prod"
    assert config.load_profile("dev") == other
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_saved_file_is_readable_by_the_official_format(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import configparser

    monkeypatch.setenv("CONTREE_HOME", str(tmp_path / "cfg"))
    config.save_profile(Profile(name="prod", url="https://c.example.com", token="s3cret"))
    plain = configparser.ConfigParser(interpolation=None)
    plain.read(tmp_path / "cfg" / "auth.ini")
    assert plain["DEFAULT"]["profile"] == "prod"
    assert plain["profile:prod"]["token"] == "s3cret"
    assert plain["profile:prod"]["type"] == "jwt"


def test_save_preserves_existing_profiles(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONTREE_HOME", str(tmp_path / "cfg"))
    _write_auth(tmp_path, AUTH)
    config.save_profile(Profile(name="new", url="https://n.example.com", token="t"), make_default=False)
    assert config.load_profile().name == "work"
    assert config.load_profile("legacy").token == "tok-legacy"


def test_remove_and_set_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONTREE_HOME", str(tmp_path / "cfg"))
    _write_auth(tmp_path, AUTH)
    config.set_default_profile("legacy")
    assert config.load_profile().name == "legacy"
    config.remove_profile("legacy")
    assert config.load_profile().name == "local"
    with pytest.raises(ConfigError):
        config.set_default_profile("legacy")


def test_require_credentials_messages() -> None:
    config.require_credentials(config.local_profile())
    with pytest.raises(ConfigError, match="No token configured for profile 'a'"):
        config.require_credentials(Profile(name="a", url="https://x.example"))
    with pytest.raises(ConfigError, match="No project configured for IAM profile 'b'"):
        config.require_credentials(Profile(name="b", url="https://x.example", token="t", type="iam"))
    with pytest.raises(ConfigError, match="No URL configured for profile 'c'"):
        config.require_credentials(Profile(name="c", url="", token="t"))


def test_cli_settings_reads_only_the_cli_section(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONTREE_HOME", str(tmp_path / "cfg"))
    assert config.cli_settings() == {}
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "cli.ini").write_text(
        "[DEFAULT]\nprofile = leaked\n[cli]\noutput = json\neditor = vi\n"
    )
    assert config.cli_settings() == {"output": "json", "editor": "vi"}


def test_broken_auth_ini_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONTREE_HOME", str(tmp_path / "cfg"))
    _write_auth(tmp_path, "this is not\nan ini file\n")
    with pytest.raises(ConfigError) as err:
        config.load_profile()
    assert "\n" not in err.value.message
    assert "auth.ini" in err.value.message
