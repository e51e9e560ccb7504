"""`use`, `images` and `tag`: choosing the session image and managing tags."""

from __future__ import annotations

import argparse
import os
import sys
import uuid as uuidlib
from typing import Any

from contree_shell.cli.context import Context
from contree_shell.cli.errors import CliError

# Base images the local server can build itself (no registry needed): tag → import URL.
# A `use` of one of these tags on the `local` profile imports it on first use.
KNOWN_BASE_IMAGES: dict[str, str] = {
    "debian:bookworm": "debootstrap:bookworm",
    "debian:trixie": "debootstrap:trixie",
    "debian:bullseye": "debootstrap:bullseye",
    "busybox": "busybox:",
    "busybox:latest": "busybox:",
}

DEFAULT_IMAGES_LIMIT = 3000


def is_uuid(text: str) -> bool:
    """True for a UUID-shaped string (passed through without a tag lookup)."""
    if len(text) not in (32, 36):
        return False
    try:
        uuidlib.UUID(text)
    except ValueError:
        return False
    return True


def tag_of(ref: str) -> str:
    """The tag named by `tag:X` or a bare `X`."""
    return ref[4:] if ref.startswith("tag:") else ref


def resolve_image(ctx: Context, ref: str, *, import_missing: bool = False) -> str:
    """The image uuid for a user reference: a uuid (checked to exist), `tag:X` or bare `X`.

    With `import_missing`, a missing tag that is a known base image is imported first on
    the `local` profile, with the import's progress shown on stderr.
    """
    from contree_shell.client.errors import BadRequest, NotFound

    ref = ref.strip()
    if not ref:
        raise CliError("Empty image reference")
    client = ctx.client
    if is_uuid(ref):
        try:
            client.get_image(ref)
        except NotFound:
            raise CliError(f"Image {ref} not found. See `contree images -a`.") from None
        return ref
    tag = tag_of(ref)
    try:
        return client.resolve_image(f"tag:{tag}")
    except NotFound:
        pass
    except BadRequest as exc:
        raise CliError(f"Invalid image reference '{ref}': {exc.error}") from None
    url = KNOWN_BASE_IMAGES.get(tag)
    if import_missing and url is not None and ctx.profile.type == "local":
        import_base_image(ctx, url, tag)
        try:
            return client.resolve_image(f"tag:{tag}")
        except NotFound:
            raise CliError(f"Import of {tag} finished but the tag is missing") from None
    raise CliError(f"Image tag '{tag}' not found. See `contree images` for the available tags.")


def import_base_image(ctx: Context, url: str, tag: str) -> None:
    """Import `url` as `tag` and follow the operation, printing its progress to stderr."""
    from contree_shell.client.streams import decode_stream
    from contree_shell.output import info, write_stderr

    client = ctx.client
    info(f"Image {tag} is not here yet; importing it from {url} (first use only)")
    op = client.import_image(url, tag)
    status: str | None = None
    failure: str | None = None
    try:
        for event in client.iter_events(op, follow=True):
            kind = event.get("type")
            data = event.get("data") or {}
            if kind in ("stdout", "stderr") and isinstance(data, dict):
                chunk = decode_stream(data)
                if chunk:
                    write_stderr(chunk)
            elif kind == "completion" and isinstance(data, dict):
                status = str(data.get("status") or "")
                failure = data.get("error")
                break
    except KeyboardInterrupt:
        try:
            client.cancel(op)
        finally:
            raise
    if status is None:
        record = client.get_operation(op)
        status = str(record.get("status") or "")
        failure = record.get("error")
    if status != "SUCCESS":
        detail = f": {failure}" if failure else ""
        raise CliError(f"Import of {tag} from {url} ended with status {status or 'unknown'}{detail}")
    info(f"Imported {tag}")


# --- use ---------------------------------------------------------------------------------


def register_use(sub: Any) -> None:
    """Add `use` (alias `ci`)."""
    p = sub.add_parser(
        "use", aliases=["ci"], help="start or switch the session image",
        description=(
            "Set the session image: IMAGE is a uuid, tag:NAME or a bare tag NAME. "
            "Without IMAGE, show the current session. On the local profile a known base "
            "image (debian:bookworm, busybox:latest) is imported on first use."
        ),
    )
    p.add_argument("image", nargs="?", metavar="IMAGE", help="uuid, tag:NAME or NAME")
    p.add_argument(
        "-N", "--new", action="store_true",
        help="start a new session with a fresh key (prints `export CONTREE_SESSION=…`)",
    )
    p.set_defaults(handler=cmd_use)


def session_row(ctx: Context) -> dict[str, Any]:
    """The one-row summary of the current session (as the official `use` shows it)."""
    state = ctx.require_state()
    tip = state.tip
    assert tip is not None
    return {
        "session_key": state.key,
        "active_branch": state.branch,
        "current_image": tip.image,
        "last_kind": tip.kind,
        "last_title": tip.title,
        "updated_at": tip.created_at,
    }


def cmd_use(ctx: Context, args: argparse.Namespace) -> int:
    from contree_shell.output import emit_rows, info, warn, write_stdout

    if args.image is None:
        if args.new:
            raise CliError("--new requires an IMAGE argument.")
        emit_rows([session_row(ctx)], ctx.output_format)
        return 0
    image = resolve_image(ctx, args.image, import_missing=True)
    if args.new:
        ctx.session_key = str(uuidlib.uuid4())
    node = ctx.store.append(ctx.session_key, kind="use", image=image, title=args.image)
    state = ctx.state()
    branch = state.branch if state is not None else "main"
    if args.new and not ctx.in_shell:
        fish = os.path.basename(os.environ.get("SHELL", "")) == "fish"
        line = (
            f"set -gx CONTREE_SESSION {ctx.session_key}" if fish
            else f"export CONTREE_SESSION={ctx.session_key}"
        )
        write_stdout((line + "\n").encode())
        if sys.stdout.isatty():
            warn(
                "Session is not active until exported; "
                f"run `eval $(contree use -N {args.image})` instead"
            )
        return 0
    if ctx.structured:
        emit_rows([{
            "session_key": ctx.session_key, "active_branch": branch,
            "current_image": node.image, "title": args.image,
        }], ctx.output_format)
    else:
        info(f"Session {ctx.session_key} ({branch}) now uses {args.image} ({image})")
    return 0


# --- images ------------------------------------------------------------------------------


def _add_list_flags(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    # The flags live on both `images` and `images list`; on the subparser their default
    # is SUPPRESS so it never overwrites what was given to the parent.
    default: Any = argparse.SUPPRESS if suppress else None
    p.add_argument("--prefix", default=default, help="only tags starting with this prefix")
    p.add_argument("-a", "--all", action="store_true", default=argparse.SUPPRESS if suppress else False,
                   help="include untagged images")
    p.add_argument("-i", "--uuid", default=default, help="only this image uuid")
    p.add_argument("--limit", type=_positive_int,
                   default=argparse.SUPPRESS if suppress else DEFAULT_IMAGES_LIMIT,
                   help=f"maximum rows (default {DEFAULT_IMAGES_LIMIT})")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def register(sub: Any) -> None:
    """Add `images` (aliases `i`, `img`) and `tag` (alias `t`)."""
    p = sub.add_parser(
        "images", aliases=["i", "img"], help="list images",
        description="List images (tagged only unless -a).",
    )
    _add_list_flags(p, suppress=False)
    p.set_defaults(handler=cmd_images)
    isub = p.add_subparsers(dest="images_command", metavar="SUBCOMMAND")
    lp = isub.add_parser("list", aliases=["ls"], help="list images (the default)")
    _add_list_flags(lp, suppress=True)
    lp.set_defaults(handler=cmd_images)

    t = sub.add_parser(
        "tag", aliases=["t"], help="tag or untag an image",
        description=(
            "With one argument, tag the current session image as TAG; with two, tag IMAGE. "
            "With -U, remove the tag (from IMAGE, or from whichever image holds TAG)."
        ),
    )
    t.add_argument("refs", nargs="+", metavar="[IMAGE] TAG")
    t.add_argument("-U", "--delete", "--rm", action="store_true", dest="delete",
                   help="remove the tag instead")
    t.set_defaults(handler=cmd_tag)


def cmd_images(ctx: Context, args: argparse.Namespace) -> int:
    from contree_shell.output import emit_rows, warn

    limit: int = args.limit
    filters: dict[str, Any] = {}
    if not args.all:
        filters["tagged"] = True
    if args.prefix:
        filters["tag"] = args.prefix
    if args.uuid:
        filters["uuid"] = args.uuid
    rows: list[dict[str, Any]] = []
    truncated = False
    for image in _iter_images(ctx, filters):
        if len(rows) >= limit:
            truncated = True
            break
        rows.append({
            "uuid": image.get("uuid"),
            "tag": image.get("tag") or "",
            "created_at": image.get("created_at"),
            "operation_uuid": image.get("operation_uuid") or "",
        })
    emit_rows(rows, ctx.output_format)
    if truncated:
        warn(f"Output truncated at --limit={limit} images; more results are available")
    return 0


def _iter_images(ctx: Context, filters: dict[str, Any]) -> Any:
    client = ctx.client
    iterate = getattr(client, "iter_images", None)
    if callable(iterate):
        return iterate(**filters)
    return iter(client.list_images(**filters))


def cmd_tag(ctx: Context, args: argparse.Namespace) -> int:
    from contree_shell.client.errors import NotFound
    from contree_shell.output import info

    refs: list[str] = args.refs
    if len(refs) > 2:
        raise CliError("tag takes at most two arguments: [IMAGE] TAG", 2)
    tag = tag_of(refs[-1])
    if args.delete:
        if len(refs) == 2:
            image = resolve_image(ctx, refs[0])
        else:
            try:
                image = ctx.client.resolve_image(f"tag:{tag}")
            except NotFound:
                raise CliError(f"Image tag '{tag}' not found") from None
        ctx.client.untag_image(image, tag)
        info(f"Removed tag {tag} from image {image}")
        return 0
    image = resolve_image(ctx, refs[0]) if len(refs) == 2 else ctx.current_image()
    ctx.client.tag_image(image, tag)
    info(f"Tagged image {image} as {tag}")
    return 0
