"""Start every prompt on a fresh line, even after output without a final newline.

`printf abc` in the sandbox leaves the cursor after "abc"; the next prompt would be
glued to it ("abc(main) / $"). The shell installs this Output (same writer, it only
remembers the last byte that reached the terminal) and asks for a newline first.
"""

from __future__ import annotations

from typing import Any

from contree_shell.output import Output, get_output

__all__ = ["LineTrackingOutput", "ensure_fresh_line"]


class LineTrackingOutput(Output):
    """An Output that knows whether the terminal's cursor sits at the start of a line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.at_line_start = True

    def _track(self, data: bytes) -> None:
        if data:
            self.at_line_start = data.endswith((b"\n", b"\r"))

    def write_stdout(self, data: bytes) -> None:
        super().write_stdout(data)
        self._track(data)

    def write_stderr(self, data: bytes) -> None:
        super().write_stderr(data)
        self._track(data)


def ensure_fresh_line() -> None:
    """Write a newline when the last output left the cursor mid-line."""
    current = get_output()
    if isinstance(current, LineTrackingOutput) and not current.at_line_start:
        current.write_stderr(b"\n")
