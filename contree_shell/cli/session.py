"""`session …`: the history DAG of a session, its branches, rollback and housekeeping."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from contree_shell.cli.context import Context
from contree_shell.cli.errors import CliError, NoSession

DEFAULT_SHOW_LAST = 20


def register(sub: Any) -> None:
    """Add `session` (alias `s`) and its subcommands."""
    p = sub.add_parser(
        "session", aliases=["s"], help="sessions, branches and history",
        description="Without a subcommand, show the current session.",
    )
    p.set_defaults(handler=cmd_session)
    ssub = p.add_subparsers(dest="session_command", metavar="SUBCOMMAND")

    ls = ssub.add_parser("list", aliases=["ls"], help="list sessions of this profile")
    ls.add_argument("--filter", metavar="TEXT", help="only keys containing TEXT")
    ls.set_defaults(handler=cmd_list)

    br = ssub.add_parser(
        "branch", aliases=["br"], help="list, create or delete branches",
        description=(
            "Without NAME, list branches (* marks the active one). With NAME, create it at "
            "the tip of --from (default: the active branch); it is not checked out."
        ),
    )
    br.add_argument("name", nargs="?", metavar="NAME")
    br.add_argument("--from", dest="from_branch", metavar="BRANCH", help="source branch")
    br.add_argument("-U", "--delete", "--rm", action="store_true", dest="delete",
                    help="delete branch NAME (its history stays)")
    br.add_argument("--prune", action="store_true",
                    help="delete every inactive detached-*/disposable-* branch")
    br.set_defaults(handler=cmd_branch)

    co = ssub.add_parser("checkout", aliases=["co"], help="switch the active branch")
    co.add_argument("branch", metavar="BRANCH")
    co.set_defaults(handler=cmd_checkout)

    rb = ssub.add_parser(
        "rollback", aliases=["rb"], help="move the active branch back or forward",
        description=(
            "Move the active branch pointer: -N steps back (default -1: undo the last "
            "run, cd or use), +N forward, or N to history entry N (see `session show`). "
            "Nothing is deleted; `rollback +1` goes forward again."
        ),
    )
    rb.add_argument("target", nargs="?", default="-1", metavar="TARGET")
    rb.set_defaults(handler=cmd_rollback)

    show = ssub.add_parser(
        "show", help="show the history entries of a session",
        description="History entries of the session (every branch), oldest first.",
    )
    show.add_argument("key", nargs="?", metavar="KEY", help="another session (key or suffix)")
    show.add_argument("-a", "--all", action="store_true", help="every entry, not only the last")
    show.add_argument("-k", "--kind", help="only this kind (prefix: run matches run-detached)")
    show.add_argument("-l", "--last", type=int, default=DEFAULT_SHOW_LAST, metavar="N",
                      help=f"the last N entries (default {DEFAULT_SHOW_LAST})")
    show.set_defaults(handler=cmd_show)

    use = ssub.add_parser(
        "use", help="continue from another session's current image",
        description="Record the tip image of session KEY (exact key, else a unique key "
        "ending in KEY) as a `session use` entry of the current session.",
    )
    use.add_argument("key", metavar="KEY", help="session key or its unique suffix")
    use.set_defaults(handler=cmd_use)

    wait = ssub.add_parser(
        "wait", help="wait for detached runs and move the session like `run` does",
        description="Without arguments, wait for every detached run of this session "
        "(its detached-<op> branches). A run that completes moves the active branch to "
        "its result (whatever its exit code, as `run` does) and its detached branch is "
        "removed; a failed or cancelled one leaves the session as it was. Operations "
        "that are not detached runs of this session are only waited for.",
    )
    wait.add_argument("operations", nargs="*", metavar="UUID_OR_REF")
    wait.add_argument("-t", "--timeout", type=float, default=None, metavar="SECONDS",
                      help="give up after SECONDS (default: wait as long as it takes)")
    wait.set_defaults(handler=cmd_wait)

    delete = ssub.add_parser("delete", aliases=["rm", "del"], help="delete sessions")
    delete.add_argument("keys", nargs="+", metavar="KEY")
    delete.add_argument("-f", "-y", "--force", action="store_true", dest="force",
                        help="do not ask for confirmation")
    delete.set_defaults(handler=cmd_delete)


def current_row(ctx: Context, *, detail: bool = True) -> dict[str, Any]:
    """The one-row view of the current session.

    `detail=False` is the official `use` row: no cwd or depth, and the time of the tip
    rather than of the session's last change.
    """
    state = ctx.require_state()
    tip = state.tip
    assert tip is not None
    row: dict[str, Any] = {
        "session_key": state.key,
        "active_branch": state.branch,
        "current_image": tip.image,
    }
    if detail:
        row.update(cwd=state.cwd or "/", depth=state.depth)
    row.update(last_kind=tip.kind, last_title=tip.title)
    row["updated_at"] = (state.updated_at or tip.created_at) if detail else tip.created_at
    return row


def cmd_session(ctx: Context, args: argparse.Namespace) -> int:
    from contree_shell.output import emit_rows

    emit_rows([current_row(ctx)], ctx.output_format)
    return 0


def cmd_list(ctx: Context, args: argparse.Namespace) -> int:
    from contree_shell.output import emit_rows, info

    rows = [
        {
            "active": state.key == ctx.session_key,
            "session_key": state.key,
            "active_branch": state.branch,
            "current_image": state.image or "",
            "updated_at": state.updated_at,
        }
        for state in ctx.store.sessions(args.filter)
    ]
    if not rows and not ctx.structured:
        info("No sessions." if not args.filter else f"No sessions matching '{args.filter}'.")
        return 0
    emit_rows(rows, ctx.output_format)
    return 0


def cmd_branch(ctx: Context, args: argparse.Namespace) -> int:
    from contree_shell.output import emit_rows, info, write_stdout

    key = ctx.session_key
    if args.prune:
        ctx.require_state()
        pruned = ctx.store.prune_branches(key)
        info(f"Pruned {len(pruned)} branch(es)" + (f": {', '.join(pruned)}" if pruned else ""))
        return 0
    if args.delete:
        if not args.name:
            raise CliError("Specify the branch to delete", 2)
        ctx.require_state()
        ctx.store.delete_branch(key, args.name)
        info(f"Deleted branch {args.name}")
        return 0
    if args.name:
        ctx.require_state()
        node = ctx.store.create_branch(key, args.name, from_branch=args.from_branch)
        info(f"Created branch {args.name} at entry {node.id} ({node.image})")
        return 0
    ctx.require_state()
    branches = ctx.store.branches(key)
    if ctx.structured:
        emit_rows([
            {"branch": name, "image": tip.image, "history_id": tip.id, "active": active}
            for name, tip, active in branches
        ], ctx.output_format)
        return 0
    width = max((len(name) for name, _, _ in branches), default=0)
    lines = [
        f"{'*' if active else ' '} {name.ljust(width)}  {tip.image}  {tip.kind}: {tip.title}"
        for name, tip, active in branches
    ]
    write_stdout(("\n".join(lines) + "\n").encode() if lines else b"")
    return 0


def cmd_checkout(ctx: Context, args: argparse.Namespace) -> int:
    from contree_shell.output import emit_rows

    ctx.require_state()
    tip = ctx.store.checkout(ctx.session_key, args.branch)
    emit_rows([{"branch": args.branch, "image": tip.image}], ctx.output_format)
    return 0


def cmd_rollback(ctx: Context, args: argparse.Namespace) -> int:
    from contree_shell.output import emit_rows

    ctx.require_state()
    node = ctx.store.rollback(ctx.session_key, args.target)
    emit_rows([{
        "id": node.id, "image": node.image, "kind": node.kind, "title": node.title,
        "created_at": node.created_at,
    }], ctx.output_format)
    return 0


def cmd_show(ctx: Context, args: argparse.Namespace) -> int:
    from contree_shell.output import emit_rows, info

    store = ctx.store
    key = store.find_session(args.key) if args.key else ctx.session_key
    if store.state(key) is None:
        raise NoSession()
    if args.last is not None and args.last <= 0 and not args.all:
        raise CliError("--last must be a positive number", 2)
    nodes = store.history(key, last=args.last, kind=args.kind, all=args.all)
    labels = store.branch_labels(key)
    rows = []
    for node in nodes:
        row = node.as_row()
        row.pop("session_key", None)
        row["branches"] = ",".join(labels.get(node.id, []))
        rows.append(row)
    emit_rows(rows, ctx.output_format)
    total = store.history_count(key, kind=args.kind)
    if not args.all and total > len(nodes):
        info(f"Showing last {len(nodes)} of {total} entries; use -a to see all")
    return 0


def _confirm(question: str) -> bool:
    from contree_shell.output import write_stderr

    if not sys.stdin or not sys.stdin.isatty():
        return False
    write_stderr(f"{question} [y/N] ".encode())
    answer = sys.stdin.readline().strip().lower()
    return answer in ("y", "yes")


def cmd_delete(ctx: Context, args: argparse.Namespace) -> int:
    from contree_shell.output import info, warn

    failed = False
    for ref in args.keys:
        try:
            key = ctx.store.find_session(ref)
        except Exception as exc:  # StateError: not found / ambiguous; report and go on
            message = getattr(exc, "message", None)
            if message is None:
                raise
            warn(message)
            failed = True
            continue
        if not args.force and not _confirm(f"Delete session {key}?"):
            if not sys.stdin or not sys.stdin.isatty():
                raise CliError(f"Not deleting {key} without confirmation; use -f")
            info(f"Kept session {key}")
            continue
        ctx.store.delete(key)
        info(f"Deleted session {key}")
    return 1 if failed else 0


def cmd_use(ctx: Context, args: argparse.Namespace) -> int:
    from contree_shell.output import emit_rows

    other = ctx.store.find_session(args.key)
    state = ctx.store.state(other)
    if state is None or state.tip is None:
        raise CliError(f"Session '{other}' has no image yet")
    node = ctx.store.append(ctx.session_key, kind="session use", image=state.tip.image, title=other)
    emit_rows([{"session_key": other, "image": node.image, "id": node.id}], ctx.output_format)
    return 0


def detached_runs(ctx: Context) -> dict[str, tuple[str, Any]]:
    """op uuid → (branch name, tip node) of this session's `detached-<op>` branches."""
    out: dict[str, tuple[str, Any]] = {}
    for name, tip, _active in ctx.store.branches(ctx.session_key):
        if name.startswith("detached-") and tip.operation_uuid:
            out[tip.operation_uuid] = (name, tip)
    return out


def cmd_wait(ctx: Context, args: argparse.Namespace) -> int:
    from contree_shell.cli.operations import exit_code_of, status_code, wait_operations
    from contree_shell.cli.refs import resolve_operation_refs
    from contree_shell.output import emit_rows, info, warn

    ctx.require_state()
    detached = detached_runs(ctx)
    ops = resolve_operation_refs(ctx, args.operations) if args.operations else list(detached)
    if not ops:
        info("No detached runs to wait for")
        return 0
    rows: list[dict[str, Any]] = []
    done: list[dict[str, Any]] = []

    def finished(record: dict[str, Any]) -> None:
        done.append(record)
        op = str(record.get("uuid"))
        advanced = False
        if op in detached:
            advanced = _settle_detached(ctx, record, *detached[op])
        rows.append({
            "uuid": op, "status": record.get("status"), "exit_code": exit_code_of(record),
            "image": record.get("result_image_uuid"), "advanced": advanced,
        })

    left = wait_operations(ctx.client, ops, timeout=args.timeout, on_done=finished)
    emit_rows(rows, ctx.output_format)
    if left:
        warn(f"Timeout: {len(left)} operation(s) did not finish in {args.timeout:g}s")
        return 1
    return status_code(done)


def _settle_detached(ctx: Context, record: dict[str, Any], branch: str, node: Any) -> bool:
    """Move the session for a finished detached run; True when the active branch moved."""
    if record.get("status") != "SUCCESS" or not record.get("result_image_uuid"):
        return False
    state = ctx.require_state()
    ctx.store.append(
        ctx.session_key, kind="run", image=str(record["result_image_uuid"]), title=node.title,
        operation_uuid=str(record.get("uuid")),
    )
    if state.branch != branch:
        ctx.store.delete_branch(ctx.session_key, branch)
    return True
