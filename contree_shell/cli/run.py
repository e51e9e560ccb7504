"""`contree run` and `run_line` (the shell's bare lines): one command in the sandbox, live.

Session policy (documented in `run --help`): a run that reaches SUCCESS appends exactly
one `run` node to the branch it started on, whatever the command's exit code, so a
failing build still records what it wrote and `contree session rollback` undoes exactly
that run. A run that failed, was cancelled or timed out leaves the session untouched; a
disposable or detached run only gets a side branch (`disposable-<op>`, `detached-<op>`).
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from dataclasses import dataclass
from typing import Any

from contree_shell.cli.context import Context
from contree_shell.cli.errors import CliError
from contree_shell.cli.paths import resolve_path

DEFAULT_TIMEOUT = 120
DEFAULT_TRUNCATE = 65536
DEFAULT_HOSTNAME = "linuxkit"
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

RUN_HELP = """\
Run a command in the sandbox of the current session, with live output.

The exit status is the command's own; 124 when it timed out, 1 when the operation
failed. A run that completes (whatever its exit status) appends one `run` entry to the
session, so `contree session rollback` undoes exactly that run; a failed, cancelled or
timed-out run leaves the session as it was. -D (disposable) and -d (detach) never move
the session. stdin is forwarded when it is a pipe or a file; a terminal is read only
with -i.
"""


def register(sub: Any) -> None:
    """Add `run` (alias `r`)."""
    p = sub.add_parser(
        "run", aliases=["r"], help="run a command in the sandbox",
        description=RUN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-s", "--shell", action="store_true",
                   help="run through `sh -c` (one argument is used verbatim)")
    p.add_argument("-e", "--env", action="append", default=[], metavar="K=V",
                   help="environment variable for this run (repeatable)")
    p.add_argument("-C", "--cwd", default="", help="working directory (default: the session cwd)")
    p.add_argument("-t", "--timeout", type=_non_negative_int, default=DEFAULT_TIMEOUT,
                   help=f"seconds before the command is killed (default {DEFAULT_TIMEOUT})")
    p.add_argument("-D", "--disposable", action="store_true",
                   help="throw the filesystem changes away (the session does not move)")
    p.add_argument("-d", "--detach", "--no-wait", action="store_true", dest="detach",
                   help="start and print the operation without waiting")
    p.add_argument("-T", "--truncate", type=_non_negative_int, default=DEFAULT_TRUNCATE,
                   help=f"bytes of each output stream kept on the server (default {DEFAULT_TRUNCATE})")
    p.add_argument("-H", "--hostname", default=DEFAULT_HOSTNAME, help="sandbox hostname")
    p.add_argument("--use", metavar="IMAGE", help="switch the session to IMAGE first")
    p.add_argument("-i", "--interactive", action="store_true",
                   help="forward stdin even when it is a terminal")
    p.add_argument("-F", "--file", action="append", default=[], dest="files", metavar="SPEC",
                   help="upload host[:/inst/path][:uUID][:gGID][:mMODE] (repeatable; "
                   "directories are walked)")
    p.add_argument("--file-excludes", action="extend", nargs="+", default=[], metavar="PAT",
                   help="skip files matching PAT when walking -F directories")
    p.add_argument("-I", "--interpreter", action="store_true",
                   help="shebang mode: the first argument is a host script run by /bin/sh "
                   "(for `#!/usr/bin/env -S contree run -I`)")
    p.add_argument("--preserve-env", action="store_true",
                   help="keep the run's environment in the result image")
    p.add_argument("command_args", nargs=argparse.REMAINDER, metavar="COMMAND [ARG...]")
    p.set_defaults(handler=cmd_run)


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def parse_env_pairs(pairs: list[str]) -> dict[str, str]:
    """`["K=V", …]` → dict; a pair without `=` or with an empty key is a user error."""
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"Invalid format '{pair}', expected KEY=VALUE")
        env[key] = value
    return env


def command_tokens(raw: list[str]) -> list[str]:
    """The REMAINDER without the leading `--` that separates it from run's own flags."""
    return raw[1:] if raw and raw[0] == "--" else list(raw)


def build_payload(
    *,
    image: str,
    tokens: list[str],
    shell: bool,
    cwd: str = "",
    env: dict[str, str] | None = None,
    timeout: int | None = DEFAULT_TIMEOUT,
    disposable: bool = False,
    hostname: str = DEFAULT_HOSTNAME,
    truncate: int = DEFAULT_TRUNCATE,
) -> dict[str, Any]:
    """The `POST /v1/instances` body for a command (official CLI rules, §3.2).

    Shell mode: one token is the expression verbatim; several are joined with shell
    quoting. Otherwise the first token is the command and the rest are `args` (sent only
    when there are any). `cwd`, `env` and `timeout` are sent only when set.
    """
    if not tokens:
        raise CliError("Specify a command to run, e.g. `contree run -- ls -l`", 2)
    payload: dict[str, Any] = {"image": image}
    if shell:
        payload["command"] = tokens[0] if len(tokens) == 1 else shlex.join(tokens)
    else:
        payload["command"] = tokens[0]
        if len(tokens) > 1:
            payload["args"] = list(tokens[1:])
    payload["shell"] = shell
    payload["disposable"] = disposable
    payload["hostname"] = hostname
    payload["truncate_output_at"] = truncate
    if timeout is not None:
        payload["timeout"] = timeout
    if cwd:
        payload["cwd"] = cwd
    if env:
        payload["env"] = dict(env)
    return payload


def run_title(tokens: list[str], shell: bool) -> str:
    """The history title of a run: what the user typed."""
    if shell and len(tokens) == 1:
        return tokens[0]
    return shlex.join(tokens)


@dataclass
class _Sink:
    """Live output and notices for one run.

    When the local reader goes away (`contree run -- yes | head`), the first EPIPE is
    turned into a Ctrl-C for the runner, which sends SIGINT to the remote command, so
    the run ends now instead of at its timeout; later output and notices are dropped.
    """

    live: bool
    broken: bool = False

    def stdout(self, chunk: bytes) -> None:
        if not self.live or self.broken:
            return
        from contree_shell.output import StdoutClosed, write_stdout

        try:
            write_stdout(chunk)
        except StdoutClosed:  # stdout already points at /dev/null
            self.broken = True
            raise KeyboardInterrupt from None

    def stderr(self, chunk: bytes) -> None:
        if not self.live:
            return
        from contree_shell.output import write_stderr

        write_stderr(chunk)

    def notice(self, message: str) -> None:
        if self.broken:
            return
        from contree_shell.output import info

        info(message)


def execute_payload(
    ctx: Context,
    payload: dict[str, Any],
    *,
    title: str,
    stdin: Any = None,
) -> tuple[int, Any]:
    """Run one payload live, record the session node by the policy above, report.

    Returns (exit status, RunOutcome). Status: the command's exit code, 124 on timeout,
    1 for a failed operation, 130 when interrupted (Ctrl-C twice).
    """
    from contree_shell.client.runner import run_operation
    from contree_shell.output import emit_rows, error, warn

    sink = _Sink(live=not ctx.structured)
    # The run belongs to the branch it started on, even if another terminal checks out
    # a different branch of this session while it runs.
    branch = ctx.require_state().branch
    outcome = run_operation(
        ctx.client, payload,
        on_stdout=sink.stdout, on_stderr=sink.stderr, on_notice=sink.notice, stdin=stdin,
    )
    record_run(ctx, outcome, title=title, disposable=bool(payload.get("disposable")),
               source_image=str(payload["image"]), branch=branch)
    if ctx.structured:
        emit_rows([outcome_row(outcome)], ctx.output_format)
    if sink.broken:
        return EXIT_BROKEN_PIPE, outcome
    if outcome.interrupted:
        return EXIT_INTERRUPTED, outcome
    if outcome.timed_out:
        limit = payload.get("timeout")
        after = f" after {limit}s" if limit else ""
        warn(f"Operation {outcome.op} timed out{after}")
        return EXIT_TIMEOUT, outcome
    if outcome.status != "SUCCESS":
        spawn_code = spawn_failure_status(outcome.error)
        shown = sink.live and _already_shown(outcome.error, outcome.stderr)
        if not shown:
            detail = f": {outcome.error}" if outcome.error else ""
            error(f"Operation {outcome.op} ended with status {outcome.status}{detail}")
        if spawn_code is not None:
            return spawn_code, outcome
        code = outcome.exit_code
        return (code if isinstance(code, int) and code > 0 else 1), outcome
    return outcome.exit_status, outcome


_SPAWN_PREFIX = "spawn failed: "


def spawn_failure_status(error: str | None) -> int | None:
    """The POSIX shell status for a command that could not be started, else None.

    The sandbox reports `exec NAME: No such file or directory` when the program is
    missing: a shell says 127 for that, and 126 when it exists but cannot be executed.
    """
    if not error or "exec " not in error:
        return None
    if "No such file or directory" in error or "not found" in error:
        return 127
    if "Permission denied" in error or "Exec format error" in error:
        return 126
    return None


def _already_shown(error: str | None, stderr: bytes) -> bool:
    """True when the sandbox's own message for a failure already reached stderr."""
    if not error:
        return False
    message = error.removeprefix(_SPAWN_PREFIX).strip()
    return bool(message) and message.encode() in stderr


def record_run(
    ctx: Context, outcome: Any, *, title: str, disposable: bool, source_image: str,
    branch: str | None = None,
) -> bool:
    """Append the `run` node when the policy says so; True when the active branch moved.

    A disposable run that completed is kept on a side branch `disposable-<op>` (the
    official CLI's convention) pointing at the source image; the active branch stays.
    """
    if outcome.interrupted or outcome.timed_out or outcome.status != "SUCCESS":
        return False
    if disposable:
        ctx.store.append(
            ctx.session_key, kind="run-disposable", image=source_image, title=title,
            operation_uuid=outcome.op, branch=f"disposable-{outcome.op}",
        )
        return False
    if not outcome.result_image:
        return False
    ctx.store.append(
        ctx.session_key, kind="run", image=outcome.result_image, title=title,
        operation_uuid=outcome.op, branch=branch,
    )
    return True


def _text(data: bytes | None) -> str:
    return (data or b"").decode("utf-8", "replace")


def outcome_row(outcome: Any) -> dict[str, Any]:
    """The one record structured formats print for a run (flat, so csv/tsv/table work)."""
    return {
        "uuid": outcome.op,
        "status": outcome.status,
        "exit_code": outcome.exit_code,
        "timed_out": outcome.timed_out,
        "duration": outcome.duration,
        "image": outcome.result_image,
        "stdout": _text(outcome.stdout),
        "stderr": _text(outcome.stderr),
        "error": outcome.error or "",
    }


def _stdin_for_cli(interactive: bool) -> Any:
    """stdin to forward for `contree run`: a pipe or file always, a terminal only with -i."""
    from contree_shell.client.stdin import stdin_for_fd

    try:
        fd = sys.stdin.fileno()
    except (AttributeError, ValueError, OSError):
        return None
    return stdin_for_fd(fd, interactive=interactive)


def _read_all_stdin() -> bytes:
    try:
        return sys.stdin.buffer.read()
    except (OSError, ValueError, AttributeError):
        return b""


def switch_image(ctx: Context, ref: str) -> str:
    """`--use IMAGE`: resolve (importing a known base image) and record a `use` node."""
    from contree_shell.cli.images import resolve_image

    image = resolve_image(ctx, ref, import_missing=True)
    ctx.store.append(ctx.session_key, kind="use", image=image, title=ref)
    return image


def interpreter_payload(script: str, extra: list[str]) -> tuple[str, list[str], bytes]:
    """`-I SCRIPT [ARGS…]`: (command, args, stdin body) with the shebang line dropped."""
    from pathlib import Path

    try:
        text = Path(script).read_bytes()
    except OSError as exc:
        raise CliError(f"Cannot read script '{script}': {exc.strerror or exc}") from None
    text = text.replace(b"\r\n", b"\n")
    if text.startswith(b"#!"):
        text = text.split(b"\n", 1)[1] if b"\n" in text else b""
    return "/bin/sh", (["-s", "--", *extra] if extra else ["-s"]), text


def collect_files(ctx: Context, specs: list[str], excludes: list[str], cwd: str) -> dict[str, Any]:
    """The spawn payload's `files`: pending staged files, then `-F` specs (which win)."""
    from contree_shell.cli.filespec import FileSpecError, expand, parse_spec
    from contree_shell.cli.uploads import open_cache, upload_all
    from contree_shell.output import info

    files: dict[str, Any] = {}
    for pending in ctx.store.pending_files(ctx.session_key):
        files[pending.path] = {"uuid": pending.file_uuid, "uid": pending.uid,
                               "gid": pending.gid, "mode": f"{pending.mode:04o}"}
    if not specs:
        return files
    try:
        mapped = [m for spec in specs for m in expand(parse_spec(spec), cwd=cwd, excludes=excludes)]
    except FileSpecError as exc:
        raise CliError(exc.message) from None
    if not mapped:
        return files
    cache = open_cache(ctx.profile.name)
    try:
        uuids, sent = upload_all(ctx.client, ctx.profile.url, [m.host for m in mapped], cache=cache)
    finally:
        if cache is not None:
            cache.close()
    import os
    from pathlib import Path

    for m in mapped:
        files[m.instance_path] = m.payload(uuids[Path(os.path.abspath(m.host))])
    if not ctx.structured:
        reused = len(uuids) - sent
        info(f"Files: {len(mapped)} mapped, {sent} uploaded, {reused} reused")
    return files


def cmd_run(ctx: Context, args: argparse.Namespace) -> int:
    from contree_shell.client.streams import stdin_repr
    from contree_shell.output import emit_rows

    tokens = command_tokens(args.command_args)
    if not tokens:
        raise CliError("Specify a command to run, e.g. `contree run -- ls -l`", 2)
    extra_env = parse_env_pairs(args.env)
    image = switch_image(ctx, args.use) if args.use else ctx.current_image()
    session_cwd = ctx.cwd()
    cwd = resolve_path(session_cwd, args.cwd) if args.cwd else session_cwd
    env = {**ctx.store.env(ctx.session_key), **extra_env}
    script_body: bytes | None = None
    shell = args.shell
    if args.interpreter:
        command, script_args, script_body = interpreter_payload(tokens[0], tokens[1:])
        title = shlex.join(tokens)
        tokens, shell = [command, *script_args], False
    payload = build_payload(
        image=image, tokens=tokens, shell=shell, cwd=cwd, env=env,
        timeout=args.timeout, disposable=args.disposable, hostname=args.hostname,
        truncate=args.truncate,
    )
    if args.preserve_env:
        payload["preserve_env"] = True
    files = collect_files(ctx, args.files, args.file_excludes, session_cwd)
    if files:
        payload["files"] = files
    if script_body is not None:
        payload["stdin"] = stdin_repr(script_body, close=True)
    else:
        title = run_title(tokens, args.shell)
    if args.detach:
        # Detached runs never wait on stdin (the official CLI hangs on a terminal here):
        # with -i the input is read to EOF first and sent with the spawn, closed.
        if args.interactive and script_body is None:
            payload["stdin"] = stdin_repr(_read_all_stdin(), close=True)
        spawned = ctx.client.spawn(payload)
        op = str(spawned.get("uuid") or "")
        if op:
            # A side branch so the run can be found (and checked out) later; the active
            # branch does not move until the user chooses to.
            prefix = "disposable" if args.disposable else "detached"
            ctx.store.append(
                ctx.session_key, kind=f"run-{prefix}", image=image, title=title,
                operation_uuid=op, branch=f"{prefix}-{op}",
            )
        emit_rows([{"uuid": spawned.get("uuid"), "status": spawned.get("status") or "PENDING",
                    "title": title}], ctx.output_format)
        return 0
    stdin = None if script_body is not None else _stdin_for_cli(args.interactive)
    code, _outcome = execute_payload(ctx, payload, title=title, stdin=stdin)
    if code == EXIT_INTERRUPTED and _outcome.interrupted:
        raise KeyboardInterrupt
    return code


def run_line(
    ctx: Context,
    command: str,
    *,
    shell: bool = True,
    args: list[str] | None = None,
    timeout: int | float | None = None,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    disposable: bool = False,
    stdin: Any = None,
) -> int:
    """Run one shell line in the sandbox, live; return its exit status (130 if interrupted).

    Used by the shell for bare lines: `command` goes to `sh -c` verbatim when `shell`,
    else it is the program and `args` its arguments. `cwd` defaults to the session cwd,
    and is omitted when the session has none so the image WORKDIR applies (unlike the
    official shell, which always sends "/"). `timeout` None means the server default.
    `stdin` is passed to the runner as is. User errors (no session, unknown image) raise
    the same exceptions as the commands; `execute`'s caller maps them.
    """
    image = ctx.current_image()
    session_cwd = ctx.cwd()
    run_cwd = resolve_path(session_cwd, cwd) if cwd else session_cwd
    merged_env = {**ctx.store.env(ctx.session_key), **(env or {})}
    tokens = [command] if shell else [command, *(args or [])]
    payload = build_payload(
        image=image, tokens=tokens, shell=shell, cwd=run_cwd, env=merged_env,
        timeout=max(1, math.ceil(timeout)) if timeout is not None else None, disposable=disposable,
    )
    files = collect_files(ctx, [], [], session_cwd)  # files staged with `vim`/`file edit`
    if files:
        payload["files"] = files
    title = command if shell else shlex.join(tokens)
    code, _ = execute_payload(ctx, payload, title=title, stdin=stdin)
    return code
