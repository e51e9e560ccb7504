"""`cd` and `env`: the session's working directory and environment."""

from __future__ import annotations

import argparse
from typing import Any

from contree_shell.cli.context import Context
from contree_shell.cli.errors import CliError
from contree_shell.cli.paths import display_cwd, resolve_path


def register(sub: Any) -> None:
    """Add `cd` and `env`."""
    cd = sub.add_parser(
        "cd", help="change the session's working directory",
        description=(
            "Change the working directory of later runs (checked against the current "
            "image). Without PATH, print it. The cwd is part of the history: it follows "
            "branches and rollbacks."
        ),
    )
    cd.add_argument("path", nargs="?", metavar="PATH")
    cd.set_defaults(handler=cmd_cd)

    env = sub.add_parser(
        "env", help="set, unset or list session environment variables",
        description=(
            "With K=V pairs, set them; with -U K…, unset them; with nothing, list them. "
            "They are sent with every run of this session (not versioned by branches)."
        ),
    )
    env.add_argument("pairs", nargs="*", metavar="K=V | K")
    env.add_argument("-U", "--delete", "--rm", action="store_true", dest="delete",
                     help="unset the named variables")
    env.set_defaults(handler=cmd_env)


def change_directory(ctx: Context, path: str) -> str:
    """Validate `path` as a directory of the current image and record a `cd` node.

    Returns the new absolute cwd. Raises CliError("cd: P: no such directory") for a
    path that does not exist and "cd: P: not a directory" for a file.
    """
    from contree_shell.client.errors import NotFound, Unprocessable

    image = ctx.current_image()
    target = resolve_path(ctx.cwd(), path)
    try:
        ctx.client.list_dir(image, target)
    except NotFound:
        raise CliError(f"cd: {path}: no such directory") from None
    except Unprocessable:
        raise CliError(f"cd: {path}: not a directory") from None
    # The listing's own `path` may have symlinks resolved (/bin → /usr/bin); the cwd
    # keeps what the user typed, normalised, so the prompt shows the path they chose.
    ctx.store.append(ctx.session_key, kind="cd", image=image, title=target)
    return target


def cmd_cd(ctx: Context, args: argparse.Namespace) -> int:
    from contree_shell.output import emit_rows, write_stdout

    if args.path is None:
        cwd = display_cwd(ctx.cwd())
        if ctx.structured:
            emit_rows([{"cwd": cwd}], ctx.output_format)
        else:
            write_stdout((cwd + "\n").encode())
        return 0
    change_directory(ctx, args.path)
    return 0


def cmd_env(ctx: Context, args: argparse.Namespace) -> int:
    from contree_shell.cli.run import parse_env_pairs
    from contree_shell.output import emit_rows, info

    key = ctx.session_key
    if args.delete:
        if not args.pairs:
            raise CliError("Specify keys to unset")
        removed = ctx.store.unset_env(key, args.pairs)
        for name in args.pairs:
            info(f"Unset {name}" if name in removed else f"{name} was not set")
        return 0
    if args.pairs:
        for name, value in parse_env_pairs(args.pairs).items():
            ctx.store.set_env(key, name, value)
            info(f"Set {name}={value}")
        return 0
    env = ctx.store.env(key)
    if not env:
        info("No session environment variables set.")
        return 0
    emit_rows([{"key": k, "value": v} for k, v in env.items()], ctx.output_format)
    return 0
