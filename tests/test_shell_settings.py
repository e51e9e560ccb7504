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


def test_first_run_writes_the_commented_template_and_it_changes_nothing(config: Path) -> None:
    from contree_shell.shell.settings import config_path, ensure_config_file, template_text

    path = ensure_config_file()
    assert path == config_path() and path.read_text() == template_text()
    assert "[keys]" in path.read_text()
    assert load_settings() == ShellSettings()
    path.write_text("[shell]\n")
    ensure_config_file()  # an existing file is never overwritten
    assert path.read_text() == "[shell]\n"


def test_shell_toml_sets_mode_pager_colours_and_keys(config: Path) -> None:
    from contree_shell.shell.settings import config_path

    config_path().write_text(
        '[shell]\nediting_mode = "vi"\npager = false\nfuzzy = false\nimage = "tag:x"\n'
        '[colors]\n"prompt.branch" = "ansigreen"\n'
        '[keys]\ntoggle_editing_mode = ["f5", "c-x v"]\n'
    )
    settings = load_settings()
    assert (settings.vi, settings.pager, settings.fuzzy, settings.image) == (
        True, False, False, "tag:x")
    assert settings.colors == {"prompt.branch": "ansigreen"}
    assert settings.keys_for("toggle_editing_mode") == ("f5", "c-x v")
    assert settings.keys_for("edit_in_editor") == ("c-x c-e",)
    assert settings.problems == ()


def test_a_broken_shell_toml_falls_back_and_says_why(config: Path) -> None:
    from contree_shell.shell.settings import config_path

    config_path().write_text('[shell]\npager = "maybe"\n[keys]\nfly = "f9"\n')
    settings = load_settings()
    assert settings.pager is True
    assert any("pager" in p for p in settings.problems)
    assert any("unknown action 'fly'" in p for p in settings.problems)
    config_path().write_text("[shell\n")
    assert load_settings().problems and load_settings().image == DEFAULT_IMAGE


def test_contree_pager_off_turns_paging_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTREE_PAGER", "off")
    assert load_settings().pager is False
