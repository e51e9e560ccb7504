"""A real terminal for tests: tmux runs the program, tests type keys and read the screen.

What the assertions see is the rendered screen (`capture-pane`), i.e. what a person
sees, after the terminal has interpreted every escape sequence.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping


class TerminalTimeout(AssertionError):
    """The screen never showed what the test waited for."""


class Terminal:
    """One tmux session running one command in a fixed-size window."""

    def __init__(
        self, argv: list[str], env: Mapping[str, str], *, cwd: str | None = None,
        width: int = 120, height: int = 40,
    ) -> None:
        if shutil.which("tmux") is None:
            raise RuntimeError("tmux is not installed")
        self.socket = f"contree-test-{uuid.uuid4().hex[:10]}"
        self.target = "t"
        env_args: list[str] = []
        for key, value in env.items():
            env_args += ["-e", f"{key}={value}"]
        command = " ".join(shlex.quote(a) for a in argv)
        # `remain-on-exit` keeps the final screen readable after the program exits.
        self._tmux(
            "new-session", "-d", "-s", self.target, "-x", str(width), "-y", str(height),
            *(["-c", cwd] if cwd else []), *env_args, command,
        )
        self._tmux("set-option", "-t", self.target, "remain-on-exit", "on")

    def _tmux(self, *args: str) -> str:
        result = subprocess.run(
            ["tmux", "-L", self.socket, "-f", "/dev/null", *args],
            capture_output=True, text=True, timeout=30,
        )
        if result.returncode != 0:
            raise RuntimeError(f"tmux {args[0]} failed: {result.stderr.strip()}")
        return result.stdout

    def screen(self) -> str:
        """The visible screen plus scrollback, as plain text."""
        return self._tmux("capture-pane", "-p", "-J", "-S", "-2000", "-t", self.target)

    def send(self, text: str, *, enter: bool = True) -> None:
        """Type `text` literally (then Enter)."""
        if text:
            self._tmux("send-keys", "-t", self.target, "-l", text)
        if enter:
            self._tmux("send-keys", "-t", self.target, "Enter")

    def key(self, *keys: str) -> None:
        """Press keys by tmux name, e.g. "C-c", "C-d", "Tab"."""
        self._tmux("send-keys", "-t", self.target, *keys)

    def wait_for(
        self, expected: str | re.Pattern[str] | Callable[[str], bool], *,
        timeout: float = 30.0, after: int = 0,
    ) -> str:
        """Wait until the screen (from character offset `after`) shows `expected`."""
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            tail = screen[after:]
            if callable(expected) and not isinstance(expected, re.Pattern):
                if expected(tail):
                    return screen
            elif isinstance(expected, re.Pattern):
                if expected.search(tail):
                    return screen
            elif expected in tail:
                return screen
            time.sleep(0.05)
        raise TerminalTimeout(f"screen never showed {expected!r}; screen was:\n{screen}")

    def command(
        self, line: str, expected: str | re.Pattern[str] | Callable[[str], bool], *,
        timeout: float = 30.0,
    ) -> str:
        """Type `line` at a prompt and wait for `expected` in what follows its echo.

        The echo of the typed line (`$ line`) anchors the search, so output that is
        drawn above a bottom toolbar, or an earlier run of the same line, cannot match.
        Returns the screen text from the echo on.
        """
        echo = f"$ {line}"
        before = self.screen().count(echo)
        self.send(line)

        def after_echo(screen: str) -> str | None:
            if screen.count(echo) <= before:
                return None
            return screen[screen.rfind(echo) + len(echo):]

        def matches(screen: str) -> bool:
            tail = after_echo(screen)
            if tail is None:
                return False
            if isinstance(expected, re.Pattern):
                return expected.search(tail) is not None
            if callable(expected):
                return expected(tail)
            return expected in tail

        screen = self.wait_for(matches, timeout=timeout)
        return after_echo(screen) or ""

    def mark(self) -> int:
        """An offset into the current screen text; pass it as `after=` to wait_for."""
        return len(self.screen().rstrip())

    def dead(self) -> bool:
        """True once the program has exited."""
        out = self._tmux("display-message", "-p", "-t", self.target, "#{pane_dead}")
        return out.strip() == "1"

    def close(self) -> None:
        subprocess.run(
            ["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30
        )
