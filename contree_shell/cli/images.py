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
    from contree_shell.output import info

    client = ctx.client
    info(f"Image {tag} is not here yet; importing it from {url} (first use only)")
    op = client.import_image(url, tag)
    try:
        record = follow_import(ctx, op)
    except KeyboardInterrupt:
        _cancel_quietly(ctx, [op])
        raise
    status = str(record.get("status") or "")
    if status != "SUCCESS":
        failure = record.get("error")
        detail = f": {failure}" if failure else ""
        raise CliError(f"Import of {tag} from {url} ended with status {status or 'unknown'}{detail}")
    info(f"Imported {tag}")


def follow_import(ctx: Context, op: str, *, prefix: str = "") -> dict[str, Any]:
    """Follow an import operation's events live, writing its progress lines to stderr
    (each line after `prefix`), until it ends; returns the final operation record.
    KeyboardInterrupt propagates: the caller decides what to cancel."""
    from contree_shell.client.streams import decode_stream
    from contree_shell.output import write_stderr

    client = ctx.client
    pending = b""
    for event in client.iter_events(op, follow=True):
        kind = event.get("type")
        data = event.get("data") or {}
        if kind in ("stdout", "stderr") and isinstance(data, dict):
            chunk = decode_stream(data)
            if not prefix:
                if chunk:
                    write_stderr(chunk)
                continue
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                write_stderr(prefix.encode() + line + b"\n")
        elif kind == "completion":
            break
    if pending:
        write_stderr(prefix.encode() + pending + b"\n")
    return dict(client.get_operation(op))


def _cancel_quietly(ctx: Context, ops: list[str]) -> int:
    """Cancel every operation in `ops` that is still running; returns how many were."""
    from contree_shell.client.errors import ContreeError

    cancelled = 0
    for op in ops:
        try:
            ctx.client.cancel(op)
            cancelled += 1
        except ContreeError:  # already over (409) or the server is gone
            pass
    return cancelled


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


def cmd_use(ctx: Context, args: argparse.Namespace) -> int:
    from contree_shell.output import emit_rows, info, warn, write_stdout

    if args.image is None:
        if args.new:
            raise CliError("--new requires an IMAGE argument.")
        from contree_shell.cli.session import current_row

        emit_rows([current_row(ctx, detail=False)], ctx.output_format)
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
    register_import(isub)

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


# --- images import -----------------------------------------------------------------------

LOCAL_IMPORT_SCHEMES = ("oci:", "oci-archive:", "docker-archive:")
DOCKER_HUB = "docker.io"


def register_import(isub: Any) -> None:
    """Add `images import`."""
    p = isub.add_parser(
        "import", help="import images from a registry or a local OCI/Docker archive",
        description=(
            "Import images. REF is a registry image (ubuntu:24.04, ghcr.io/o/app:1, "
            "docker://host:5000/name@sha256:…; Docker Hub names get library/ and :latest), "
            "or a local image: oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE. "
            "One {a,b} brace group expands to several refs. REF?tag=NAME sets the tag; "
            "otherwise a registry image is tagged with its name without scheme, registry "
            "host and library/ (ubuntu:24.04), and a local image is left untagged. "
            "Local paths are read by the server: relative paths are made absolute here, "
            "which is only meaningful with the `local` profile (client and server share "
            "the filesystem); for a remote server give paths on the server's host. "
            "Each import's progress goes to stderr; one row per import at the end; "
            "exit 1 if any failed. Ctrl-C cancels the imports still running."
        ),
    )
    p.add_argument("refs", nargs="+", metavar="REF", help="image reference (see above)")
    p.add_argument("--tag", help="tag for the imported image (a single REF only)")
    p.add_argument("--username", help="registry user (the password is prompted for)")
    p.add_argument("--password", help="registry password (prefer the prompt)")
    p.add_argument("-t", "--timeout", type=_positive_int,
                   help="server-side limit per import, seconds (server default 300)")
    p.set_defaults(handler=cmd_images_import)


def expand_braces(ref: str) -> list[str]:
    """Expand the first `{a,b,…}` group of `ref` (one group only, as the official CLI)."""
    start = ref.find("{")
    end = ref.find("}", start + 1)
    if start < 0 or end < 0 or "," not in ref[start:end]:
        return [ref]
    return [ref[:start] + part + ref[end + 1:] for part in ref[start + 1:end].split(",")]


def split_tag_query(ref: str) -> tuple[str, str | None]:
    """`REF?tag=NAME` → (REF, NAME); (REF, None) without the query."""
    from urllib.parse import parse_qs

    base, sep, query = ref.partition("?")
    if not sep:
        return ref, None
    values = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(values) - {"tag"})
    if unknown or not values.get("tag") or not values["tag"][-1]:
        raise CliError(f"Invalid image reference '{ref}': only ?tag=NAME is understood", 2)
    return base, values["tag"][-1]


def _is_registry_host(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost"


def normalize_import_ref(ref: str, *, cwd: str | None = None) -> str:
    """The URL to send for a user REF: registry refs become `docker://REGISTRY/PATH:TAG`
    (Docker Hub: `library/` for single names, `:latest` when no tag or digest); local
    schemes pass through with a relative path made absolute against `cwd`."""
    ref = ref.strip()
    if not ref:
        raise CliError("Empty image reference", 2)
    if ref.startswith(LOCAL_IMPORT_SCHEMES):
        scheme, _, rest = ref.partition(":")
        if not rest:
            raise CliError(f"Invalid image reference '{ref}': {scheme}: needs a path", 2)
        if not rest.startswith("/"):
            rest = os.path.join(cwd or os.getcwd(), rest)
        return f"{scheme}:{rest}"
    if ref == "busybox:" or ref.startswith("debootstrap:"):
        return ref  # the local server's built-in bases
    name = ref[len("docker://"):] if ref.startswith("docker://") else ref
    if "://" in name:
        raise CliError(
            f"Invalid image reference '{ref}': use docker://, oci:, oci-archive: or "
            "docker-archive:", 2,
        )
    name, at, digest = name.partition("@")
    tag = ""
    slash, colon = name.rfind("/"), name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    first, sep, rest = name.partition("/")
    if sep and _is_registry_host(first):
        registry, path = first, rest
    else:
        registry, path = DOCKER_HUB, name
    if not path:
        raise CliError(f"Invalid image reference '{ref}': no image name", 2)
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not tag and not at:
        tag = "latest"
    return f"docker://{registry}/{path}" + (f":{tag}" if tag else "") + (f"@{digest}" if at else "")


def derive_import_tag(url: str) -> str | None:
    """The tag an import gets when none is given: a registry URL without its scheme,
    registry host, `library/` and digest (`ubuntu:24.04`); None for other URLs."""
    if not url.startswith("docker://"):
        return None
    name = url[len("docker://"):].partition("@")[0]
    first, sep, rest = name.partition("/")
    if sep and _is_registry_host(first):
        name = rest
    if name.startswith("library/"):
        name = name[len("library/"):]
    return name or None


def _read_password(username: str) -> str:
    """Prompt for the registry password (stdin a tty), else read one line from stdin."""
    import getpass

    if sys.stdin is not None and sys.stdin.isatty():
        try:
            return getpass.getpass(f"Password for {username}: ")
        except EOFError:
            raise CliError("No password given", 2) from None
    line = sys.stdin.readline() if sys.stdin is not None else ""
    password = line.rstrip("\r\n")
    if not password:
        raise CliError("--username needs a password: use the prompt (a terminal), "
                       "--password, or pipe it on stdin", 2)
    return password


def cmd_images_import(ctx: Context, args: argparse.Namespace) -> int:
    from contree_shell.client.errors import ApiError
    from contree_shell.output import emit_rows, error, info, warn

    planned: list[tuple[str, str, str | None]] = []  # (ref as typed, url, tag)
    for typed in args.refs:
        for ref in expand_braces(typed):
            base, tag = split_tag_query(ref)
            url = normalize_import_ref(base)
            planned.append((ref, url, tag or derive_import_tag(url)))
    if args.tag is not None:
        if len(planned) != 1:
            raise CliError("--tag needs exactly one REF (use REF?tag=NAME for several)", 2)
        planned[0] = (planned[0][0], planned[0][1], args.tag)
    if args.password is not None and args.username is None:
        raise CliError("--password needs --username", 2)
    password = args.password
    if args.username is not None and password is None:
        password = _read_password(args.username)
    if ctx.profile.type != "local" and any(u.startswith(LOCAL_IMPORT_SCHEMES) for _, u, _ in planned):
        warn("Local image paths are read on the server's host, not on this machine")

    client = ctx.client
    started: list[tuple[str, str, str | None]] = []  # (op, url, tag)
    rows: list[dict[str, Any]] = []
    failed = False
    try:
        for _, url, tag in planned:
            try:
                op = client.import_image(url, tag, username=args.username, password=password,
                                         timeout=args.timeout)
            except ApiError as exc:
                error(f"Import of {url} not started: {exc.error or exc.message}")
                rows.append({"uuid": "", "status": "FAILED", "registry_url": url,
                             "image": "", "tag": tag or ""})
                failed = True
                continue
            info(f"Importing {url}" + (f" as {tag}" if tag else "") + f" (operation {op})")
            started.append((op, url, tag))
        many = len(started) > 1
        for op, url, tag in started:
            record = follow_import(ctx, op, prefix=f"[{tag or url}] " if many else "")
            status = str(record.get("status") or "")
            result = record.get("result") or {}
            image = record.get("result_image_uuid") or result.get("image") or ""
            if status != "SUCCESS":
                failed = True
                error(f"Import of {url} ended with status {status or 'unknown'}"
                      + (f": {record['error']}" if record.get("error") else ""))
            rows.append({"uuid": op, "status": status, "registry_url": url,
                         "image": image, "tag": result.get("tag") or tag or ""})
    except KeyboardInterrupt:
        pending = [op for op, _, _ in started if op not in {r["uuid"] for r in rows}]
        n = _cancel_quietly(ctx, pending)
        if n:
            info(f"Cancelled {n} import{'s' if n != 1 else ''}")
        raise
    emit_rows(rows, ctx.output_format)
    return 1 if failed else 0

