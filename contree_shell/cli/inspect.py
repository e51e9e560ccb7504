"""`ls`, `cat`, `grep`, `cp` and `export`: read the session image without starting a sandbox."""

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
    """Add `ls`, `cat`, `grep`, `cp` and `export`."""
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
    register_transfer(sub)


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


# -- grep ------------------------------------------------------------------------------

MAX_CONTEXT = 50
EXIT_NO_MATCH = 1
EXIT_TRUNCATED_EMPTY = 2


def _context_lines(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= MAX_CONTEXT:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_CONTEXT}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def register_transfer(sub: Any) -> None:
    """Add `grep`, `cp` and `export`."""
    g = sub.add_parser(
        "grep", help="search file contents of the session image",
        description=(
            "Regex search (server-side ripgrep) in PATH… (default: the session cwd). "
            "Output is GNU-style `path:line:text`, context lines `path-line-text`. "
            "Exit 1 when nothing matched, 2 when the search was cut short with no match."
        ),
    )
    g.add_argument("pattern", metavar="PATTERN")
    g.add_argument("paths", nargs="*", metavar="PATH", help="relative paths start at the session cwd")
    g.add_argument("--glob", action="append", default=[], metavar="GLOB",
                   help="only files matching GLOB (`!` negates; repeatable)")
    g.add_argument("--max-count", type=_positive, metavar="N", help="matches per file")
    g.add_argument("--max-total", type=_positive, metavar="N", help="matches in total")
    g.add_argument("--case", choices=("sensitive", "insensitive", "smart"), default=None)
    g.add_argument("-B", "--before-context", "--before", dest="before", type=_context_lines,
                   metavar="N", help=f"lines before each match (0..{MAX_CONTEXT})")
    g.add_argument("-A", "--after-context", "--after", dest="after", type=_context_lines,
                   metavar="N", help=f"lines after each match (0..{MAX_CONTEXT})")
    g.add_argument("-C", "--context", dest="context", type=_context_lines, metavar="N",
                   help="lines before and after (-A/-B win)")
    g.add_argument("--raw", action="store_true", help="print the API result as JSON")
    g.set_defaults(handler=cmd_grep)

    cp = sub.add_parser(
        "cp", help="download a file of the session image",
        description="Copy PATH from the current image to the host file or directory DEST "
        "(streamed to a temporary file, then renamed into place).",
    )
    cp.add_argument("path", metavar="PATH", help="relative paths start at the session cwd")
    cp.add_argument("dest", metavar="DEST", help="host file or directory")
    cp.set_defaults(handler=cmd_cp)

    ex = sub.add_parser(
        "export", help="download a directory of the session image as a tar archive",
        description="Stream PATH (default: the session cwd) as a tar archive to stdout or -F. "
        "Gzip is passed through unless --decompress or OUT ends in `.tar`.",
    )
    ex.add_argument("path", nargs="?", metavar="PATH")
    ex.add_argument("-F", "--file", dest="out", metavar="OUT", help="write the archive to OUT")
    ex.add_argument("--decompress", action="store_true", help="write a plain (not gzipped) tar")
    ex.set_defaults(handler=cmd_export)


def grep_lines(result: dict[str, Any], *, color: bool, separators: bool) -> list[str]:
    """GNU-style lines for a GrepResult (no trailing newlines)."""
    from contree_shell.output.color import paint

    lines: list[str] = []
    last: tuple[str, int] | None = None
    for item in result.get("matches") or []:
        path = str(item.get("path") or "")
        number = int(item.get("line_number") or 0)
        if separators and last is not None and (last[0] != path or number > last[1] + 1):
            lines.append(paint("--", "cyan", enabled=color))
        last = (path, number)
        is_match = item.get("type", "match") == "match"
        text = str(item.get("line_text") or "")
        text = text[:-1] if text.endswith("\n") else text
        text = text[:-1] if text.endswith("\r") else text
        if color and is_match:
            text = _highlight(text, item.get("submatches") or [])
        sep = ":" if is_match else "-"
        lines.append(
            paint(path, "magenta", enabled=color) + paint(sep, "cyan", enabled=color)
            + paint(str(number), "green", enabled=color) + paint(sep, "cyan", enabled=color)
            + text
        )
    return lines


def _highlight(text: str, submatches: list[dict[str, Any]]) -> str:
    """Bold red over the matched byte ranges (skipped for lossy-decoded lines)."""
    from contree_shell.output.color import paint

    if "\ufffd" in text or not submatches:
        return text
    data = text.encode()
    out: list[str] = []
    pos = 0
    for sm in sorted(submatches, key=lambda s: int(s.get("start") or 0)):
        start, end = int(sm.get("start") or 0), int(sm.get("end") or 0)
        if start < pos or end > len(data) or end <= start:
            continue
        out.append(data[pos:start].decode("utf-8", "replace"))
        out.append(paint(data[start:end].decode("utf-8", "replace"), "bold", "red"))
        pos = end
    out.append(data[pos:].decode("utf-8", "replace"))
    return "".join(out)


def cmd_grep(ctx: Context, args: argparse.Namespace) -> int:
    import json

    from contree_shell.client.errors import NotFound, Unprocessable
    from contree_shell.output import get_output, warn, write_stdout

    image = ctx.current_image()
    cwd = ctx.cwd()
    paths = [resolve_path(cwd, p) for p in args.paths] or [resolve_path(cwd)]
    context = args.context or 0
    before = args.before if args.before is not None else context
    after = args.after if args.after is not None else context
    try:
        result = ctx.client.grep(
            image, [args.pattern], paths=paths, globs=args.glob or None,
            max_count=args.max_count, max_total=args.max_total, case=args.case,
            before=before or None, after=after or None,
        )
    except NotFound as exc:
        raise CliError(f"grep: {' '.join(paths)}: {exc.message}") from None
    except Unprocessable as exc:
        raise CliError(f"grep: {exc.message}") from None
    matches = [m for m in result.get("matches") or [] if m.get("type", "match") == "match"]
    truncated = bool(result.get("truncated"))
    if args.raw:
        write_stdout((json.dumps(result, sort_keys=True) + "\n").encode())
    elif ctx.structured:
        from contree_shell.output import emit_rows

        emit_rows([
            {"path": m.get("path"), "line_number": m.get("line_number"), "type": m.get("type"),
             "line_text": str(m.get("line_text") or "").rstrip("\n")}
            for m in result.get("matches") or []
        ], ctx.output_format)
    else:
        lines = grep_lines(result, color=get_output().stdout_color,
                           separators=bool(before or after))
        if lines:
            write_stdout(("\n".join(lines) + "\n").encode())
    if truncated:
        warn(f"Results truncated after {len(matches)} match(es); narrow the search or raise --max-total")
    if not matches:
        return EXIT_TRUNCATED_EMPTY if truncated else EXIT_NO_MATCH
    return 0


# -- cp / export -------------------------------------------------------------------------

PROGRESS_EVERY = 5.0


class _Progress:
    """Logs volume and speed every few seconds (no total is known for a stream)."""

    def __init__(self, what: str) -> None:
        import time

        self.what = what
        self.start = self.last = time.monotonic()
        self.done = 0

    def add(self, n: int) -> None:
        import time

        from contree_shell.output import info

        self.done += n
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY:
            self.last = now
            rate = self.done / max(now - self.start, 1e-6)
            info(f"{self.what}: {_size(self.done)} ({_size(int(rate))}/s)")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def write_atomically(dest: Any, chunks: Any, *, progress: _Progress | None = None) -> int:
    """Write `chunks` to a temp file next to `dest`, then rename it over `dest`.

    A failure (or Ctrl-C) leaves `dest` untouched and no temp file behind.
    """
    import os
    import tempfile
    from pathlib import Path

    target = Path(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    total = 0
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
                total += len(chunk)
                if progress is not None:
                    progress.add(len(chunk))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return total


def _umask() -> int:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _first_chunk(chunks: Any) -> tuple[bytes, Any]:
    """Pull the first chunk now, so a 404 surfaces before any file is created."""
    iterator = iter(chunks)
    for chunk in iterator:
        return chunk, iterator
    return b"", iterator


def _chain(first: bytes, rest: Any) -> Any:
    if first:
        yield first
    yield from rest


def cmd_cp(ctx: Context, args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from contree_shell.client.errors import NotFound, Unprocessable
    from contree_shell.output import info

    image = ctx.current_image()
    path = resolve_path(ctx.cwd(), args.path)
    dest = Path(os.path.expanduser(args.dest))
    if dest.is_dir() or args.dest.endswith("/"):
        if not dest.is_dir():
            raise CliError(f"cp: {args.dest}: No such directory")
        dest = dest / (path.rstrip("/").rsplit("/", 1)[-1] or "root")
    if not dest.parent.is_dir():
        raise CliError(f"cp: {dest.parent}: No such directory")
    try:
        first, rest = _first_chunk(ctx.client.iter_download(image, path))
    except (NotFound, Unprocessable) as exc:
        raise _not_found("cp", path, exc) from None
    size = write_atomically(dest, _chain(first, rest), progress=_Progress(f"cp {path}"))
    info(f"Copied {path} to {dest} ({_size(size)})")
    return 0


GZIP_MAGIC = b"\x1f\x8b"


def _gunzip(chunks: Any) -> Any:
    import zlib

    inflater = zlib.decompressobj(wbits=31)
    for chunk in chunks:
        data = inflater.decompress(chunk)
        if data:
            yield data
    tail = inflater.flush()
    if tail:
        yield tail


def _gzip(chunks: Any) -> Any:
    import zlib

    deflater = zlib.compressobj(wbits=31)
    for chunk in chunks:
        data = deflater.compress(chunk)
        if data:
            yield data
    yield deflater.flush()


def cmd_export(ctx: Context, args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from contree_shell.client.errors import NotFound, Unprocessable
    from contree_shell.output import info, write_stdout

    if not args.out and _stdout_is_tty():
        raise CliError(
            "export: refusing to write a binary archive to a terminal; "
            "use -F FILE or redirect stdout"
        )
    image = ctx.current_image()
    path = resolve_path(ctx.cwd(), args.path)
    try:
        first, rest = _first_chunk(ctx.client.iter_archive(image, path))
    except NotFound:
        raise CliError(f"export: {path}: not found in image") from None
    except Unprocessable as exc:
        raise CliError(f"export: {path}: {exc.message}") from None
    stream = _chain(first, rest)
    gzipped = first.startswith(GZIP_MAGIC)
    out = Path(os.path.expanduser(args.out)) if args.out else None
    plain = args.decompress or (out is not None and out.name.endswith(".tar"))
    wants_gzip = out is not None and out.name.endswith((".tar.gz", ".tgz")) and not args.decompress
    if gzipped and plain:
        stream = _gunzip(stream)
    elif not gzipped and wants_gzip:
        stream = _gzip(stream)
    if out is None:
        for chunk in stream:
            write_stdout(chunk)
        return 0
    if out.is_dir():
        raise CliError(f"export: {args.out}: is a directory")
    size = write_atomically(out, stream, progress=_Progress(f"export {path}"))
    info(f"Exported {path} to {out} ({_size(size)})")
    return 0
