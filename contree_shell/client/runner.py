"""Run one remote command live: spawn, stream its output, forward stdin, handle Ctrl-C."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from contree_shell.client.api import ContreeClient
from contree_shell.client.errors import ApiError, ContreeError, StreamError, one_line
from contree_shell.client.stdin import CHUNK, EOF, NoStdin, StdinSource
from contree_shell.client.streams import decode_stream, stdin_repr

__all__ = ["RunOutcome", "initial_stdin", "outcome_from_operation", "run_operation"]

OutputCallback = Callable[[bytes], None]
NoticeCallback = Callable[[str], None]

# After a cancel, how long to wait for the operation to finish before giving up.
DRAIN_TIMEOUT = 5.0


@dataclass
class RunOutcome:
    """What happened to one remote command."""

    op: str
    status: str  # SUCCESS | FAILED | CANCELLED (or the last known status)
    exit_code: int | None  # None when killed by a signal or when it never ran
    timed_out: bool
    result_image: str | None
    error: str | None
    duration: float  # seconds
    stdout: bytes
    stderr: bytes
    interrupted: bool  # the user cancelled it with a second Ctrl-C
    signal: int | None = None  # signal that killed the main process

    @property
    def exit_status(self) -> int:
        """A shell-style status: the exit code, 128+signal, 124 on timeout, 130 if cancelled."""
        if self.interrupted:
            return 130
        if self.timed_out:
            return 124
        if self.exit_code is not None:
            return self.exit_code
        if self.signal:
            return 128 + self.signal
        return 0 if self.status == "SUCCESS" else 1


def _noop(_: Any) -> None:
    return None


def initial_stdin(source: StdinSource, wait: float) -> tuple[dict[str, Any], bool]:
    """The spawn payload's `stdin` and whether more input must be forwarded later."""
    item = source.get(wait)
    if item is EOF:
        return stdin_repr(b"", close=True), False
    if item is None:
        return stdin_repr(b"", close=False), True
    assert isinstance(item, bytes)
    data = bytearray(item)
    while len(data) < CHUNK:
        more = source.get(0)
        if more is None:
            break
        if more is EOF:
            return stdin_repr(bytes(data), close=True), False
        assert isinstance(more, bytes)
        data += more
    return stdin_repr(bytes(data), close=False), True


class _StdinForwarder:
    """Posts later stdin chunks to spid 1, ending with close=true at local EOF."""

    def __init__(
        self, client: ContreeClient, op: str, source: StdinSource, on_notice: NoticeCallback
    ) -> None:
        self.client = client
        self.op = op
        self.source = source
        self.on_notice = on_notice
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stdin-forwarder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.source.stop()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)

    def _write(self, data: bytes, close: bool) -> None:
        self.client.write_stdin(self.op, 1, data, close)

    def _run(self) -> None:
        pending: bytes | object | None = None
        try:
            while not self._stop.is_set():
                item = pending if pending is not None else self.source.get(0.1)
                pending = None
                if item is None:
                    continue
                if item is EOF:
                    self._write(b"", True)
                    return
                assert isinstance(item, bytes)
                following = self.source.get(0)
                if following is EOF:  # send the last chunk and EOF in one request
                    self._write(item, True)
                    return
                self._write(item, False)
                pending = following
        except ApiError as exc:
            if exc.status in (404, 409, 410):
                return  # the process ended or closed its stdin: nothing left to feed
            self.on_notice(f"stdin forwarding failed, remaining input was not sent: {exc.message}")
        except ContreeError as exc:
            if not self._stop.is_set():
                self.on_notice(
                    f"stdin forwarding failed, remaining input was not sent: {exc.message}"
                )


class _Follow:
    """Event handling state for one run."""

    def __init__(
        self,
        client: ContreeClient,
        op: str,
        *,
        on_stdout: OutputCallback,
        on_stderr: OutputCallback,
        on_notice: NoticeCallback,
        forwarder: _StdinForwarder | None,
    ) -> None:
        self.client = client
        self.op = op
        self.on_stdout = on_stdout
        self.on_stderr = on_stderr
        self.on_notice = on_notice
        self.forwarder = forwarder
        self.forwarding = False
        self.last_id: int | None = None
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.exit: dict[str, Any] | None = None
        self.completion: dict[str, Any] | None = None

    def handle(self, event: dict[str, Any]) -> None:
        etype = event.get("type")
        data = event.get("data") or {}
        spid = event.get("spid")
        if spid == 1 and self.forwarder is not None and not self.forwarding:
            # Writing stdin before the process exists would 404: start on its first event.
            self.forwarding = True
            self.forwarder.start()
        if etype in ("stdout", "stderr"):
            chunk = decode_stream(data)
            (self.stdout if etype == "stdout" else self.stderr).extend(chunk)
            # The id is advanced before the callback: if the callback raises
            # KeyboardInterrupt, this chunk counts as shown and is not resent.
            self.last_id = event["id"]
            if chunk:
                (self.on_stdout if etype == "stdout" else self.on_stderr)(chunk)
            return
        self.last_id = event["id"]
        if etype == "exit" and spid == 1:
            self.exit = data
            if self.forwarder is not None:
                # The process is gone and its stdin takes nothing more; stopping now lets
                # the source keep what was typed since (the shell's next prompt gets it).
                self.forwarder.stop()
        elif etype == "completion":
            self.completion = data

    def follow(self, *, follow: bool = True) -> None:
        """Read events from the last id until completion (or the end of a non-follow read)."""
        with contextlib.closing(
            self.client.iter_events(self.op, follow=follow, since=self.last_id)
        ) as events:
            for event in events:
                self.handle(event)
                if self.completion is not None:
                    return

    def stop_stdin(self) -> None:
        if self.forwarder is not None:
            self.forwarder.stop()

    def outcome(self, *, interrupted: bool, record: dict[str, Any] | None = None) -> RunOutcome:
        if self.completion is None and record is not None:
            base = outcome_from_operation(record)
            base.stdout, base.stderr, base.interrupted = bytes(self.stdout), bytes(self.stderr), interrupted
            if self.exit is not None:
                _apply_exit(base, self.exit)
            return base
        completion = self.completion or {}
        outcome = RunOutcome(
            op=self.op,
            status=str(completion.get("status") or ("CANCELLED" if interrupted else "UNKNOWN")),
            exit_code=None,
            timed_out=False,
            result_image=completion.get("result_image_uuid"),
            error=completion.get("error"),
            duration=float(completion.get("duration_ms") or 0) / 1000.0,
            stdout=bytes(self.stdout),
            stderr=bytes(self.stderr),
            interrupted=interrupted,
        )
        if self.exit is not None:
            _apply_exit(outcome, self.exit)
        return outcome


def _apply_exit(outcome: RunOutcome, exit_data: dict[str, Any]) -> None:
    code = exit_data.get("code")
    sig = exit_data.get("signal")
    outcome.signal = sig if isinstance(sig, int) and sig > 0 else None
    outcome.exit_code = code if isinstance(code, int) and code >= 0 and outcome.signal is None else None
    outcome.timed_out = bool(exit_data.get("timed_out"))


def outcome_from_operation(record: dict[str, Any]) -> RunOutcome:
    """A RunOutcome from a `GET /v1/operations/{id}` record (when no completion was seen)."""
    metadata = record.get("metadata") or {}
    result = metadata.get("result") or {}
    state = result.get("state") or {}
    code = state.get("exit_code")
    sig = state.get("signal")
    signal = sig if isinstance(sig, int) and sig > 0 else None
    return RunOutcome(
        op=str(record.get("uuid", "")),
        status=str(record.get("status") or "UNKNOWN"),
        exit_code=code if isinstance(code, int) and code >= 0 and signal is None else None,
        timed_out=bool(state.get("timed_out")),
        result_image=record.get("result_image_uuid"),
        error=record.get("error"),
        duration=float(record.get("duration") or 0.0),
        stdout=decode_stream(result["stdout"]) if isinstance(result.get("stdout"), dict) else b"",
        stderr=decode_stream(result["stderr"]) if isinstance(result.get("stderr"), dict) else b"",
        interrupted=False,
        signal=signal,
    )


def run_operation(
    client: ContreeClient,
    payload: dict[str, Any],
    *,
    on_stdout: OutputCallback | None = None,
    on_stderr: OutputCallback | None = None,
    on_notice: NoticeCallback | None = None,
    stdin: StdinSource | None = None,
    drain_timeout: float = DRAIN_TIMEOUT,
) -> RunOutcome:
    """Spawn `payload` (`InstanceSpawnRequest`) and follow it live until it completes.

    Output chunks go to `on_stdout`/`on_stderr` as they arrive (and are collected).
    `stdin` defaults to closed stdin unless the payload already carries one.
    The first KeyboardInterrupt while following sends SIGINT to the command and keeps
    following from the last event; the second cancels the operation and returns with
    `interrupted=True` once it has ended (or after `drain_timeout` seconds).
    """
    notice = on_notice or _noop
    payload = dict(payload)
    source: StdinSource | None = stdin
    if source is None and "stdin" not in payload:
        source = NoStdin()
    forward = False
    if source is not None:
        source.start()
        try:
            payload["stdin"], forward = initial_stdin(source, source.initial_wait)
        except BaseException:
            source.stop()
            raise
    try:
        op = str(client.spawn(payload)["uuid"])
    except BaseException:
        if source is not None:
            source.stop()
        raise
    if source is not None and not forward:
        source.stop()
    forwarder = _StdinForwarder(client, op, source, notice) if (source is not None and forward) else None
    run = _Follow(
        client, op, on_stdout=on_stdout or _noop, on_stderr=on_stderr or _noop,
        on_notice=notice, forwarder=forwarder,
    )
    try:
        return _follow_with_interrupts(run, notice, drain_timeout)
    finally:
        run.stop_stdin()


def _follow_with_interrupts(run: _Follow, notice: NoticeCallback, drain_timeout: float) -> RunOutcome:
    interrupts = 0
    while run.completion is None:
        try:
            run.follow()
            break
        except StreamError:
            break  # no completion in the log: fall back to the operation record below
        except KeyboardInterrupt:
            interrupts += 1
            if interrupts == 1 and _send_sigint(run):
                notice(f"Sent SIGINT to operation {run.op}; Ctrl-C again to cancel it")
                continue
            _cancel_and_drain(run, notice, drain_timeout)
            return run.outcome(interrupted=True)
    if run.completion is not None:
        return run.outcome(interrupted=False)
    return run.outcome(interrupted=False, record=run.client.get_operation(run.op))


def _send_sigint(run: _Follow) -> bool:
    """SIGINT to the main process; False means the caller should cancel instead."""
    try:
        run.client.signal(run.op, 1, "INT")
    except KeyboardInterrupt:
        return False  # pressed again while sending: cancel
    except ContreeError:
        return False
    return True


def _cancel_and_drain(run: _Follow, notice: NoticeCallback, drain_timeout: float) -> None:
    """Cancel the operation, then collect the events up to completion, briefly."""
    try:
        try:
            run.client.cancel(run.op)
        except ApiError as exc:
            if exc.status != 409:  # 409: it already ended, which is what we wanted
                notice(f"Could not cancel operation {run.op}: {exc.message}")
                return
        except ContreeError as exc:
            notice(f"Could not cancel operation {run.op}: {one_line(exc.message)}")
            return
        notice(f"Cancelled operation {run.op}")
        deadline = time.monotonic() + drain_timeout
        while not run.client.is_terminal(run.op):
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)  # bounded poll: a cancelled run ends within moments
        run.follow(follow=False)
    except (ContreeError, KeyboardInterrupt):
        return
