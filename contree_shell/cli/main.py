"""The `contree` command: the parser tree, the context, and the one place errors become exits.

Both faces use this module: `main()` for `contree X` in a terminal or a script, and
`execute(ctx, argv)` for `contree X` lines typed in the interactive shell (same parser
tree, built with `for_shell=True` so it raises instead of exiting).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from contree_shell import __version__
from contree_shell.cli.context import FORMATS, Context
from contree_shell.cli.errors import CliError, CliHelp, CliUsageError
from contree_shell.cli.parser import CliParser, ShellParser, add_subcommands

__all__ = [
    "CliError",
    "CliHelp",
    "CliUsageError",
    "Context",
    "build_parser",
    "execute",
    "main",
    "make_context",
]

Handler = Callable[[Context, argparse.Namespace], int | None]

EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


def version_string() -> str:
    """What `contree --version` prints."""
    import platform

    return f"contree-shell/{__version__} Python/{platform.python_version()} {platform.system()}"


# Global options that take a value: skipped when looking for the command word.
_GLOBAL_WITH_VALUE = frozenset(
    {"-p", "--profile", "-S", "--session", "-o", "--format", "--output", "--token", "--url",
     "--project"}
)


def command_word(argv: Sequence[str]) -> str | None:
    """The subcommand of `argv` (the first word after the global options), if any."""
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token in _GLOBAL_WITH_VALUE:
            skip = True
        elif token == "--" or not token.startswith("-"):
            return None if token == "--" else token
    return None


def build_parser(*, for_shell: bool = False, shell_only: bool = False) -> argparse.ArgumentParser:
    """The whole `contree` parser tree.

    With `for_shell=True`, a usage error raises `CliUsageError(message, usage)` and
    `--help` raises `CliHelp(text)` instead of printing and exiting. `shell_only=True`
    builds just the global options and `shell`: `contree shell` reaches its first prompt
    without importing every command module (the shell builds the full tree later, when
    a `contree …` line or Tab first needs it).
    """
    cls = ShellParser if for_shell else CliParser
    parser = cls(
        prog="contree",
        description=(
            "Work inside branching sandboxes: every run snapshots the filesystem, "
            "sessions keep the history as branches you can roll back."
        ),
        epilog="Run `contree COMMAND --help` for the options of one command.",
    )
    parser.add_argument("-p", "--profile", help="profile to use for this call (default: the active one, else `local`)")
    parser.add_argument("-S", "--session", metavar="KEY", help="session key (default: $CONTREE_SESSION, else derived from the terminal)")
    parser.add_argument(
        "-o", "--format", "--output", dest="output_format", choices=FORMATS, default=None,
        help="output format (default: human-readable)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    parser.add_argument("-v", "--version", action="store_true", help="print the version and exit")
    parser.add_argument("--token", help="API token for this call only")
    parser.add_argument("--url", help="API URL for this call only")
    parser.add_argument("--project", help="API project for this call only")

    sub = add_subcommands(parser, dest="command")
    if shell_only:
        _register_shell(sub)
        return parser
    from contree_shell.cli import (
        auth,
        completion,
        files,
        images,
        inspect,
        navigate,
        operations,
        run,
        session,
    )

    images.register_use(sub)
    run.register(sub)
    inspect.register(sub)
    navigate.register(sub)
    operations.register(sub)
    files.register(sub)
    session.register(sub)
    images.register(sub)
    auth.register(sub)
    completion.register(sub)
    _register_server(sub)
    _register_shell(sub)
    return parser


def _register_server(sub: Any) -> None:
    """`contree server …` comes from the server package; without it the command is absent."""
    try:
        from contree_shell.server.cli import register
    except ImportError:
        return
    register(sub)


def _register_shell(sub: Any) -> None:
    p = sub.add_parser(
        "shell", aliases=["sh"], help="interactive shell: bare lines run in the sandbox",
        description=(
            "Open the interactive shell on the current session. A session without an "
            "image starts from IMAGE (default: debian:bookworm, imported on first use)."
        ),
    )
    p.add_argument("image", nargs="?", metavar="IMAGE", help="switch the session to IMAGE first")
    p.add_argument("--image", dest="image_option", metavar="REF",
                   help="same as IMAGE (for scripts that prefer an option)")
    p.set_defaults(handler=_cmd_shell)


def _cmd_shell(ctx: Context, args: argparse.Namespace) -> int:
    if ctx.in_shell:
        raise CliError("'contree shell' cannot be run from within the shell.")
    from contree_shell.shell.repl import main as repl_main

    if args.image and args.image_option and args.image != args.image_option:
        raise CliError("Give the image once: IMAGE or --image REF", 2)
    ctx.in_shell = True
    return int(repl_main(ctx, image=args.image or args.image_option) or 0)


def make_context(
    *,
    profile: str | None = None,
    session: str | None = None,
    output_format: str | None = None,
    in_shell: bool = False,
    debug: bool = False,
    token: str | None = None,
    url: str | None = None,
    project: str | None = None,
) -> Context:
    """Build the context for one call (or for a whole shell) from the global options."""
    from contree_shell.config import cli_settings, load_profile
    from contree_shell.state.sessions import derive_session_key

    prof = load_profile(profile)
    if token:
        prof.token = token
    if url:
        prof.url = url.rstrip("/")
    if project:
        prof.project = project
    if output_format is None:
        settings = cli_settings()
        configured = settings.get("output") or settings.get("output_format") or "default"
        output_format = configured if configured in FORMATS else "default"
    key = derive_session_key(prof.name, session)
    return Context(
        profile=prof, session_key=key, output_format=output_format,
        in_shell=in_shell, debug=debug,
    )


def _dispatch(ctx: Context, args: argparse.Namespace) -> int:
    handler: Handler | None = getattr(args, "handler", None)
    if handler is not None:
        return int(handler(ctx, args) or 0)
    raise CliError("missing command; run `contree --help`", 2)


def _report(exc: BaseException, debug: bool) -> int:
    """Turn any exception from a command into a message on stderr and an exit code."""
    from contree_shell.output import error

    if isinstance(exc, KeyboardInterrupt):
        error("User interrupted")
        return EXIT_INTERRUPTED
    if isinstance(exc, BrokenPipeError):
        silence_stdout()
        return EXIT_BROKEN_PIPE
    if isinstance(exc, CliError):
        error(exc.message)
        return exc.exit_code
    message = _user_message(exc)
    if message is not None:
        if debug:
            _traceback(exc)
        error(message)
        return 1
    if debug:
        _traceback(exc)
    error(f"internal error: {_one_line(exc)} (run with --debug for details)")
    return 1


def _user_message(exc: BaseException) -> str | None:
    """The one-line message of an error the user can act on, or None for a bug."""
    message = getattr(exc, "message", None)
    if not isinstance(message, str):
        return None
    for module, name in (
        ("contree_shell.client.errors", "ContreeError"),
        ("contree_shell.state.errors", "StateError"),
        ("contree_shell.config", "ConfigError"),
    ):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return message
    return None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _traceback(exc: BaseException) -> None:
    from contree_shell.output import write_stderr

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    write_stderr(text.encode(errors="replace"))


def silence_stdout() -> None:
    """After EPIPE, point stdout at /dev/null so the interpreter's final flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _guarded(fn: Callable[[], int], debug: bool) -> int:
    from contree_shell.output import StdoutClosed

    try:
        return fn()
    except StdoutClosed:  # `contree … | head`: output already silenced
        return EXIT_BROKEN_PIPE
    except (Exception, KeyboardInterrupt) as exc:  # the one place errors become exits
        return _report(exc, debug)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `contree` with `argv` (default: the process arguments); return the exit code."""
    from contree_shell.output import write_stdout

    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["__complete"]:
        # Tab in bash/zsh/fish: never parsed as a command, never shown in help.
        from contree_shell.cli import completion

        return completion.complete_main(args_list[1:])
    parser = build_parser(shell_only=command_word(args_list) in ("shell", "sh"))
    if not args_list:
        write_stdout(parser.format_help().encode())
        return 0
    args = parser.parse_args(args_list)
    debug = bool(args.debug)
    if args.version:
        write_stdout((version_string() + "\n").encode())
        return 0
    if args.command is None:
        write_stdout(parser.format_help().encode())
        return 0
    func = getattr(args, "func", None)
    if getattr(args, "handler", None) is None and callable(func):
        # Commands registered by other packages (`server`) take only the namespace.
        return _guarded(lambda: int(func(args) or 0), debug)

    def call() -> int:
        ctx = make_context(
            profile=args.profile, session=args.session, output_format=args.output_format,
            debug=debug, token=args.token, url=args.url, project=args.project,
        )
        return _dispatch(ctx, args)

    code = _guarded(call, debug)
    _flush_quietly()
    return code


def _flush_quietly() -> None:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        silence_stdout()
    except (OSError, ValueError):
        pass


_shell_parser: argparse.ArgumentParser | None = None


def shell_parser() -> argparse.ArgumentParser:
    """The shell's parser tree, built once per process (completion walks it too)."""
    global _shell_parser
    if _shell_parser is None:
        _shell_parser = build_parser(for_shell=True)
    return _shell_parser


def execute(ctx: Context, argv: Sequence[str]) -> int:
    """Run one `contree …` command line (without the word `contree`) inside the shell.

    Never raises for user errors and never exits: usage errors print the usage and
    `error: …` on stderr (exit 2), `--help` prints the help (exit 0), command errors
    print `[ERROR] …` (exit 1), Ctrl-C gives 130. Global options before the command
    (`-o json`, `-S KEY`, `-p NAME`) apply to this one command only, except that a
    session switched by `use -N` stays switched.
    """
    from contree_shell.output import write_stderr, write_stdout

    parser = shell_parser()
    try:
        args = parser.parse_args(list(argv))
    except CliHelp as help_:
        write_stdout(help_.text.encode())
        return 0
    except CliUsageError as exc:
        write_stderr(f"{exc.usage}contree: error: {exc.message}\n".encode())
        return 2
    debug = ctx.debug or bool(args.debug)
    if args.version:
        write_stdout((version_string() + "\n").encode())
        return 0
    if args.command is None:
        write_stdout(parser.format_help().encode())
        return 0
    func = getattr(args, "func", None)
    if getattr(args, "handler", None) is None and callable(func):
        return _guarded(lambda: int(func(args) or 0), debug)

    def call() -> int:
        local = ctx
        if args.profile or args.token or args.url or args.project:
            fresh = make_context(
                profile=args.profile or ctx.profile.name, session=args.session or ctx.session_key,
                output_format=args.output_format or ctx.output_format, in_shell=True,
                debug=debug, token=args.token, url=args.url, project=args.project,
            )
            local = fresh
        elif args.session or args.output_format or debug != ctx.debug:
            local = ctx.derive(
                session_key=args.session or ctx.session_key,
                output_format=args.output_format or ctx.output_format,
                debug=debug,
            )
        code = _dispatch(local, args)
        if local is not ctx and not args.session and local.session_key != ctx.session_key:
            ctx.session_key = local.session_key  # `use -N` moved the shell to a new session
        return code

    return _guarded(call, debug)
