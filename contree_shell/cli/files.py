"""`file edit`, `file cp`, `file ls`: stage files for the next run of the session.

A staged file is uploaded once (`ensure_file`) and recorded as a `file` history entry
plus a pending-file row; the next `run` (or bare shell line) sends it in `files`, and
the run entry then hides it. Sandbox paths are resolved against the session cwd (the
official CLI did not), and `file edit` keeps the existing file's mode and owner.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from contree_shell.cli.context import Context
from contree_shell.cli.errors import CliError
from contree_shell.cli.intervals import IntervalError, to_query
from contree_shell.cli.paths import resolve_path

__all__ = ["choose_editor", "register"]

DEFAULT_MODE = 0o644
FALLBACK_EDITORS = ("vim", "nano", "vi")
DEFAULT_LIMIT = 1000


def register(sub: Any) -> None:
    """Add `file` (alias `f`) with `edit`, `cp` and `ls`."""
    p = sub.add_parser("file", aliases=["f"], help="stage files for the next run")
    fsub = p.add_subparsers(dest="file_command", metavar="SUBCOMMAND", required=True)
    edit = fsub.add_parser(
        "edit", aliases=["e"], help="edit a sandbox file locally; staged for the next run",
        description="Download PATH (relative to the session cwd; missing = empty), open it in "
        "EDITOR, and stage the result for the next run when it changed.",
    )
    edit.add_argument("path", metavar="PATH")
    edit.add_argument("-E", "--editor", metavar="EDITOR",
                      help="editor command (default: $EDITOR, cli.ini editor, vim, nano, vi)")
    edit.set_defaults(handler=cmd_edit)
    cp = fsub.add_parser(
        "cp", help="stage a host file at a sandbox path for the next run",
        description="Upload host file SRC and stage it at DEST (relative to the session cwd; a "
        "DEST ending in / or naming a directory gets SRC's name). The host mode is kept.",
    )
    cp.add_argument("src", metavar="SRC", help="host file")
    cp.add_argument("dest", metavar="DEST", help="sandbox path")
    cp.set_defaults(handler=cmd_cp)
    ls = fsub.add_parser("ls", aliases=["list"], help="uploaded files (or -P: staged ones)")
    ls.add_argument("--since", metavar="WHEN")
    ls.add_argument("--until", metavar="WHEN")
    ls.add_argument("--limit", type=int, default=DEFAULT_LIMIT, metavar="N")
    ls.add_argument("-q", "--quiet", action="store_true", help="print UUIDs only")
    ls.add_argument("-P", "--pending", action="store_true",
                    help="the files staged for the next run of this session")
    ls.set_defaults(handler=cmd_ls)


def choose_editor(explicit: str | None, env: dict[str, str] | None = None) -> str:
    """`-E` > `$EDITOR` > cli.ini `editor` > the first of vim, nano, vi on PATH."""
    environ = os.environ if env is None else env
    if explicit:
        return explicit
    if environ.get("EDITOR"):
        return environ["EDITOR"]
    try:
        from contree_shell.config import cli_settings

        configured = cli_settings().get("editor")
    except Exception:  # an unreadable cli.ini must not block editing
        configured = None
    if configured:
        return configured
    for name in FALLBACK_EDITORS:
        if shutil.which(name):
            return name
    raise CliError("No editor found; set $EDITOR or pass -E EDITOR")


def _staged_dir() -> Path:
    from contree_shell.config import config_dir

    return config_dir() / "cli" / "staged"


def _staged_copy(file_uuid: str) -> bytes | None:
    """The content of a file this machine staged with `file edit` (the API cannot
    download uploaded files), so a second edit starts from the first one."""
    try:
        return (_staged_dir() / file_uuid).read_bytes()
    except OSError:
        return None


def _keep_staged_copy(file_uuid: str, data: bytes) -> None:
    try:
        folder = _staged_dir()
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = folder / f".{file_uuid}.{os.getpid()}"
        tmp.write_bytes(data)
        os.replace(tmp, folder / file_uuid)
    except OSError:
        pass  # only a convenience for the next edit


def _existing_meta(ctx: Context, image: str, path: str) -> tuple[int, int, int] | None:
    """(mode, uid, gid) of `path` in the image, or None when it does not exist there."""
    parent, _, name = path.rpartition("/")
    try:
        items = ctx.client.list_dir(image, parent or "/").get("files") or []
    except Exception:  # missing parent, or not a directory: a new file
        return None
    for item in items:
        if item.get("path") == name:
            mode = int(item.get("mode") or DEFAULT_MODE) & 0o7777
            return mode, int(item.get("uid") or 0), int(item.get("gid") or 0)
    return None


def cmd_edit(ctx: Context, args: argparse.Namespace) -> int:
    from contree_shell.client.errors import NotFound, Unprocessable
    from contree_shell.output import info

    image = ctx.current_image()
    path = resolve_path(ctx.cwd(), args.path)
    if path == "/":
        raise CliError("file edit: /: Not a regular file")
    editor = choose_editor(args.editor)
    pending = {p.path: p for p in ctx.store.pending_files(ctx.session_key)}
    staged = _staged_copy(pending[path].file_uuid) if path in pending else None
    try:
        original = staged if staged is not None else ctx.client.download(image, path)
    except NotFound:
        original = b""
    except Unprocessable:
        raise CliError(f"file edit: {path}: Not a regular file") from None
    if path in pending:
        meta: tuple[int, int, int] | None = (pending[path].mode, pending[path].uid, pending[path].gid)
    else:
        meta = _existing_meta(ctx, image, path)
    mode, uid, gid = meta or (DEFAULT_MODE, 0, 0)
    with tempfile.TemporaryDirectory(prefix="contree-edit-") as tmp:
        local = Path(tmp) / (path.rsplit("/", 1)[-1] or "file")
        local.write_bytes(original)
        # Through a shell, so $EDITOR may carry flags, variables or a tilde.
        code = subprocess.call(f"{editor} {shlex.quote(str(local))}", shell=True)
        if code != 0:
            raise CliError(f"Editor exited with code {code}")
        edited = local.read_bytes()
    if hashlib.sha256(edited).digest() == hashlib.sha256(original).digest():
        info("No changes detected, skipping upload")
        return 0
    file_uuid = ctx.client.ensure_file(edited)
    _keep_staged_copy(file_uuid, edited)
    ctx.store.add_file(ctx.session_key, path, file_uuid, uid, gid, mode)
    info(f"Pending: {path} -> {file_uuid} (will be included in next run)")
    return 0


def _is_dir_in_image(ctx: Context, image: str, path: str) -> bool:
    try:
        ctx.client.list_dir(image, path)
    except Exception:  # 404 / 422: not a directory there
        return False
    return True


def cmd_cp(ctx: Context, args: argparse.Namespace) -> int:
    from contree_shell.cli.uploads import open_cache, upload_all
    from contree_shell.output import info

    image = ctx.current_image()
    src = Path(os.path.expanduser(args.src))
    if not src.is_file():
        raise CliError(f"File not found: {args.src}")
    dest = resolve_path(ctx.cwd(), args.dest)
    if args.dest.endswith("/") or _is_dir_in_image(ctx, image, dest):
        dest = resolve_path(dest, src.name)
    cache = open_cache(ctx.profile.name)
    try:
        uuids, _ = upload_all(ctx.client, ctx.profile.url, [src], cache=cache)
    finally:
        if cache is not None:
            cache.close()
    file_uuid = next(iter(uuids.values()))
    mode = src.stat().st_mode & 0o7777
    ctx.store.add_file(ctx.session_key, dest, file_uuid, 0, 0, mode)
    info(f"Pending: {dest} -> {file_uuid} (will be included in next run)")
    return 0


def cmd_ls(ctx: Context, args: argparse.Namespace) -> int:
    from contree_shell.cli.uploads import open_cache
    from contree_shell.output import emit_rows, write_stdout

    if args.pending:
        ctx.require_state()
        rows = [
            {"path": p.path, "uuid": p.file_uuid, "uid": p.uid, "gid": p.gid,
             "mode": f"{p.mode:04o}", "history_id": p.history_id}
            for p in ctx.store.pending_files(ctx.session_key)
        ]
        if args.quiet:
            write_stdout("".join(f"{r['uuid']}\n" for r in rows).encode())
        else:
            emit_rows(rows, ctx.output_format)
        return 0
    if args.limit <= 0:
        raise CliError("--limit must be a positive number", 2)
    try:
        since, until = to_query(args.since), to_query(args.until)
    except IntervalError as exc:
        raise CliError(exc.message, 2) from None
    files: list[dict[str, Any]] = []
    offset = 0
    while len(files) < args.limit:
        want = min(1000, args.limit - len(files))
        page = ctx.client.list_files(limit=want, offset=offset, since=since, until=until)
        files.extend(page)
        offset += len(page)
        if len(page) < want:
            break
    if args.quiet:
        write_stdout("".join(f"{f.get('uuid')}\n" for f in files).encode())
        return 0
    if not files and not ctx.structured:
        from contree_shell.output import info

        info("No uploaded files.")
        return 0
    cache = open_cache(ctx.profile.name)
    sources = cache.sources() if cache is not None else {}
    if cache is not None:
        cache.close()
    rows = [{**f, "source": sources.get(str(f.get("uuid")), "")} for f in files]
    emit_rows(rows, ctx.output_format, head=("uuid", "sha256", "size"))
    return 0
