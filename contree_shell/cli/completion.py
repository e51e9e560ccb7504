"""Tab completion for bash, zsh and fish, driven by the interactive shell's own engine.

`contree completion bash|zsh|fish` prints a small script (also shipped in `completions/`)
that calls the hidden `contree __complete --shell SHELL [--cur WORD] -- TEXT…` on Tab.
That command feeds the text before the cursor to the REPL's completer
(`shell.completion.completer.ContreeCompleter`: the same engine and data sources), and
prints one candidate per line: the full replacement for the word at the cursor, minus
what bash treats as separate words (bash splits `tag:x` at `:`). It never starts the
local server (a stopped server simply gives no remote candidates) and never fails:
any error means no candidates.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from contree_shell.cli.context import Context

__all__ = ["HIDDEN_COMMAND", "SCRIPTS", "candidates", "complete_main", "register"]

HIDDEN_COMMAND = "__complete"
SHELLS = ("bash", "zsh", "fish")
# Shown in a normal shell although the REPL hides them (they make no sense inside it).
_TOP_LEVEL_EXTRA = ("shell",)

BASH_SCRIPT = r"""# bash completion for contree: eval "$(contree completion bash)"
# A thin wrapper: the candidates come from `contree __complete` (the shell's engine).
_contree() {
    local cur="${COMP_WORDS[COMP_CWORD]}" line
    if [[ -n "${COMP_LINE-}" ]]; then
        line="${COMP_LINE:0:${COMP_POINT:-${#COMP_LINE}}}"
    else
        line="${COMP_WORDS[*]:0:$((COMP_CWORD + 1))}"
    fi
    local IFS=$'\n'
    COMPREPLY=($(command "${COMP_WORDS[0]:-contree}" __complete --shell bash \
        --cur "$cur" -- "$line" 2>/dev/null))
    if [[ ${#COMPREPLY[@]} -eq 1 && "${COMPREPLY[0]}" == */ ]]; then
        compopt -o nospace 2>/dev/null
    fi
    return 0
}
complete -o default -F _contree contree
"""

ZSH_SCRIPT = r"""#compdef contree
# zsh completion for contree: eval "$(contree completion zsh)", or put this file
# in a directory of $fpath as `_contree`. Candidates come from `contree __complete`.
_contree() {
    local line="${(j: :)words[1,CURRENT-1]} ${PREFIX}"
    local -a found dirs others
    found=("${(@f)$(command "${words[1]:-contree}" __complete --shell zsh \
        --cur "$PREFIX" -- "$line" 2>/dev/null)}")
    local c
    for c in $found; do
        [[ -z "$c" ]] && continue
        if [[ "$c" == */ ]]; then dirs+=("$c"); else others+=("$c"); fi
    done
    (( ${#dirs} )) && compadd -Q -U -S '' -- $dirs
    (( ${#others} )) && compadd -Q -U -- $others
    return 0
}
if [[ "${zsh_eval_context[-1]-}" == loadautofunc ]]; then
    _contree "$@"
else
    compdef _contree contree
fi
"""

FISH_SCRIPT = r"""# fish completion for contree: contree completion fish | source
# (or save as ~/.config/fish/completions/contree.fish). Candidates come from
# `contree __complete`.
function __contree_complete
    set -l line (commandline -cp)
    set -l cur (commandline -ct)
    command contree __complete --shell fish --cur "$cur" -- "$line" 2>/dev/null
end
complete -c contree -f -a '(__contree_complete)'
"""

SCRIPTS = {"bash": BASH_SCRIPT, "zsh": ZSH_SCRIPT, "fish": FISH_SCRIPT}
SCRIPT_FILES = {"bash": "contree.bash", "zsh": "_contree", "fish": "contree.fish"}


def register(sub: Any) -> None:
    """Add `completion SHELL` (prints the script for bash, zsh or fish)."""
    p = sub.add_parser(
        "completion", help="print the Tab-completion script for bash, zsh or fish",
        description='Load it with `eval "$(contree completion bash)"` (bash, zsh) or '
        "`contree completion fish | source`.",
    )
    p.add_argument("shell_name", choices=SHELLS, metavar="SHELL", help="bash, zsh or fish")
    p.set_defaults(func=cmd_completion)


def cmd_completion(args: argparse.Namespace) -> int:
    from contree_shell.output import write_stdout

    write_stdout(SCRIPTS[args.shell_name].encode())
    return 0


def _context() -> Context | None:
    """A context on the caller's profile and session whose client never starts a server."""
    try:
        from contree_shell.cli.main import make_context
        from contree_shell.client.api import ContreeClient

        ctx = make_context()
        ctx.client = ContreeClient(ctx.profile, timeout=3.0)
        return ctx
    except Exception:  # no usable profile: local-only candidates (none) instead of an error
        return None


def _normalise(text: str) -> str:
    """`/path/to/contree sub…` → `contree sub…` (the engine walks lines starting `contree`)."""
    stripped = text.lstrip()
    head, sep, rest = stripped.partition(" ")
    if not sep:
        return "contree " if head and os.path.basename(head) == "contree" else f"contree {head}"
    return f"contree {rest}"


def candidates(text: str, *, shell: str = "bash", cur: str | None = None,
               ctx: Context | None = None) -> list[str]:
    """Full-word candidates for the word at the end of `text` (a `contree …` line)."""
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document

    from contree_shell.cli.main import shell_parser
    from contree_shell.shell.completion.completer import ContreeCompleter
    from contree_shell.shell.completion.engine import CommandNames, analyze, split_words
    from contree_shell.shell.completion.sources import Sources

    line = _normalise(text)
    parser = shell_parser()
    analysis = analyze(line, parser, frozenset())
    word = analysis.word
    cache = _open_cache(ctx)
    sources = Sources(ctx, cache)
    try:
        completer = ContreeCompleter(
            sources, parser=lambda: parser, builtins=dict,
            cwd=lambda: _cwd(ctx), image=lambda: _image(ctx),
        )
        out: list[str] = []
        for completion in completer.get_completions(Document(line), CompleteEvent()):
            keep = len(word.raw) + completion.start_position
            out.append(word.raw[:max(keep, 0)] + completion.text)
        for suggestion in analysis.suggestions:
            if isinstance(suggestion, CommandNames) and not suggestion.path:
                out += [n for n in _TOP_LEVEL_EXTRA
                        if n in suggestion.names and n.startswith(word.value)]
    finally:
        sources.close()
        if cache is not None:
            cache.close()
    out = list(dict.fromkeys(out))
    if shell == "fish":
        # fish quotes candidates itself: give it the plain values.
        out = [_unescape(c, split_words) for c in out]
    if cur is not None and shell == "bash" and word.raw != cur and word.raw.endswith(cur):
        # bash split the word (at `:` or `=`); it replaces only the last part.
        cut = len(word.raw) - len(cur)
        prefix = word.raw[:cut]
        out = [c[cut:] for c in out if c.startswith(prefix)]
    return sorted(out)


def _unescape(text: str, split_words: Any) -> str:
    words, current = split_words(text)
    word = current or (words[-1] if words else None)
    return word.value if word is not None else text


def _open_cache(ctx: Context | None) -> Any:
    if ctx is None:
        return None
    try:
        from contree_shell.cli.context import session_db_path
        from contree_shell.state.cache import CompletionCache

        path = session_db_path(ctx.profile.name)
        if not path.exists():
            return None
        return CompletionCache(path)
    except Exception:
        return None


def _cwd(ctx: Context | None) -> str:
    return ctx.cwd() if ctx is not None else ""


def _image(ctx: Context | None) -> str | None:
    if ctx is None:
        return None
    state = ctx.state()
    return state.tip.image if state is not None and state.tip is not None else None


def complete_main(argv: list[str]) -> int:
    """`contree __complete [--shell S] [--cur WORD] [--] TEXT…`; COMP_LINE/COMP_POINT
    are read when no TEXT is given. Prints candidates, one per line; always exits 0."""
    shell, cur = "bash", None
    rest = list(argv)
    while rest and rest[0] != "--":
        opt = rest.pop(0)
        if opt == "--shell" and rest:
            shell = rest.pop(0)
        elif opt == "--cur" and rest:
            cur = rest.pop(0)
        else:
            rest.insert(0, opt)
            break
    if rest and rest[0] == "--":
        rest.pop(0)
    if rest:
        text = " ".join(rest)
    else:
        line = os.environ.get("COMP_LINE", "")
        try:
            point = int(os.environ.get("COMP_POINT", len(line)))
        except ValueError:
            point = len(line)
        text = line[:point]
    try:
        found = candidates(text, shell=shell, cur=cur, ctx=_context())
    except Exception:  # Tab must never print a traceback into the user's shell
        return 0
    if found:
        from contree_shell.output import write_stdout

        write_stdout(("\n".join(found) + "\n").encode())
    return 0
