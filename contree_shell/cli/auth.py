"""`auth`: save, list, switch and remove API profiles (auth.ini, mode 0600).

`contree auth` verifies the token with `GET /v1/whoami` and saves only on success.
The profile name is `auth -p NAME`, else the root `contree -p NAME auth` (the official
CLI ignored the root flag and saved to `default`), else `default`. These handlers take
only the namespace: they must work while the selected profile does not exist yet.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from contree_shell.cli.errors import CliError

__all__ = ["register"]

DEFAULT_PROFILE = "default"
CHECK_TIMEOUT = 2.0


def register(sub: Any) -> None:
    """Add `auth` and its subcommands `list`, `switch`, `remove`."""
    p = sub.add_parser(
        "auth", help="save, list, switch and remove API profiles",
        description="Without a subcommand, save a profile: the token is checked with the "
        "API first (GET /v1/whoami) and the profile becomes the active one.",
    )
    p.add_argument("--token", dest="auth_token", help="API token (default: $CONTREE_TOKEN, "
                   "$NEBIUS_API_KEY, else asked)")
    p.add_argument("-u", "--url", dest="auth_url", help="API URL (default: $CONTREE_URL, else asked)")
    p.add_argument("--type", dest="auth_type", choices=("iam", "jwt"), default="iam")
    p.add_argument("-P", "--project", dest="auth_project",
                   help="project (iam; default: $CONTREE_PROJECT, $NEBIUS_AI_PROJECT, else asked)")
    p.add_argument("-p", "--profile", dest="auth_profile", metavar="NAME",
                   help="profile name (default: the root -p, else `default`)")
    p.add_argument("-f", "-y", "--force", action="store_true", dest="auth_force",
                   help="overwrite an existing profile without asking")
    p.set_defaults(func=cmd_save)
    asub = p.add_subparsers(dest="auth_command", metavar="SUBCOMMAND")
    ls = asub.add_parser("list", aliases=["ls", "profiles"], help="list profiles and check them")
    ls.add_argument("-O", "--offline", action="store_true", help="do not contact the APIs")
    ls.set_defaults(func=cmd_list)
    sw = asub.add_parser("switch", help="make a profile the active one")
    sw.add_argument("name", metavar="NAME")
    sw.set_defaults(func=cmd_switch)
    rm = asub.add_parser("remove", aliases=["rm", "del"],
                         help="remove a profile and its session database")
    rm.add_argument("name", metavar="NAME")
    rm.add_argument("-f", "-y", "--force", action="store_true", dest="auth_force")
    rm.set_defaults(func=cmd_remove)


def _interactive() -> bool:
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def _ask(prompt: str, *, secret: bool = False) -> str:
    from contree_shell.output import write_stderr

    if not _interactive():
        return ""
    if secret:
        return getpass.getpass(prompt).strip()
    write_stderr(prompt.encode())
    return sys.stdin.readline().strip()


def _first(*values: str | None) -> str:
    for value in values:
        if value:
            return value.strip()
    return ""


def _confirm(question: str) -> bool:
    return _ask(f"{question} [y/N] ").lower() in ("y", "yes")


def cmd_save(args: argparse.Namespace) -> int:
    from contree_shell.client.api import ContreeClient
    from contree_shell.config import Profile, list_profiles, save_profile
    from contree_shell.output import info, warn

    name = args.auth_profile or getattr(args, "profile", None) or DEFAULT_PROFILE
    if name == "local":
        raise CliError("'local' is the built-in profile of this machine's server; pick another name")
    existing = {p.name for p in list_profiles()[0]}
    if name in existing and not args.auth_force and not _confirm(
        f"Profile '{name}' exists. Overwrite?"
    ):
        raise CliError("Aborted.")
    env = os.environ
    token = _first(args.auth_token, getattr(args, "token", None), env.get("CONTREE_TOKEN"),
                   env.get("NEBIUS_API_KEY")) or _ask("Token: ", secret=True)
    if not token:
        raise CliError("A token is required (--token or $CONTREE_TOKEN)")
    url = _first(args.auth_url, getattr(args, "url", None), env.get("CONTREE_URL")) or _ask("URL: ")
    if not url:
        raise CliError("URL is required (--url or $CONTREE_URL)")
    project = None
    if args.auth_type == "iam":
        project = _first(args.auth_project, getattr(args, "project", None),
                         env.get("CONTREE_PROJECT"), env.get("NEBIUS_AI_PROJECT")) or _ask("Project: ")
        if not project:
            raise CliError("A project is required for IAM auth (--project or $CONTREE_PROJECT)")
    profile = Profile(name=name, url=url.rstrip("/"), token=token, project=project or None,
                      type=args.auth_type)
    try:
        client = ContreeClient.for_profile(profile)
        try:
            who = client.whoami()
        finally:
            client.close()
    except Exception as exc:
        message = getattr(exc, "message", None)
        if not isinstance(message, str):
            raise
        raise CliError(f"Token verification failed: {message}. Profile not changed.") from None
    permissions = who.get("permissions") if isinstance(who, dict) else None
    if isinstance(permissions, list | dict) and "list" not in permissions:
        warn(f"Token is valid but sandboxes are disabled on {project or url} (no 'list' permission)")
    path = save_profile(profile, make_default=True)
    info(f"Saved profile '{name}' to {path} (active)")
    return 0


def token_digest(token: str | None) -> str:
    """The first 16 hex digits of the token's sha256 (never the token itself)."""
    return hashlib.sha256(token.encode()).hexdigest()[:16] if token else ""


def _check(profile: Any) -> str:
    from contree_shell.client.api import ContreeClient

    if not profile.url:
        return "no url"
    try:
        client = ContreeClient.for_profile(profile, timeout=CHECK_TIMEOUT)
        try:
            client.whoami()
        finally:
            client.close()
    except Exception:  # any failure is a status, never an abort of the listing
        return "error"
    return "ok"


def cmd_list(args: argparse.Namespace) -> int:
    from contree_shell.config import list_profiles, select_profile_name
    from contree_shell.output import emit_rows

    profiles, _default = list_profiles()
    active = select_profile_name(getattr(args, "profile", None))
    statuses: dict[str, str] = {}
    if args.offline:
        statuses = {p.name: "offline mode" for p in profiles}
    elif profiles:
        pool = ThreadPoolExecutor(max_workers=4)
        futures = {p.name: pool.submit(_check, p) for p in profiles}
        for pname, fut in futures.items():
            try:
                statuses[pname] = fut.result(timeout=CHECK_TIMEOUT + 1)
            except FutureTimeout:
                statuses[pname] = "timeout"
        pool.shutdown(wait=False, cancel_futures=True)
    rows = [
        {"name": p.name, "type": p.type, "url": p.url, "project": p.project or "",
         "token_sha256": token_digest(p.token), "active": p.name == active,
         "status": statuses.get(p.name, "") if p.name == active or args.offline
         else ("inactive" if statuses.get(p.name) == "ok" else statuses.get(p.name, ""))}
        for p in profiles
    ]
    if "local" not in {p.name for p in profiles}:
        rows.append({"name": "local", "type": "local", "url": "(this machine)", "project": "",
                     "token_sha256": "", "active": active == "local", "status": "built-in"})
    emit_rows(rows, _format(args))
    return 0


def _format(args: argparse.Namespace) -> str:
    fmt = getattr(args, "output_format", None)
    return fmt if isinstance(fmt, str) else "default"


def cmd_switch(args: argparse.Namespace) -> int:
    from contree_shell.config import set_default_profile
    from contree_shell.output import info

    set_default_profile(args.name)
    info(f"Active profile: {args.name}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from contree_shell.cli.context import session_db_path
    from contree_shell.config import list_profiles, remove_profile, set_default_profile
    from contree_shell.output import info

    names = {p.name for p in list_profiles()[0]}
    if args.name not in names:
        raise CliError(f"Profile '{args.name}' does not exist.")
    if not args.auth_force and not _confirm(f"Remove profile '{args.name}' and its sessions?"):
        if not _interactive():
            raise CliError(f"Not removing profile '{args.name}' without confirmation; use -f")
        raise CliError("Aborted.")
    _, default = list_profiles()
    remove_profile(args.name)
    if not os.environ.get("CONTREE_SESSION_DB"):
        db = session_db_path(args.name)
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(f"{db}{suffix}")
            except FileNotFoundError:
                pass
    info(f"Removed profile '{args.name}'")
    remaining = [p.name for p in list_profiles()[0]]
    if default == args.name and remaining:
        set_default_profile(remaining[0])
        info(f"Active profile: {remaining[0]}")
    return 0
