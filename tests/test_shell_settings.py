"""Shell settings: cli.ini `[cli]` keys with environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from contree_shell.shell.settings import DEFAULT_IMAGE, ShellSettings, load_settings


@pytest.fixture(autouse=True)
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CONTREE_HOME", str(tmp_path))
    for var in ("CONTREE_SHELL_IMAGE", "CONTREE_SHELL_TOOLBAR", "CONTREE_SHELL_EDITING_MODE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def write_ini(config: Path, body: str) -> None:
    from contree_shell.config import cli_ini_path

    path = cli_ini_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)


def test_defaults() -> None:
    assert load_settings() == ShellSettings(image=DEFAULT_IMAGE, toolbar="always", vi=False)


def test_cli_ini_keys(config: Path) -> None:
    write_ini(config, "[cli]\nshell_image = tag:busybox:latest\nshell_toolbar = typing\n"
                      "shell_editing_mode = vi\n")
    assert load_settings() == ShellSettings(image="tag:busybox:latest", toolbar="typing", vi=True)


def test_environment_wins_and_bad_values_fall_back(config: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    write_ini(config, "[cli]\nshell_image = tag:busybox:latest\n")
    monkeypatch.setenv("CONTREE_SHELL_IMAGE", "tag:debian:trixie")
    monkeypatch.setenv("CONTREE_SHELL_TOOLBAR", "sideways")
    settings = load_settings()
    assert settings.image == "tag:debian:trixie"
    assert settings.toolbar == "always"
