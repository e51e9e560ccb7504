"""Shell settings: `shell.toml` in the config dir, `[cli]` keys in cli.ini, environment.

`<config dir>/shell.toml` (`$CONTREE_HOME`, else `$XDG_CONFIG_HOME/contree`) is written
from the commented template shipped in this package (`shell.toml` next to this module) on
the first interactive start, so every setting is discoverable in one file.

Precedence, highest first: environment variable, shell.toml, cli.ini `[cli]`, default.

| shell.toml `[shell]` | cli.ini `[cli]`       | env var                      | default |
|----------------------|-----------------------|------------------------------|---------|
| `image`              | `shell_image`         | `CONTREE_SHELL_IMAGE`        | `tag:debian:bookworm` |
| `toolbar`            | `shell_toolbar`       | `CONTREE_SHELL_TOOLBAR`      | `always` |
| `editing_mode`       | `shell_editing_mode`  | `CONTREE_SHELL_EDITING_MODE` | `emacs` (or `vi`) |
| `pager`              | `shell_pager`         | `CONTREE_PAGER` (off values) | `true` |
| `auto_suggest`, `fuzzy`, `highlight`, `style` | — | — | true, true, true, `native` |

`[colors]` maps style classes to prompt_toolkit style strings; `[keys]` maps the actions
in `KEY_ACTIONS` to a key or a list of keys.

`toolbar`: `always` keeps the status toolbar under the prompt; `typing` shows it only
while a command is being edited (an idle screen is then just output and prompts, which
reads cleanly in scrollback and recordings); `off` never shows it.

A broken file never stops the shell: unknown or ill-typed values fall back to their
defaults and the problems are returned in `ShellSettings.problems` (the REPL warns once).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_IMAGE",
    "KEY_ACTIONS",
    "TOOLBAR_MODES",
    "ShellSettings",
    "config_path",
    "ensure_config_file",
    "load_settings",
    "template_text",
]

log = logging.getLogger(__name__)

DEFAULT_IMAGE = "tag:debian:bookworm"
TOOLBAR_MODES = ("always", "typing", "off")
KEY_ACTIONS: dict[str, tuple[str, ...]] = {
    "toggle_editing_mode": ("f4",),
    "edit_in_editor": ("c-x c-e",),
    "history_search": ("c-r",),
}
_OFF = {"", "0", "off", "no", "false", "never"}


@dataclass(frozen=True)
class ShellSettings:
    """What the user configured for the shell."""

    image: str = DEFAULT_IMAGE
    toolbar: str = "always"
    vi: bool = False
    pager: bool = True
    auto_suggest: bool = True
    fuzzy: bool = True
    highlight: bool = True
    style: str = "native"
    colors: dict[str, str] = field(default_factory=dict, compare=False)
    keys: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False)
    problems: tuple[str, ...] = field(default=(), compare=False)

    def keys_for(self, action: str) -> tuple[str, ...]:
        """The keys bound to `action` (the user's, else the default)."""
        return self.keys.get(action) or KEY_ACTIONS.get(action, ())


def config_path() -> Path:
    """Where the shell's settings file lives."""
    from contree_shell.config import config_dir

    return config_dir() / "shell.toml"


def template_text() -> str:
    """The commented default settings file shipped with the package."""
    from importlib import resources

    return resources.files("contree_shell.shell").joinpath("shell.toml").read_text("utf-8")


def ensure_config_file() -> Path | None:
    """Write the commented template on first run; never fails the shell."""
    try:
        path = config_path()
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(template_text(), encoding="utf-8")
        return path
    except Exception:
        log.debug("could not write the shell settings file", exc_info=True)
        return None


def _read_toml(problems: list[str]) -> dict[str, Any]:
    import tomllib

    try:
        path = config_path()
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except Exception as exc:
        problems.append(f"{config_path()}: {str(exc).splitlines()[0] if str(exc) else exc}")
        return {}


def _bool(value: Any, name: str, default: bool, problems: list[str]) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"1", "true", "yes", "on"}:
        return True
    if isinstance(value, str) and value.strip().lower() in _OFF:
        return False
    if value is not None:
        problems.append(f"shell.toml: {name} must be true or false")
    return default


def _keys(table: Any, problems: list[str]) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    if not isinstance(table, dict):
        return out
    for action, value in table.items():
        if action not in KEY_ACTIONS:
            problems.append(f"shell.toml [keys]: unknown action {action!r} "
                            f"(known: {', '.join(KEY_ACTIONS)})")
            continue
        keys = [value] if isinstance(value, str) else value
        if not isinstance(keys, list) or not all(isinstance(k, str) and k.strip() for k in keys):
            problems.append(f"shell.toml [keys]: {action} must be a key name or a list of them")
            continue
        out[action] = tuple(k.strip() for k in keys)
    return out


def load_settings() -> ShellSettings:
    """Read the settings; unreadable files or bad values fall back to defaults."""
    problems: list[str] = []
    try:
        from contree_shell.config import cli_settings

        ini = cli_settings()
    except Exception:
        log.debug("cli.ini unreadable; shell defaults apply", exc_info=True)
        ini = {}
    toml = _read_toml(problems)
    table = toml.get("shell")
    shell: dict[str, Any] = table if isinstance(table, dict) else {}

    def pick(env: str | None, key: str, ini_key: str | None, default: Any) -> Any:
        if env and os.environ.get(env):
            return os.environ[env]
        if key in shell:
            return shell[key]
        if ini_key and ini.get(ini_key):
            return ini[ini_key]
        return default

    image = str(pick("CONTREE_SHELL_IMAGE", "image", "shell_image", DEFAULT_IMAGE)).strip()
    toolbar = str(pick("CONTREE_SHELL_TOOLBAR", "toolbar", "shell_toolbar", "always")
                  ).strip().lower()
    if toolbar not in TOOLBAR_MODES:
        problems.append(f"toolbar must be one of {', '.join(TOOLBAR_MODES)}")
        toolbar = "always"
    mode = str(pick("CONTREE_SHELL_EDITING_MODE", "editing_mode", "shell_editing_mode",
                    "emacs")).strip().lower()
    pager = _bool(pick(None, "pager", "shell_pager", True), "pager", True, problems)
    if os.environ.get("CONTREE_PAGER", "x").strip().lower() in _OFF:
        pager = False
    colors = toml.get("colors")
    return ShellSettings(
        image=image or DEFAULT_IMAGE,
        toolbar=toolbar,
        vi=mode == "vi",
        pager=pager,
        auto_suggest=_bool(shell.get("auto_suggest"), "auto_suggest", True, problems),
        fuzzy=_bool(shell.get("fuzzy"), "fuzzy", True, problems),
        highlight=_bool(shell.get("highlight"), "highlight", True, problems),
        style=str(shell.get("style") or "native"),
        colors={str(k): str(v) for k, v in colors.items()} if isinstance(colors, dict) else {},
        keys=_keys(toml.get("keys"), problems),
        problems=tuple(problems),
    )
