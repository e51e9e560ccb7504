"""`ls` and `cat`: read the session image's files without starting a sandbox."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from contree_shell.cli.context import Context
from contree_shell.cli.errors import CliError
from contree_shell.cli.paths import resolve_path

BINARY_REFUSAL = (
    "Binary content - refusing to write to terminal. Use shell redirection or `contree cp`."
)


def register(sub: Any) -> None:
    """Add `ls` and `cat`."""
    ls = sub.add_parser(
        "ls", help="list a directory of the session image",
        description="List PATH (default: the session cwd) in the current image; no sandbox runs.",
    )
    ls.add_argument("path", nargs="?", metavar="PATH", help="relative paths start at the session cwd")
    ls.set_defaults(handler=cmd_ls)
    cat = sub.add_parser(
        "cat", help="print a file of the session image",
        description="Print PATH from the current image; no sandbox runs.",
    )
    cat.add_argument("path", metavar="PATH", help="relative paths start at the session cwd")
    cat.set_defaults(handler=cmd_cat)


def _not_found(command: str, path: str, exc: Exception) -> CliError:
    """One line for a 404/422 of an inspect call (what, where, why)."""
    from contree_shell.client.errors import NotFound, Unprocessable

    if isinstance(exc, NotFound):
        return CliError(f"{command}: {path}: No such file or directory")
    if isinstance(exc, Unprocessable):
        what = "Not a directory" if command in ("ls", "cd") else "Not a regular file"
        return CliError(f"{command}: {path}: {what}")
    raise exc


def file_row(item: dict[str, Any]) -> dict[str, Any]:
    """A listing entry as a row: type letter, octal mode, owner names falling back to ids."""
    mode = int(item.get("mode") or 0)
    if item.get("is_dir"):
        kind = "d"
    elif item.get("is_symlink"):
        kind = "l"
    else:
        kind = "-"
    return {
        "type": kind,
        "mode": mode,  # the formatters render it in octal
        "owner": item.get("owner", item.get("uid")),
        "group": item.get("group", item.get("gid")),
        "size": item.get("size"),
        "mtime": item.get("mtime"),
        "path": item.get("path"),
        "symlink_to": item.get("symlink_to") or "",
    }


def cmd_ls(ctx: Context, args: argparse.Namespace) -> int:
    from contree_shell.client.errors import NotFound, Unprocessable
    from contree_shell.output import emit_rows, write_stdout

    image = ctx.current_image()
    path = resolve_path(ctx.cwd(), args.path)
    try:
        if not ctx.structured:
            text = ctx.client.list_dir_text(image, path)
            write_stdout(_with_newline(text).encode())
            return 0
        items = list(ctx.client.list_dir(image, path).get("files") or [])
    except NotFound as exc:
        raise _not_found("ls", path, exc) from None
    except Unprocessable as exc:
        # Not a directory: show the entry itself, as `ls FILE` does.
        entry = _single_entry(ctx, image, path)
        if entry is None:
            raise _not_found("ls", path, exc) from None
        if not ctx.structured:
            write_stdout(_with_newline(entry[0]).encode())
            return 0
        items = [entry[1]]
    emit_rows([file_row(item) for item in items], ctx.output_format)
    return 0


def _with_newline(text: str) -> str:
    return text if not text or text.endswith("\n") else text + "\n"


def _single_entry(ctx: Context, image: str, path: str) -> tuple[str, dict[str, Any]] | None:
    """(text line, item) of the non-directory `path`, read from its parent's listing."""
    parent, _, name = path.rpartition("/")
    parent = parent or "/"
    try:
        items = ctx.client.list_dir(image, parent).get("files") or []
        item = next((i for i in items if i.get("path") == name), None)
        if item is None:
            return None
        lines = ctx.client.list_dir_text(image, parent).splitlines()
    except Exception:  # best effort: the caller reports the original error
        return None
    line = next(
        (ln for ln in lines if ln.endswith(" " + name) or f" {name} -> " in ln), name
    )
    return line, item


def cmd_cat(ctx: Context, args: argparse.Namespace) -> int:
    from contree_shell.client.errors import NotFound, Unprocessable
    from contree_shell.output import warn, write_stdout

    image = ctx.current_image()
    path = resolve_path(ctx.cwd(), args.path)
    try:
        data = ctx.client.download(image, path)
    except (NotFound, Unprocessable) as exc:
        raise _not_found("cat", path, exc) from None
    if ctx.structured:
        warn(f"--format {ctx.output_format} is ignored by cat")
    if _stdout_is_tty() and not _is_text(data):
        raise CliError(BINARY_REFUSAL)
    write_stdout(data)
    return 0


def _stdout_is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (ValueError, OSError):
        return False


def _is_text(data: bytes) -> bool:
    if b"\x00" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
