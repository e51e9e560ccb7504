"""The shell's local builtins: one registry, `help` generated from it.

Each handler takes the ShellContext and the router's `Builtin` and returns an exit
status. User mistakes return non-zero with a one-line message; they never raise
(except `exit`, which raises EOFError so the loop has exactly one exit path).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from contree_shell import output
from contree_shell.cli.paths import display_cwd, resolve_path
from contree_shell.shell import commands
from contree_shell.shell.context import ShellContext
from contree_shell.shell.router import Builtin, parse_duration

__all__ = ["BuiltinSpec", "all_names", "builtin", "help_map", "lookup", "registry", "run_builtin"]

Handler = Callable[[ShellContext, Builtin], int]


@dataclass(frozen=True)
class BuiltinSpec:
    """One builtin: its name, one-line help, usage and aliases."""

    name: str
    help: str
    usage: str
    aliases: tuple[str, ...]
    handler: Handler


_REGISTRY: dict[str, BuiltinSpec] = {}
_ALIASES: dict[str, str] = {}


def builtin(
    name: str, help: str, *, usage: str | None = None, aliases: tuple[str, ...] = ()
) -> Callable[[Handler], Handler]:
    """Register a builtin handler under `name` (and `aliases`)."""

    def register(handler: Handler) -> Handler:
        _REGISTRY[name] = BuiltinSpec(name, help, usage or name, aliases, handler)
        for alias in aliases:
            _ALIASES[alias] = name
        return handler

    return register


def registry() -> list[BuiltinSpec]:
    """Every builtin, in registration order."""
    return list(_REGISTRY.values())


def all_names() -> list[str]:
    """Builtin names and aliases (what the first word of a line may be)."""
    return [*_REGISTRY, *_ALIASES]


def help_map() -> dict[str, str]:
    """Every name and alias → its one-line help (completion metadata)."""
    out = {spec.name: spec.help for spec in _REGISTRY.values()}
    out.update({alias: _REGISTRY[name].help for alias, name in _ALIASES.items()})
    return out


def lookup(name: str) -> BuiltinSpec | None:
    """The builtin registered as `name` or as one of its aliases."""
    return _REGISTRY.get(_ALIASES.get(name, name))


def run_builtin(sh: ShellContext, call: Builtin) -> int:
    """Run one builtin line."""
    spec = lookup(call.name)
    if spec is None:  # the router and the registry disagree: a bug, said plainly
        output.error(f"unknown builtin {call.name!r}")
        return 2
    return spec.handler(sh, call)


# -- navigation ------------------------------------------------------------------------


@builtin("cd", "change the working directory in the sandbox (no arg: the image default)",
         usage="cd [PATH|-]")
def _cd(sh: ShellContext, call: Builtin) -> int:
    from contree_shell.cli.navigate import change_directory

    if len(call.args) > 1:
        output.error("cd: too many arguments")
        return 1
    current = sh.cwd()
    if not call.args:
        # Back to the image's own WORKDIR ("" = no cwd sent), as the official shell does.
        sh.ctx.store.append(sh.key, kind="cd", image=sh.ctx.current_image(), title="")
    elif call.args[0] == "-":
        output.line(display_cwd(change_directory(sh.ctx, sh.previous_cwd)))
    else:
        change_directory(sh.ctx, call.args[0])
    sh.previous_cwd = display_cwd(current)
    return 0


@builtin("pwd", "print the working directory in the sandbox")
def _pwd(sh: ShellContext, call: Builtin) -> int:
    output.line(display_cwd(sh.cwd()))
    return 0


# -- inspection without a sandbox -------------------------------------------------------


@builtin("ls", "list a sandbox directory (no run; flags or globs run the real ls)",
         usage="ls [PATH]")
def _ls(sh: ShellContext, call: Builtin) -> int:
    from contree_shell.cli.main import execute

    if _has_pending_files(sh):
        return _in_sandbox(sh, call)
    path = resolve_path(sh.cwd(), call.args[0] if call.args else None)
    return int(execute(sh.ctx, ["ls", path]))


@builtin("cat", "print a sandbox file (no run; flags or globs run the real cat)",
         usage="cat PATH")
def _cat(sh: ShellContext, call: Builtin) -> int:
    from contree_shell.cli.main import execute

    if _has_pending_files(sh):
        return _in_sandbox(sh, call)
    return int(execute(sh.ctx, ["cat", resolve_path(sh.cwd(), call.args[0])]))


def _has_pending_files(sh: ShellContext) -> bool:
    """Files staged for the next run (`vim`, `contree file edit/cp`) exist only there, so
    `ls`/`cat` must look in a real sandbox to show them."""
    try:
        return bool(sh.ctx.store.pending_files(sh.key))
    except Exception:
        return False


def _in_sandbox(sh: ShellContext, call: Builtin) -> int:
    from contree_shell.cli.run import run_line

    line = f"{call.name} {call.raw}".strip()
    return int(run_line(sh.ctx, line, shell=True, stdin=sh.remote_stdin()))


# -- running -----------------------------------------------------------------------------


@builtin("timeout", "run CMD in the sandbox with a server-side timeout (5, 2.5s, 5m, 1h, 1d)",
         usage="timeout DURATION CMD…")
def _timeout(sh: ShellContext, call: Builtin) -> int:
    from contree_shell.cli.run import run_line

    seconds = parse_duration(call.args[0]) if call.args else None
    if seconds is None or not call.raw:
        output.error("Usage: timeout DURATION CMD…")
        return 2
    return int(run_line(sh.ctx, call.raw, shell=True, timeout=seconds, stdin=sh.remote_stdin()))


# -- editing and output ------------------------------------------------------------------

EDITORS = ("vim", "vi", "nvim", "nano")


@builtin("vim", "edit a sandbox file in your local editor; staged for the next run",
         usage="vim PATH", aliases=("vi", "nvim", "nano"))
def _edit(sh: ShellContext, call: Builtin) -> int:
    # `contree file edit` downloads the file, runs the editor here (the sandbox has no
    # terminal for a full-screen program) and stages the result for the next command.
    from contree_shell.cli.main import execute

    if len(call.args) != 1:
        output.error(f"Usage: {call.name} PATH")
        return 2
    if commands.find_command(["file", "edit"]) is None:
        output.error(f"{call.name}: `contree file edit` is not available in this build")
        return 1
    path = resolve_path(sh.cwd(), call.args[0])
    return int(execute(sh.ctx, ["file", "edit", "--editor", call.name, path]))


@builtin("--format", "set the output format of every command in this shell (no arg: show it)",
         usage="-o/--format [NAME]", aliases=("-o", "--output"))
def _format(sh: ShellContext, call: Builtin) -> int:
    from contree_shell.output import FORMATS

    if not call.args:
        output.line(sh.ctx.output_format)
        return 0
    if len(call.args) > 1:
        output.error(f"Usage: {call.name} [NAME]")
        return 2
    name = call.args[0]
    if name not in FORMATS:
        output.error(f"Unknown format '{name}'. Available: {', '.join(FORMATS)}")
        return 2
    sh.ctx.output_format = name
    return 0


# -- the shell itself ----------------------------------------------------------------------


@builtin("history", "show this session's command history (PATTERN: substring filter)",
         usage="history [PATTERN]")
def _history(sh: ShellContext, call: Builtin) -> int:
    lines: list[str] = list(sh.history.lines()) if sh.history is not None else []
    pattern = " ".join(call.args)
    numbered = list(enumerate(lines, start=1))
    if pattern:
        numbered = [(n, line) for n, line in numbered if pattern.lower() in line.lower()]
    if not lines:
        output.line("(no history)")
    elif not numbered:
        output.line(f"(no matches for {pattern!r})")
    else:
        output.line("\n".join(f"{n:5d}  {line}" for n, line in numbered))
    return 0


@builtin("clear", "clear the screen")
def _clear(sh: ShellContext, call: Builtin) -> int:
    import sys

    # Screen control belongs to prompt_toolkit (it knows the terminal); in a script
    # there is no screen to clear.
    if sys.stdout.isatty():
        from prompt_toolkit.shortcuts import clear

        clear()
    return 0


@builtin("help", "show this help, or the help of a builtin or a contree command",
         usage="help [TOPIC]")
def _help(sh: ShellContext, call: Builtin) -> int:
    topic = [w for w in call.args if w != "contree"]
    if not topic:
        output.line(general_help())
        return 0
    spec = lookup(topic[0])
    if spec is not None and len(topic) == 1:
        aliases = f" (alias: {', '.join(spec.aliases)})" if spec.aliases else ""
        output.line(f"{spec.usage}\n    {spec.help}{aliases}")
        return 0
    parser = commands.find_command(topic)
    if parser is None:
        output.error(f"help: no builtin or contree command {' '.join(topic)!r}")
        return 1
    output.line(parser.format_help().rstrip("\n"))
    return 0


@builtin("exit", "leave the shell (also `quit`, Ctrl-D); N: the shell's exit status",
         usage="exit [N]", aliases=("quit",))
def _exit(sh: ShellContext, call: Builtin) -> int:
    if call.args:
        try:
            sh.last.status = int(call.args[0]) & 0xFF
        except ValueError:
            output.error(f"exit: {call.args[0]}: numeric argument required")
            return 2
    raise EOFError


def _settings_path() -> str:
    try:
        from contree_shell.shell.settings import config_path

        return str(config_path())
    except Exception:
        return "shell.toml in the contree config directory"


def general_help() -> str:
    """The shell's help text, generated from the registry and the contree command tree."""
    width = max(len(spec.usage) for spec in _REGISTRY.values())
    rows = [f"  {spec.usage.ljust(width)}  {spec.help}" for spec in _REGISTRY.values()]
    try:
        names = ", ".join(n for n in commands.command_names(commands.shell_parser())
                          if n != "shell")
    except Exception:
        names = ""
    parts = [
        "contree shell: every line runs in the sandbox (sh -c, pipes and redirects included)",
        "unless it is a builtin or starts with `contree`.",
        "",
        "Builtins:",
        *rows,
        "",
        "contree COMMAND …  run a contree command here"
        + (f" ({names})" if names else ""),
        "help COMMAND       show a contree command's help, e.g. `help session`",
        "",
        "Keys: Tab completes, Ctrl-R searches history, Ctrl-C clears the line or interrupts",
        "the running command (twice cancels it), Ctrl-D leaves, F4 toggles emacs/vi keys,",
        "Ctrl-X Ctrl-E edits the line in $EDITOR. `$?` is the last command's status.",
        f"Settings (editing mode, colours, pager, keys): {_settings_path()}",
    ]
    return "\n".join(parts)
