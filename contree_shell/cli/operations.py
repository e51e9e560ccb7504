"""Operations: `ps` / `operation list`, `show`, `kill` / `operation cancel`, `operation wait`,
`operation events`.

Every `UUID_OR_REF` argument takes an operation UUID or a history reference of the
session (`HEAD`, `@3`, `@-1`, `HEAD~2`, `@+1`), see `cli.refs`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterable
from typing import Any

from contree_shell.cli.context import Context
from contree_shell.cli.errors import CliError
from contree_shell.cli.intervals import IntervalError, to_query
from contree_shell.cli.refs import resolve_operation_refs

__all__ = [
    "TERMINAL",
    "exit_code_of",
    "parse_status",
    "register",
    "result_streams",
    "wait_operations",
]

STATUS_LETTERS = {
    "P": "PENDING", "A": "ASSIGNED", "E": "EXECUTING",
    "S": "SUCCESS", "F": "FAILED", "C": "CANCELLED",
}
TERMINAL = frozenset({"SUCCESS", "FAILED", "CANCELLED"})
ACTIVE = ("PENDING", "ASSIGNED", "EXECUTING")
DEFAULT_SHOW_MAX = 1000
DEFAULT_WAIT_TIMEOUT = 60.0
PAGE = 1000
LIST_HEAD = ("uuid", "kind", "status", "created_at")
LIST_TAIL = ("error",)
SHOW_HEAD = ("uuid", "status", "exit_code", "duration", "result_image_uuid")
SHOW_TAIL = ("error", "result")
WAIT_HEAD = ("uuid", "status", "exit_code", "timed_out", "duration")


def parse_status(text: str) -> str:
    """`--status` value: a letter (P A E S F C) or a full name, any case."""
    value = text.strip().upper()
    if value in STATUS_LETTERS:
        return STATUS_LETTERS[value]
    if value in STATUS_LETTERS.values():
        return value
    raise argparse.ArgumentTypeError(
        f"invalid status '{text}' (P/A/E/S/F/C or PENDING, ASSIGNED, EXECUTING, SUCCESS, "
        "FAILED, CANCELLED)"
    )


def _refs_arg(p: argparse.ArgumentParser, nargs: str = "+") -> None:
    p.add_argument("operations", nargs=nargs, metavar="UUID_OR_REF",
                   help="operation UUID or history reference (HEAD, @N, @-N, HEAD~N, @+N)")


def register(sub: Any) -> None:
    """Add `ps`, `show`, `kill` and `operation` (alias `op`) with its subcommands."""
    ps = sub.add_parser("ps", help="list operations (default: the executing ones)")
    _list_flags(ps)
    show = sub.add_parser("show", help="show an operation and its output")
    _show_flags(show)
    kill = sub.add_parser("kill", help="cancel operations")
    _cancel_flags(kill)

    op = sub.add_parser("operation", aliases=["op"], help="operations: list, show, cancel, wait, events")
    osub = op.add_subparsers(dest="operation_command", metavar="SUBCOMMAND", required=True)
    _list_flags(osub.add_parser("list", aliases=["ls"], help="list operations"))
    _show_flags(osub.add_parser("show", aliases=["sh"], help="show an operation and its output"))
    _cancel_flags(osub.add_parser("cancel", aliases=["kill", "k"], help="cancel operations"))
    wait = osub.add_parser(
        "wait", aliases=["w"], help="wait for operations to finish",
        description="Wait until the operations end; one row per operation. Exit 1 if any "
        "did not succeed, else the first non-zero exit code. Session branches are not moved "
        "(see `contree session wait`).",
    )
    _refs_arg(wait, "*")
    wait.add_argument("-a", "--all", action="store_true", help="every active operation")
    wait.add_argument("-t", "--timeout", type=float, default=DEFAULT_WAIT_TIMEOUT,
                      help=f"seconds to wait (default {DEFAULT_WAIT_TIMEOUT:g})")
    wait.set_defaults(handler=cmd_wait)
    ev = osub.add_parser("events", aliases=["ev"], help="the recorded events of operations")
    _refs_arg(ev)
    ev.set_defaults(handler=cmd_events)


def _list_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="print UUIDs only")
    p.add_argument("-a", "--all", action="store_true", help="every status (default: EXECUTING)")
    p.add_argument("--status", type=parse_status, metavar="STATUS",
                   choices=tuple(STATUS_LETTERS.values()),  # offered by Tab completion
                   help="P/A/E/S/F/C or the full name")
    p.add_argument("-k", "--kind", choices=("image_import", "instance"))
    p.add_argument("--since", metavar="WHEN", help="600s, 15m, 2h, 3d, 1w, unix seconds or ISO date")
    p.add_argument("--until", metavar="WHEN", help="same forms as --since")
    p.add_argument("-M", "--show-max", type=int, default=DEFAULT_SHOW_MAX, metavar="N",
                   help=f"at most N operations (default {DEFAULT_SHOW_MAX})")
    p.set_defaults(handler=cmd_list)


def _show_flags(p: argparse.ArgumentParser) -> None:
    _refs_arg(p)
    p.add_argument("--raw", action="store_true", help="the API records as JSON lines")
    p.set_defaults(handler=cmd_show)


def _cancel_flags(p: argparse.ArgumentParser) -> None:
    _refs_arg(p, "*")
    p.add_argument("-a", "--all", action="store_true", help="every pending or executing operation")
    p.set_defaults(handler=cmd_cancel)


# -- list ------------------------------------------------------------------------------


def _time_args(args: argparse.Namespace) -> tuple[str | None, str | None]:
    try:
        return to_query(args.since), to_query(args.until)
    except IntervalError as exc:
        raise CliError(exc.message, 2) from None


def fetch_operations(
    client: Any, *, statuses: Iterable[str | None], kind: str | None, since: str | None,
    until: str | None, limit: int,
) -> tuple[list[dict[str, Any]], bool]:
    """Up to `limit` operations (newest first) and whether more exist."""
    rows: list[dict[str, Any]] = []
    more = False
    for status in statuses:
        offset = 0
        while True:
            want = min(PAGE, limit + 1 - len(rows))
            if want <= 0:
                more = True
                break
            page = client.list_operations(status=status, kind=kind, since=since, until=until,
                                          limit=want, offset=offset)
            rows.extend(page)
            offset += len(page)
            if len(page) < want:
                break
        if len(rows) > limit:
            more = True
            break
    if len(rows) > limit:
        rows = rows[:limit]
        more = True
    return rows, more


def cmd_list(ctx: Context, args: argparse.Namespace) -> int:
    from contree_shell.output import emit_rows, warn, write_stdout

    if args.show_max <= 0:
        raise CliError("--show-max must be a positive number", 2)
    since, until = _time_args(args)
    status = args.status or (None if args.all else "EXECUTING")
    rows, more = fetch_operations(ctx.client, statuses=[status], kind=args.kind, since=since,
                                  until=until, limit=args.show_max)
    if args.quiet:
        write_stdout("".join(f"{r.get('uuid')}\n" for r in rows).encode())
    else:
        emit_rows([_list_row(r) for r in rows], ctx.output_format, head=LIST_HEAD, tail=LIST_TAIL)
    if more:
        warn(f"Output truncated at --show-max={args.show_max} operations; "
             "more results are available (narrow with --since/--status or raise --show-max)")
    return 0


def _list_row(op: dict[str, Any]) -> dict[str, Any]:
    keys = ("uuid", "kind", "status", "created_at", "duration", "image_uuid",
            "result_image_uuid", "error")
    return {k: op.get(k) for k in keys}


# -- show ------------------------------------------------------------------------------


def result_streams(op: dict[str, Any]) -> tuple[bytes, bytes]:
    """The decoded stdout and stderr kept in an instance operation's result."""
    from contree_shell.client.streams import decode_stream

    result = (op.get("metadata") or {}).get("result") or {}
    out = []
    for name in ("stdout", "stderr"):
        value = result.get(name) if isinstance(result, dict) else None
        try:
            out.append(decode_stream(value) if isinstance(value, dict) else b"")
        except Exception:  # a malformed record shows as empty output, not a crash
            out.append(b"")
    return out[0], out[1]


def exit_code_of(op: dict[str, Any]) -> int | None:
    """The sandbox exit code of spid 1, when the record has one."""
    result = (op.get("metadata") or {}).get("result") or {}
    state = result.get("state") if isinstance(result, dict) else None
    code = state.get("exit_code") if isinstance(state, dict) else None
    return code if isinstance(code, int) else None


def timed_out_of(op: dict[str, Any]) -> bool:
    result = (op.get("metadata") or {}).get("result") or {}
    state = result.get("state") if isinstance(result, dict) else None
    return bool(state.get("timed_out")) if isinstance(state, dict) else False


def _show_row(op: dict[str, Any], *, decoded: bool) -> dict[str, Any]:
    row = {
        "uuid": op.get("uuid"), "status": op.get("status"), "exit_code": exit_code_of(op),
        "duration": op.get("duration"), "result_image_uuid": op.get("result_image_uuid"),
        "kind": op.get("kind"), "created_at": op.get("created_at"),
        "image_uuid": op.get("image_uuid"), "error": op.get("error") or "",
    }
    res = op.get("result")
    row["result"] = json.dumps(res, sort_keys=True) if isinstance(res, dict) else (res or "")
    if decoded:
        out, err = result_streams(op)
        row["stdout"] = out.decode("utf-8", "replace")
        row["stderr"] = err.decode("utf-8", "replace")
    return row


def cmd_show(ctx: Context, args: argparse.Namespace) -> int:
    from contree_shell.output import emit_rows, write_stderr, write_stdout

    ops = resolve_operation_refs(ctx, args.operations)
    records = [ctx.client.get_operation(op) for op in ops]
    if args.raw:
        write_stdout("".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())
        return 0
    if ctx.structured:
        emit_rows([_show_row(r, decoded=True) for r in records], ctx.output_format,
                  head=SHOW_HEAD, tail=SHOW_TAIL)
        return 0
    for record in records:
        row = _show_row(record, decoded=False)
        brief = {k: row[k] for k in (*SHOW_HEAD, *SHOW_TAIL)}
        emit_rows([brief], ctx.output_format, head=SHOW_HEAD, tail=SHOW_TAIL)
        out, err = result_streams(record)
        if out:
            write_stdout(out if out.endswith(b"\n") else out + b"\n")
        if err:
            write_stderr(err if err.endswith(b"\n") else err + b"\n")
    return 0


# -- cancel ----------------------------------------------------------------------------


def _active_operations(client: Any) -> list[str]:
    found: list[str] = []
    for status in ACTIVE:
        offset = 0
        while True:
            page = client.list_operations(status=status, limit=100, offset=offset)
            found.extend(str(op["uuid"]) for op in page if op.get("uuid"))
            offset += len(page)
            if len(page) < 100:
                break
    return list(dict.fromkeys(found))


def _target_operations(ctx: Context, args: argparse.Namespace) -> list[str]:
    """The operations named on the command line, plus every active one with --all."""
    ops = resolve_operation_refs(ctx, args.operations)
    if args.all:
        return list(dict.fromkeys([*ops, *_active_operations(ctx.client)]))
    if not ops:
        raise CliError("Provide at least one UUID, or use --all")
    return ops


def cmd_cancel(ctx: Context, args: argparse.Namespace) -> int:
    from contree_shell.output import error, info

    ops = _target_operations(ctx, args)
    if not ops:
        info("No active operations")
        return 0
    failed = False
    for op in ops:
        try:
            ctx.client.cancel(op)
        except Exception as exc:  # carry on with the others, as the official CLI does
            message = getattr(exc, "message", None)
            if message is None:
                raise
            error(f"Cannot cancel {op}: {message}")
            failed = True
            continue
        info(f"Cancelled operation {op}")
    return 1 if failed else 0


# -- wait ------------------------------------------------------------------------------


def wait_operations(
    client: Any, ops: list[str], *, timeout: float | None,
    on_done: Callable[[dict[str, Any]], None],
    clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
) -> list[str]:
    """Poll until every op is terminal (0.5 s doubling to 5 s, bounded by `timeout`).

    `on_done(record)` runs once per finished operation, in completion order. Returns the
    operations still running when the deadline passed.
    """
    pending = list(ops)
    deadline = None if timeout is None else clock() + timeout
    delay = 0.5
    while pending:
        for op in list(pending):
            record = client.get_operation(op)
            if record.get("status") in TERMINAL:
                pending.remove(op)
                on_done(record)
        if not pending:
            break
        if deadline is not None:
            left = deadline - clock()
            if left <= 0:
                break
            sleep(min(delay, left))
        else:
            sleep(delay)
        delay = min(delay * 2, 5.0)
    return pending


def status_code(records: Iterable[dict[str, Any]]) -> int:
    """1 if any operation did not succeed, else the first non-zero sandbox exit code."""
    code = 0
    for record in records:
        if record.get("status") != "SUCCESS":
            return 1
        exit_code = exit_code_of(record)
        if exit_code and not code:
            code = exit_code
    return code


def _wait_row(record: dict[str, Any], *, timed_out: bool = False) -> dict[str, Any]:
    return {
        "uuid": record.get("uuid"), "status": record.get("status"),
        "exit_code": exit_code_of(record), "timed_out": timed_out or timed_out_of(record),
        "duration": record.get("duration"), "error": record.get("error") or "",
    }


def cmd_wait(ctx: Context, args: argparse.Namespace) -> int:
    from contree_shell.output import emit_rows, info, warn

    ops = _target_operations(ctx, args)
    if not ops:
        info("No active operations")
        return 0
    done: list[dict[str, Any]] = []

    left = wait_operations(ctx.client, ops, timeout=args.timeout, on_done=done.append)
    rows = [_wait_row(record) for record in done]
    rows += [_wait_row({"uuid": op, "status": "EXECUTING"}, timed_out=True) for op in left]
    emit_rows(rows, ctx.output_format, head=WAIT_HEAD, tail=("error",))
    if left:
        warn(f"Timeout: {len(left)} operation(s) did not finish in {args.timeout:g}s")
        return 1
    return status_code(done)


# -- events ----------------------------------------------------------------------------


def cmd_events(ctx: Context, args: argparse.Namespace) -> int:
    from contree_shell.output import emit_rows

    rows: list[dict[str, Any]] = []
    for op in resolve_operation_refs(ctx, args.operations):
        for event in ctx.client.iter_events(op, follow=False):
            data = event.get("data")
            rows.append({
                "uuid": op, "id": event.get("id"), "ts": event.get("ts"),
                "type": event.get("type"), "spid": event.get("spid"),
                "data": json.dumps(data, sort_keys=True) if isinstance(data, dict | list) else data,
            })
    emit_rows(rows, ctx.output_format, head=("uuid", "id", "ts", "type", "spid"), tail=("data",))
    return 0
