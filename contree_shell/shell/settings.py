"""Shell settings: `[cli]` keys in cli.ini, overridden by environment variables.

| cli.ini `[cli]` key | env var                | default               |
|---------------------|------------------------|-----------------------|
| `shell_image`       | `CONTREE_SHELL_IMAGE`  | `tag:debian:bookworm` |
| `shell_toolbar`     | `CONTREE_SHELL_TOOLBAR`| `always`              |
| `shell_editing_mode`| `CONTREE_SHELL_EDITING_MODE` | `emacs` (or `vi`) |

`shell_toolbar`: `always` keeps the status toolbar under the prompt; `typing` shows it
only while a command is being edited (an idle screen is then just output and prompts,
which reads cleanly in scrollback and recordings); `off` never shows it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

__all__ = ["DEFAULT_IMAGE", "TOOLBAR_MODES", "ShellSettings", "load_settings"]

log = logging.getLogger(__name__)

DEFAULT_IMAGE = "tag:debian:bookworm"
TOOLBAR_MODES = ("always", "typing", "off")


@dataclass(frozen=True)
class ShellSettings:
    """What the user configured for the shell."""

    image: str = DEFAULT_IMAGE
    toolbar: str = "always"
    vi: bool = False


def load_settings() -> ShellSettings:
    """Read the settings; an unreadable cli.ini or a bad value falls back to defaults."""
    try:
        from contree_shell.config import cli_settings

        ini = cli_settings()
    except Exception:
        log.debug("cli.ini unreadable; shell defaults apply", exc_info=True)
        ini = {}
    image = os.environ.get("CONTREE_SHELL_IMAGE") or ini.get("shell_image") or DEFAULT_IMAGE
    toolbar = (os.environ.get("CONTREE_SHELL_TOOLBAR") or ini.get("shell_toolbar")
               or "always").strip().lower()
    if toolbar not in TOOLBAR_MODES:
        toolbar = "always"
    mode = (os.environ.get("CONTREE_SHELL_EDITING_MODE") or ini.get("shell_editing_mode")
            or "emacs").strip().lower()
    return ShellSettings(image=image.strip(), toolbar=toolbar, vi=mode == "vi")
