"""The interactive loop of `contree shell` (and its non-interactive twin for scripts).

read (PromptSession) → route (router.classify, pure) → run (dispatch.run_route) → refresh
the prompt and toolbar. Only `exit`/`quit`/Ctrl-D leave; everything a command raises is
one `[ERROR]` line (dispatch.py). While a command runs prompt_toolkit is not running,
so Ctrl-C reaches the runner as KeyboardInterrupt (first: SIGINT to the remote command,
second: cancel it).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterator
from typing import IO, Any

from prompt_toolkit import PromptSession
from prompt_toolkit.auto_suggest import AutoSuggestFromHistory, ThreadedAutoSuggest
from prompt_toolkit.completion import CompleteEvent, Completer, Completion, ThreadedCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.enums import EditingMode
from prompt_toolkit.filters import to_filter
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.history import History, InMemoryHistory, ThreadedHistory
from prompt_toolkit.layout.controls import BufferControl
from prompt_toolkit.lexers import DynamicLexer, Lexer

from contree_shell import output
from contree_shell.output import set_output
from contree_shell.shell import builtins, commands
from contree_shell.shell.completion.sources import Sources
from contree_shell.shell.context import ShellContext
from contree_shell.shell.dispatch import INTERRUPTED, run_route
from contree_shell.shell.fresh_line import ensure_fresh_line
from contree_shell.shell.keys import create_key_bindings
from contree_shell.shell.paging import ShellOutput
from contree_shell.shell.prompt import continuation, prompt_message
from contree_shell.shell.router import Incomplete, ParseError, classify, split_commands
from contree_shell.shell.secrets import looks_secret
from contree_shell.shell.settings import ShellSettings, ensure_config_file, load_settings
from contree_shell.shell.status import ImageLabels, Snapshot, take_snapshot
from contree_shell.shell.style import style_factory
from contree_shell.shell.toolbar import toolbar_tokens, toolbar_visible

__all__ = ["Repl", "main", "run_commands", "run_script", "run_text"]

log = logging.getLogger(__name__)

BANNER = "contree shell: lines run in the sandbox; `help` for builtins, Ctrl-D to exit"


def ensure_image(sh: ShellContext, image: str | None) -> int:
    """`contree use REF` when asked to, or when the session has no image yet."""
    if image is None and sh.image() is not None:
        return 0
    from contree_shell.cli.main import execute

    ref = image or load_settings().image
    status = int(execute(sh.ctx, ["use", ref]))
    if status != 0:
        output.warn(f"could not start from {ref}; use `contree use IMAGE` to pick one")
    return status


class _TerminalStdinFactory:
    """A fresh TerminalStdin per remote command; remembers the last one so the REPL can
    hand lines it read but never sent back to the next prompt (terminal_stdin.py)."""

    def __init__(self) -> None:
        self.last: Any = None

    def __call__(self) -> Any:
        from contree_shell.shell.terminal_stdin import TerminalStdin

        self.last = TerminalStdin(0)
        return self.last

    def take_leftover(self) -> bytes:
        source, self.last = self.last, None
        return source.leftover() if source is not None else b""


def _open_history(sh: ShellContext) -> Any:
    """The session's persistent shell history, or None when the state DB is unusable."""
    try:
        from contree_shell.cli.context import session_db_path
        from contree_shell.state.history import ShellHistory

        return ShellHistory(session_db_path(sh.ctx.profile.name), sh.key)
    except Exception as exc:
        output.warn(f"shell history is not available: {exc}")
        return None


def _prompt_history(store: Any) -> History:
    """The state's prompt_toolkit History, minus lines that carry credentials."""
    from contree_shell.state.history import PromptHistory

    class _Filtered(PromptHistory):
        def store_string(self, string: str) -> None:
            if not looks_secret(string):
                super().store_string(string)

    return _Filtered(store)


def _open_cache(sh: ShellContext) -> Any:
    try:
        from contree_shell.cli.context import session_db_path
        from contree_shell.state.cache import CompletionCache

        return CompletionCache(session_db_path(sh.ctx.profile.name))
    except Exception:
        log.debug("completion cache unavailable", exc_info=True)
        return None


def _toolbar_under_the_input(session: PromptSession[str]) -> None:
    """Keep the toolbar right under the command line instead of at the screen bottom.

    prompt_toolkit lets the input window grow over every row below the cursor, which
    pins the toolbar to the last row with blank rows above it. Not extending the input
    (it still grows with its own lines and keeps room for the completion menu) makes the
    screen read top to bottom: output, prompt, toolbar, so the transcript a person (or a
    terminal test) reads is never interleaved with padding.
    """
    for window in session.layout.find_all_windows():
        control = window.content
        if isinstance(control, BufferControl) and control.buffer is session.default_buffer:
            window.dont_extend_height = to_filter(True)


class _LazyCompleter(Completer):
    """Builds the real completer at the first Tab (on the completion thread), so its
    imports are not paid before the first prompt."""

    def __init__(self, factory: Callable[[], Completer]) -> None:
        self._factory = factory
        self._inner: Completer | None = None
        self._lock = threading.Lock()

    def get_completions(self, document: Document, complete_event: CompleteEvent
                        ) -> Iterator[Completion]:
        with self._lock:
            if self._inner is None:
                self._inner = self._factory()
        yield from self._inner.get_completions(document, complete_event)


class _ShellSession(PromptSession[str]):
    """A PromptSession whose bottom toolbar can hide itself.

    prompt_toolkit shows the toolbar whenever `bottom_toolbar` is not None, checked at
    every render, so answering None from a property hides it without rebuilding.
    """

    def __init__(self, *, toolbar_visible: Callable[[], bool], **kwargs: Any) -> None:
        self._toolbar_visible = toolbar_visible
        self._toolbar_source: Any = None
        super().__init__(**kwargs)

    @property  # type: ignore[override]
    def bottom_toolbar(self) -> Any:
        if self._toolbar_source is None or not self._toolbar_visible():
            return None
        return self._toolbar_source

    @bottom_toolbar.setter
    def bottom_toolbar(self, value: Any) -> None:
        self._toolbar_source = value


class Repl:
    """One interactive shell: the PromptSession and the loop around it."""

    def __init__(self, sh: ShellContext, *, settings: ShellSettings | None = None) -> None:
        self.sh = sh
        self.settings = settings or load_settings()
        sh.pager = self.settings.pager
        self.snapshot: Snapshot = take_snapshot(sh, ran=False)
        self.labels = ImageLabels(sh.client)
        self.sources = Sources(sh.ctx, _open_cache(sh), on_refreshed=self._redraw,
                               client=sh.client)
        history: History = InMemoryHistory()
        if sh.history is not None:
            history = ThreadedHistory(_prompt_history(sh.history))
        self._lexer: Lexer | None = None
        self.session = _ShellSession(
            toolbar_visible=self._toolbar_visible,
            message=self._message,
            bottom_toolbar=self._toolbar,
            prompt_continuation=continuation,
            history=history,
            completer=ThreadedCompleter(_LazyCompleter(self._make_completer)),
            complete_while_typing=False,
            auto_suggest=(ThreadedAutoSuggest(AutoSuggestFromHistory())
                          if self.settings.auto_suggest else None),
            lexer=DynamicLexer(lambda: self._lexer),
            style=style_factory(self.settings.style, self.settings.colors),
            include_default_pygments_style=False,
            key_bindings=create_key_bindings(self.settings),
            enable_history_search=False,
            vi_mode=self.settings.vi,
        )
        self.labels.on_change = self._redraw
        self.labels.ready.clear()
        self.session.app.after_render += self._first_frame_drawn
        _toolbar_under_the_input(self.session)

    def _make_completer(self) -> Completer:
        from contree_shell.shell.completion.completer import ContreeCompleter

        return ContreeCompleter(
            self.sources,
            parser=commands.shell_parser,
            builtins=builtins.help_map,
            cwd=self.sh.cwd,
            image=self.sh.image,
            fuzzy=self.settings.fuzzy,
        )

    def _first_frame_drawn(self, _app: Any) -> None:
        """The prompt is on screen: now connect, look up the image tag and load the
        highlighter (nothing to colour before the first key anyway)."""
        self.session.app.after_render -= self._first_frame_drawn
        self.sh.start_connecting()
        self.labels.ready.set()
        if self.settings.highlight:
            from prompt_toolkit.lexers import PygmentsLexer

            from contree_shell.shell.lexer import ContreeShellLexer

            self._lexer = PygmentsLexer(ContreeShellLexer)

    def _redraw(self) -> None:
        app = self.session.app
        if app.is_running:
            app.invalidate()

    def _message(self) -> FormattedText:
        return prompt_message(self.snapshot)

    def _toolbar_visible(self) -> bool:
        buffer = self.session.default_buffer
        return toolbar_visible(self.settings.toolbar, buffer.text,
                               buffer.complete_state is not None)

    def _toolbar(self) -> FormattedText:
        return toolbar_tokens(
            self.snapshot, self.labels.label(self.snapshot.image),
            refreshing=self.sources.refreshing,
            vi=self.session.app.editing_mode == EditingMode.VI,
        )

    def read(self) -> str:
        """One command as typed (continuation lines included). EOFError on Ctrl-D."""
        return self.session.prompt()

    def step(self) -> bool:
        """Read and run one command; False when the shell should end."""
        ensure_fresh_line()
        try:
            text = self.read()
        except EOFError:
            return False
        before = self.snapshot
        self.sh.wait_connected()
        try:
            if not run_text(self.sh, text):
                return False
        finally:
            self._keep_type_ahead()
        if self.sh.history is not None:
            self.sh.history.session_key = self.sh.key  # `use -N` moved the shell
        self.snapshot = take_snapshot(self.sh)
        self.sources.after_command(before, self.snapshot)
        return True

    def _keep_type_ahead(self) -> None:
        """Lines a finished command read but never received go to the next prompt."""
        factory = self.sh.stdin_source
        if not isinstance(factory, _TerminalStdinFactory):
            return
        data = factory.take_leftover()
        if data:
            feed_type_ahead(self.session.input, data)

    def run(self) -> int:
        """Loop until exit; return the last command's status."""
        previous = set_output(ShellOutput(pager=self.settings.pager))
        try:
            while True:
                try:
                    if not self.step():
                        break
                except KeyboardInterrupt:
                    # A Ctrl-C that landed between commands (not inside one): the shell
                    # simply comes back to a prompt.
                    output.write_stderr(b"\n")
                    self.snapshot = take_snapshot(self.sh)
        finally:
            self.sources.close()
            set_output(previous)
        return self.sh.last.status


def feed_type_ahead(inp: Any, data: bytes) -> None:
    """Queue terminal bytes as keys the next prompt reads first (a cooked-mode newline
    becomes Enter)."""
    from prompt_toolkit.input.typeahead import get_typeahead, store_typeahead
    from prompt_toolkit.input.vt100_parser import Vt100Parser

    keys: list[Any] = []
    parser = Vt100Parser(keys.append)
    parser.feed(data.decode("utf-8", "replace").replace("\n", "\r"))
    parser.flush()
    store_typeahead(inp, [*get_typeahead(inp), *keys])


def run_text(sh: ShellContext, text: str) -> bool:
    """Run every command in `text` in order. False when one of them was `exit`.

    A pasted block of several commands stops at the first one that fails, saying so
    once (`stopped at line N: exit status S`): the rest of a recipe usually depends on
    what came before, as with `set -e`.
    """
    commands_ = split_commands(text)
    if len(commands_) <= 1:
        return run_commands(sh, commands_)
    for number, command in enumerate(commands_, start=1):
        try:
            status = run_route(sh, classify(command))
        except EOFError:
            return False
        if status != 0 and number < len(commands_):
            ensure_fresh_line()
            output.warn(f"stopped at line {number}: exit status {status}")
            break
    return True


def run_commands(sh: ShellContext, commands_: list[str], *, stop_on_interrupt: bool = False
                 ) -> bool:
    """Run already split commands in order. False when one of them was `exit` (or, with
    `stop_on_interrupt`, was interrupted with Ctrl-C: a script stops there, as sh does)."""
    for command in commands_:
        try:
            status = run_route(sh, classify(command))
        except EOFError:
            return False
        if stop_on_interrupt and status == INTERRUPTED:
            return False
    return True


def run_script(sh: ShellContext, stream: IO[str]) -> int:
    """Non-interactive shell (`contree shell < script`): no prompts, run every command in
    order, exit with the last one's status. The whole script is read first, so commands
    never see the rest of it on their stdin."""
    commands_ = split_commands(stream.read())
    unterminated = bool(commands_) and isinstance(classify(commands_[-1]), Incomplete)
    if unterminated:
        commands_ = commands_[:-1]
    if run_commands(sh, commands_, stop_on_interrupt=True) and unterminated:
        run_route(sh, ParseError("Parse error: unterminated quote at end of input"))
    return sh.last.status


def main(ctx: Any, *, image: str | None = None, stdin: IO[str] | None = None) -> int:
    """`contree shell`: start from `image` (or the session's, or the default), then loop."""
    ctx.in_shell = True
    sh = ShellContext(ctx)
    stream = stdin if stdin is not None else sys.stdin
    interactive = stream.isatty() and sys.stdout.isatty()
    if interactive:
        output.info(BANNER)
    ensure_image(sh, image)
    if not interactive:
        return run_script(sh, stream)
    sh.history = _open_history(sh)
    sh.stdin_source = _TerminalStdinFactory()
    ensure_config_file()
    settings = load_settings()
    for problem in settings.problems:
        output.warn(problem)
    sh.connect_in_background()
    return Repl(sh, settings=settings).run()
