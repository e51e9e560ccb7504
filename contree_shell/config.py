"""Client configuration: XDG paths, profiles in `auth.ini`, `[cli]` defaults in `cli.ini`.

`auth.ini` uses the official contree-cli format so both tools can share one file:

    [DEFAULT]
    profile = work

    [profile:work]
    url = https://contree.example.com
    token = ...
    type = jwt          ; or iam; a missing type means jwt (the legacy default)
    project = ...       ; optional

When nothing is configured the built-in `local` profile is active: it talks to the
local server over `unix://<server home>/server.sock` and needs no token.
"""

from __future__ import annotations

import configparser
import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "LOCAL_PROFILE",
    "ConfigError",
    "Profile",
    "auth_path",
    "cli_settings",
    "config_dir",
    "list_profiles",
    "load_profile",
    "local_profile",
    "remove_profile",
    "require_credentials",
    "save_profile",
    "select_profile_name",
    "server_home",
    "set_default_profile",
]

LOCAL_PROFILE = "local"
PROFILE_TYPES = ("iam", "jwt", "local")
_SECTION_PREFIX = "profile:"
# configparser copies [DEFAULT] keys into every section; we read auth.ini with another
# default-section name so `[DEFAULT] profile` stays a plain section and never leaks
# into profiles or `[cli]` settings (a bug of the official CLI).
_NO_DEFAULTS = "\x00no-defaults"


class ConfigError(Exception):
    """A configuration problem the user can fix; ``message`` is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass
class Profile:
    """Where and how to reach a Contree API."""

    name: str
    url: str
    token: str | None = None
    project: str | None = None
    type: str = "jwt"  # "iam" | "jwt" | "local"

    @property
    def is_local(self) -> bool:
        """True for the built-in profile whose server this machine starts on demand."""
        return self.type == "local"


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value).expanduser() if value else None


def config_dir() -> Path:
    """The client config dir: `$CONTREE_HOME`, else `$XDG_CONFIG_HOME/contree`."""
    explicit = _env_path("CONTREE_HOME")
    if explicit is not None:
        return explicit
    base = _env_path("XDG_CONFIG_HOME") or Path.home() / ".config"
    return base / "contree"


def server_home() -> Path:
    """The local server's home: `$CONTREE_SERVER_HOME`, else `$XDG_DATA_HOME/contree/server`."""
    explicit = _env_path("CONTREE_SERVER_HOME")
    if explicit is not None:
        return explicit
    base = _env_path("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return base / "contree" / "server"


def auth_path() -> Path:
    """Path of `auth.ini` (may not exist)."""
    return config_dir() / "auth.ini"


def cli_ini_path() -> Path:
    """Path of `cli.ini` (non-secret defaults; may not exist)."""
    return config_dir() / "cli.ini"


def local_profile() -> Profile:
    """The built-in profile for the local server (absolute socket path, no token)."""
    sock = server_home().absolute() / "server.sock"
    return Profile(name=LOCAL_PROFILE, url=f"unix://{sock}", type="local")


def _parser() -> configparser.ConfigParser:
    return configparser.ConfigParser(interpolation=None, default_section=_NO_DEFAULTS)


def _read_auth() -> configparser.ConfigParser:
    parser = _parser()
    path = auth_path()
    try:
        with path.open(encoding="utf-8") as fh:
            parser.read_file(fh)
    except FileNotFoundError:
        pass
    except (OSError, configparser.Error) as exc:
        raise ConfigError(f"Cannot read {path}: {_one_line(exc)}") from exc
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _profile_from_section(name: str, section: configparser.SectionProxy) -> Profile:
    ptype = (section.get("type") or "jwt").strip().lower()
    return Profile(
        name=name,
        url=(section.get("url") or "").strip(),
        token=(section.get("token") or "").strip() or None,
        project=(section.get("project") or "").strip() or None,
        type=ptype,
    )


def _default_name(parser: configparser.ConfigParser) -> str | None:
    if parser.has_section("DEFAULT"):
        name = (parser.get("DEFAULT", "profile", fallback="") or "").strip()
        return name or None
    return None


def select_profile_name(explicit: str | None = None) -> str:
    """The active profile name: `-p` > `$CONTREE_PROFILE` > `[DEFAULT] profile` > `local`."""
    if explicit:
        return explicit
    from_env = os.environ.get("CONTREE_PROFILE", "").strip()
    if from_env:
        return from_env
    return _default_name(_read_auth()) or LOCAL_PROFILE


def load_profile(name: str | None = None) -> Profile:
    """Load the selected profile; raises ConfigError when it does not exist.

    A `[profile:local]` section in auth.ini overrides the built-in `local` profile.
    """
    chosen = select_profile_name(name)
    parser = _read_auth()
    section = _SECTION_PREFIX + chosen
    if parser.has_section(section):
        return _profile_from_section(chosen, parser[section])
    if chosen == LOCAL_PROFILE:
        return local_profile()
    raise ConfigError(f"Profile '{chosen}' does not exist. Run `contree auth` first.")


def list_profiles() -> tuple[list[Profile], str | None]:
    """Every profile saved in auth.ini (file order) and the `[DEFAULT] profile` name."""
    parser = _read_auth()
    profiles = [
        _profile_from_section(section[len(_SECTION_PREFIX):], parser[section])
        for section in parser.sections()
        if section.startswith(_SECTION_PREFIX)
    ]
    return profiles, _default_name(parser)


def require_credentials(profile: Profile) -> None:
    """Check that a remote profile can build a client (same messages as the official CLI)."""
    if profile.is_local:
        return
    if profile.type not in PROFILE_TYPES:
        raise ConfigError(
            f"Unknown type '{profile.type}' for profile '{profile.name}' (expected iam or jwt)."
        )
    if not profile.token:
        raise ConfigError(
            f"No token configured for profile '{profile.name}'. Run `contree auth` first."
        )
    if profile.type == "iam" and not profile.project:
        raise ConfigError(
            f"No project configured for IAM profile '{profile.name}'. "
            "Run `contree auth` with --project."
        )
    if not profile.url:
        raise ConfigError(
            f"No URL configured for profile '{profile.name}'. Run `contree auth` or pass --url."
        )


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` atomically; the file is 0600 from its first byte."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode is filtered by umask and ignored if tmp existed
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    os.chmod(path, 0o600)


def _write_auth(parser: configparser.ConfigParser) -> Path:
    buf = io.StringIO()
    parser.write(buf)
    path = auth_path()
    _write_private(path, buf.getvalue())
    return path


def save_profile(profile: Profile, *, make_default: bool = True) -> Path:
    """Add or replace `profile` in auth.ini (mode 0600, atomic); return the file path."""
    if profile.type not in ("iam", "jwt"):
        raise ConfigError(f"Cannot save a profile of type '{profile.type}' (expected iam or jwt).")
    parser = _read_auth()
    section = _SECTION_PREFIX + profile.name
    if parser.has_section(section):
        parser.remove_section(section)
    parser.add_section(section)
    parser.set(section, "url", profile.url)
    parser.set(section, "token", profile.token or "")
    parser.set(section, "type", profile.type)
    if profile.project:
        parser.set(section, "project", profile.project)
    if make_default:
        _set_default(parser, profile.name)
    return _write_auth(parser)


def _set_default(parser: configparser.ConfigParser, name: str | None) -> None:
    if not parser.has_section("DEFAULT"):
        parser.add_section("DEFAULT")
    if name:
        parser.set("DEFAULT", "profile", name)
    else:
        parser.remove_option("DEFAULT", "profile")


def set_default_profile(name: str) -> Path:
    """Make `name` the `[DEFAULT] profile`; it must exist (or be `local`)."""
    parser = _read_auth()
    if name != LOCAL_PROFILE and not parser.has_section(_SECTION_PREFIX + name):
        raise ConfigError(f"Profile '{name}' does not exist. Run `contree auth` first.")
    _set_default(parser, name)
    return _write_auth(parser)


def remove_profile(name: str) -> Path:
    """Delete a saved profile; if it was the default, the default is cleared."""
    parser = _read_auth()
    if not parser.remove_section(_SECTION_PREFIX + name):
        raise ConfigError(f"Profile '{name}' does not exist.")
    if _default_name(parser) == name:
        _set_default(parser, None)
    return _write_auth(parser)


def cli_settings() -> dict[str, str]:
    """The `[cli]` section of cli.ini (argparse defaults such as `output`, and `editor`)."""
    parser = _parser()
    path = cli_ini_path()
    try:
        with path.open(encoding="utf-8") as fh:
            parser.read_file(fh)
    except FileNotFoundError:
        return {}
    except (OSError, configparser.Error) as exc:
        raise ConfigError(f"Cannot read {path}: {_one_line(exc)}") from exc
    if not parser.has_section("cli"):
        return {}
    return {key: value for key, value in parser.items("cli")}
