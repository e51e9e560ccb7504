"""`UUID_OR_REF` arguments: operation UUIDs or history references of the session.

`HEAD`, `@N`, `@-N`, `HEAD~N`, `@+N` … (see `state.sessions.parse_ref`) name history
entries; the entry's operation is used. One argument holding whitespace is split, so
`contree kill "$UUIDS"` works. Every bad token is reported together.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from contree_shell.cli.errors import CliError

if TYPE_CHECKING:
    from contree_shell.cli.context import Context

__all__ = ["resolve_operation_refs", "split_tokens"]


def split_tokens(values: Iterable[str]) -> list[str]:
    """Arguments split on whitespace, empty ones dropped."""
    return [tok for value in values for tok in value.split()]


def _is_uuid(text: str) -> bool:
    from contree_shell.client.api import is_uuid

    return is_uuid(text)


def resolve_operation_refs(ctx: Context, values: Iterable[str]) -> list[str]:
    """Operation UUIDs for the given UUIDs / history references (in order, deduplicated).

    Raises one CliError naming every token that could not be resolved.
    """
    out: list[str] = []
    bad: list[str] = []
    for tok in split_tokens(values):
        if _is_uuid(tok):
            op = tok.lower()
        else:
            try:
                node = ctx.store.resolve_ref(ctx.session_key, tok)
            except Exception as exc:  # StateError: bad syntax, no such entry, no session
                message = getattr(exc, "message", None)
                if message is None:
                    raise
                bad.append(f"{tok}: {message}")
                continue
            if not node.operation_uuid:
                bad.append(f"{tok}: History entry {node.id} has no operation UUID")
                continue
            op = node.operation_uuid
        if op not in out:
            out.append(op)
    if bad:
        plural = "s" if len(bad) > 1 else ""
        raise CliError(f"Invalid operation reference{plural}: " + "; ".join(bad))
    return out
