"""Key bindings of the shell prompt (merged over prompt_toolkit's defaults)."""

from __future__ import annotations

from prompt_toolkit.filters import has_completions, is_done
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent

from contree_shell.shell.router import is_incomplete

__all__ = ["create_key_bindings"]


def create_key_bindings() -> KeyBindings:
    """Enter continues an unfinished command; Ctrl-C clears the line."""
    kb = KeyBindings()

    @kb.add("enter", filter=~is_done & ~has_completions)
    def _enter(event: KeyPressEvent) -> None:
        """Accept the command, or start a `> ` line when a quote or `\\` is left open."""
        buffer = event.current_buffer
        if buffer.document.is_cursor_at_the_end and is_incomplete(buffer.text):
            buffer.insert_text("\n")
        else:
            buffer.validate_and_handle()

    @kb.add("enter", filter=~is_done & has_completions)
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

    @kb.add("c-c", filter=~is_done)
    def _clear(event: KeyPressEvent) -> None:
        """Throw away what was typed (continuation lines included) and start over."""
        event.current_buffer.reset()

    return kb
