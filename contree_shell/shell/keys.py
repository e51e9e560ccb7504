"""Key bindings of the shell prompt (merged over prompt_toolkit's defaults).

Fixed: Enter continues an unfinished command, Ctrl-C clears the line. Remappable through
`[keys]` in shell.toml (see settings.KEY_ACTIONS): F4 toggles emacs/vi editing, Ctrl-X
Ctrl-E opens the line in $VISUAL/$EDITOR, Ctrl-R searches history backwards.
"""

from __future__ import annotations

import logging

from prompt_toolkit.enums import EditingMode
from prompt_toolkit.filters import has_completions, is_done, is_searching
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.keys import Keys

from contree_shell.shell.router import is_incomplete
from contree_shell.shell.settings import KEY_ACTIONS, ShellSettings

__all__ = ["create_key_bindings"]

log = logging.getLogger(__name__)


def _toggle_editing_mode(event: KeyPressEvent) -> None:
    """Switch between emacs and vi key bindings (the toolbar shows `vi` while in vi)."""
    app = event.app
    app.editing_mode = EditingMode.EMACS if app.editing_mode == EditingMode.VI else EditingMode.VI
    app.invalidate()


def _edit_in_editor(event: KeyPressEvent) -> None:
    """Edit the whole input in $VISUAL/$EDITOR; it comes back for review, not run."""
    event.current_buffer.open_in_editor(validate_and_handle=False)


def _history_search(event: KeyPressEvent) -> None:
    """Reverse incremental search through the history (Ctrl-R again: older match)."""
    from prompt_toolkit.search import SearchDirection, start_search

    start_search(direction=SearchDirection.BACKWARD)


_ACTIONS = {
    "toggle_editing_mode": _toggle_editing_mode,
    "edit_in_editor": _edit_in_editor,
    "history_search": _history_search,
}


def create_key_bindings(settings: ShellSettings | None = None) -> KeyBindings:
    """The shell's bindings; `settings.keys` remaps the actions in KEY_ACTIONS."""
    kb = KeyBindings()

    @kb.add("enter", filter=~is_done & ~is_searching & ~has_completions)
    def _enter(event: KeyPressEvent) -> None:
        """Accept the command, or start a `> ` line when a quote or `\\` is left open."""
        buffer = event.current_buffer
        if buffer.document.is_cursor_at_the_end and is_incomplete(buffer.text):
            buffer.insert_text("\n")
        else:
            buffer.validate_and_handle()

    @kb.add("enter", filter=~is_done & ~is_searching & has_completions)
    def _enter_menu(event: KeyPressEvent) -> None:
        """With the completion menu open, Enter takes the highlighted candidate."""
        buffer = event.current_buffer
        state = buffer.complete_state
        if state is not None and state.current_completion is not None:
            buffer.apply_completion(state.current_completion)
            return
        buffer.cancel_completion()
        if buffer.document.is_cursor_at_the_end and is_incomplete(buffer.text):
            buffer.insert_text("\n")
        else:
            buffer.validate_and_handle()

    @kb.add(Keys.BracketedPaste, filter=~is_done & ~is_searching)
    def _paste(event: KeyPressEvent) -> None:
        """Paste; a pasted block that ends with a newline runs at once, as in bash.

        The whole block is accepted as one input, so run_text runs it line by line and
        stops at the first failure.
        """
        data = event.data.replace("\r\n", "\n").replace("\r", "\n")
        buffer = event.current_buffer
        buffer.insert_text(data.rstrip("\n") if data.endswith("\n") else data)
        if data.endswith("\n") and buffer.document.is_cursor_at_the_end \
                and not is_incomplete(buffer.text):
            buffer.validate_and_handle()

    @kb.add("c-c", filter=~is_done & ~is_searching)
    def _clear(event: KeyPressEvent) -> None:
        """Throw away what was typed (continuation lines included) and start over."""
        event.current_buffer.reset()

    for action, handler in _ACTIONS.items():
        keys = settings.keys_for(action) if settings is not None else KEY_ACTIONS[action]
        for key in keys:
            try:
                # While searching, prompt_toolkit's own search keys apply (Ctrl-R again:
                # the next older match; Enter: take it).
                kb.add(*key.split(), filter=~is_done & ~is_searching)(handler)
            except (ValueError, KeyError):
                log.warning("shell.toml [keys]: %s: unknown key %r", action, key)
    return kb
