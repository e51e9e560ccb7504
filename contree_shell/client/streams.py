"""Stream values on the wire (`StreamRepr`): printable ASCII as text, anything else base64."""

from __future__ import annotations

import base64
import binascii
from typing import Any

__all__ = ["decode_stream", "encode_stream", "stdin_repr"]

# Bytes that may travel as `ascii`: printable 32..126 plus TAB, LF, CR (api-semantics §3.3).
_ASCII_OK = frozenset(range(32, 127)) | {9, 10, 13}


def encode_stream(data: bytes) -> tuple[str, str]:
    """(value, encoding) for `data`: `ascii` when every byte is printable, else `base64`."""
    if all(b in _ASCII_OK for b in data):
        return data.decode("ascii"), "ascii"
    return base64.b64encode(data).decode("ascii"), "base64"


def stdin_repr(data: bytes, *, close: bool) -> dict[str, Any]:
    """A `ClosableStreamRepr` for a stdin write or the spawn payload."""
    value, encoding = encode_stream(data)
    return {"value": value, "encoding": encoding, "close": close}


def decode_stream(repr_: dict[str, Any]) -> bytes:
    """The raw bytes of a `StreamRepr` (event data or result stream)."""
    value = repr_.get("value") or ""
    if repr_.get("encoding") == "base64":
        try:
            return base64.b64decode(value)
        except (binascii.Error, ValueError):
            return value.encode("utf-8", "replace")
    return value.encode("utf-8", "surrogateescape")
