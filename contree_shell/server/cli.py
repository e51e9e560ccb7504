"""`contree server run|start|stop|status|token|logs`.

`register(subparsers)` adds the command group to the `contree` parser; every handler
takes the parsed args and returns an exit status. Messages go to stdout/stderr through
plain writes because this module must not import the client-side output package.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import deque
from pathlib import Path

from contree_shell.server import daemon


def _out(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def _err(text: str) -> None:
    sys.stderr.write(f"[ERROR] {text}\n")
    sys.stderr.flush()


def _home(args: argparse.Namespace) -> Path:
    return daemon.server_home(getattr(args, "home", None))


def cmd_run(args: argparse.Namespace) -> int:
    try:
        limits = {"memory": args.memory, "pids": args.pids, "cpus": args.cpus}
        return daemon.run_server(
            _home(args),
            args.listen,
            log_level=args.log_level,
            limits=limits,
            snapshot_mtime=args.snapshot_mtime,
        )
    except daemon.ServerError as exc:
        _err(str(exc))
        return 1


def cmd_start(args: argparse.Namespace) -> int:
    home = _home(args)
    try:
        pid = daemon.start(home, args.listen)
    except daemon.ServerError as exc:
        _err(str(exc))
        return 1
    _out(f"contree server running (pid {pid}, socket {daemon.socket_path(home)})")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    home = _home(args)
    if daemon.stop(home):
        _out("contree server stopped")
    else:
        _out("contree server is not running")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    info = daemon.status(_home(args))
    if args.json:
        _out(json.dumps(info, indent=2))
        return 0 if info["running"] else 3
    state = f"running (pid {info['pid']})" if info["running"] else "not running"
    lines = [
        f"server:     {state}",
        f"version:    {info['version']}",
        f"socket:     {info['socket']}",
        f"store:      {info['store']}",
        f"images:     {info['images']}",
        f"operations: {info['operations']}",
        f"snapshot mtime: {info.get('snapshot_mtime', '')}",
        f"run limits: {_limits_text(info.get('limits') or {})}",
        "preflight:",
    ]
    lines += [
        f"  {'ok ' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}" for c in info["preflight"]
    ]
    _out("\n".join(lines))
    return 0 if info["running"] else 3


def _limits_text(limits: dict[str, float]) -> str:
    """ "memory 11.7 GiB, 4096 processes, CPU no quota"; "none" without cgroup limits."""
    if not limits:
        return "none"
    memory = limits.get("memory_bytes")
    pids = limits.get("pids")
    cpus = limits.get("cpus")
    return ", ".join((
        f"memory {memory / (1 << 30):.1f} GiB" if memory else "memory unlimited",
        f"{int(pids)} processes" if pids else "processes unlimited",
        f"CPU {cpus:g}" if cpus else "CPU no quota",
    ))


def cmd_token(args: argparse.Namespace) -> int:
    _out(daemon.ensure_token(_home(args)))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    path = _home(args) / daemon.LOG_NAME
    try:
        with path.open(errors="replace") as fh:
            tail = deque(fh, maxlen=max(1, args.lines))
    except FileNotFoundError:
        _err(f"no server log yet at {path}")
        return 1
    sys.stdout.write("".join(tail))
    sys.stdout.flush()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `server` and its subcommands; each handler `(args) -> int` is `args.func`."""
    parser = subparsers.add_parser("server", help="run or manage the local Contree server")
    parser.add_argument(
        "--home",
        help="server home directory (default: "
        "$CONTREE_SERVER_HOME or $XDG_DATA_HOME/contree/server)",
    )
    sub = parser.add_subparsers(dest="server_command", metavar="COMMAND")
    sub.required = True

    def add(name: str, handler: object, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--home", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.set_defaults(func=handler)
        return p

    run = add("run", cmd_run, "serve in the foreground")
    run.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="also serve TCP (requires the bearer token, see `server token`)",
    )
    run.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    run.add_argument(
        "--memory",
        metavar="BYTES",
        help="memory limit per run, e.g. 2G, or none (default: half of the host's RAM; "
        "env CONTREE_LIMIT_MEMORY)",
    )
    run.add_argument(
        "--pids",
        metavar="N",
        help=f"process limit per run, or none (default {daemon.DEFAULT_PIDS}; "
        "env CONTREE_LIMIT_PIDS)",
    )
    run.add_argument(
        "--cpus",
        metavar="N",
        help="CPU limit per run, e.g. 0.5 (default: none; env CONTREE_LIMIT_CPUS)",
    )
    run.add_argument(
        "--snapshot-mtime",
        choices=list(daemon.SNAPSHOT_MTIME_POLICIES),
        help="ignore (default): a run that only changes mtimes keeps its parent image; "
        "keep: such a run commits a new image (env CONTREE_SNAPSHOT_MTIME)",
    )
    start = add("start", cmd_start, "start the server in the background")
    start.add_argument("--listen", metavar="HOST:PORT", help="also serve TCP")
    add("stop", cmd_stop, "stop the background server")
    status = add("status", cmd_status, "show whether the server runs and what it holds")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    add("token", cmd_token, "print the TCP bearer token (created if needed)")
    logs = add("logs", cmd_logs, "show the end of the server log")
    logs.add_argument("-n", "--lines", type=int, default=50, help="number of lines")


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: `python -m contree_shell.server.cli run ...`."""
    parser = argparse.ArgumentParser(prog="contree")
    subparsers = parser.add_subparsers(dest="command")
    register(subparsers)
    args = parser.parse_args(["server", *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
