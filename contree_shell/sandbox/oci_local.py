"""Images on local disk: OCI layout directories, OCI layout tars, ``docker save`` tars.

Each reader answers the same two questions as the registry client: which layers (and
config) make up the image, and a verified byte stream for each layer. Blob names come
only from validated digests, and archive members must be plain files, so a crafted
``index.json`` or ``manifest.json`` cannot read outside the layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from contree_shell.sandbox.oci_layers import HashingReader, ImportFailed, normalize_member_name
from contree_shell.sandbox.oci_manifest import (
    DIGEST_RE,
    Platform,
    check_digest,
    check_image_manifest,
    diff_ids,
    image_config,
    layer_compression,
    load_json,
    resolve_image_manifest,
)

_REF_NAME = "org.opencontainers.image.ref.name"
_MAX_JSON = 16 << 20


@dataclass
class LayerRef:
    """One layer to convert: where its bytes are and how to check them."""

    label: str  # for progress lines
    key: str  # source-specific location (a digest or an archive member name)
    compression: str | None  # "gzip" | "zstd" | None | "auto"
    digest: str | None = None  # of the stored (possibly compressed) blob
    diff_id: str | None = None  # of the uncompressed tar
    size: int | None = None


@dataclass
class Plan:
    """What an import resolved to, before any layer is fetched."""

    digest: str
    config: dict[str, Any]
    layers: list[LayerRef] = field(default_factory=list)


def split_path_ref(rest: str, scheme: str) -> tuple[Path, str | None]:
    """``PATH[:REF]`` → (path, ref). Paths may contain ':'; the longest existing prefix wins."""
    if not rest:
        raise ImportFailed(f"{scheme}: needs a path")
    if os.path.exists(rest):
        return Path(rest), None
    idx = len(rest)
    while (idx := rest.rfind(":", 0, idx)) > 0:
        if os.path.exists(rest[:idx]):
            return Path(rest[:idx]), rest[idx + 1 :] or None
    raise ImportFailed(f"{scheme}{rest}: no such file or directory")


class _Files:
    """Read-only access to the files of a layout (a directory or a tar)."""

    def open(self, name: str) -> IO[bytes]:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def read(self, name: str, limit: int = _MAX_JSON) -> bytes:
        with self.open(name) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ImportFailed(f"{name} is too large")
        return data

    def close(self) -> None:
        pass


class _DirFiles(_Files):
    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise ImportFailed(f"{root} is not a directory")
        self.root = root

    def _path(self, name: str) -> Path:
        return self.root.joinpath(*normalize_member_name(name))

    def open(self, name: str) -> IO[bytes]:
        try:
            return open(self._path(name), "rb")
        except FileNotFoundError:
            raise ImportFailed(f"{self.root}: missing {name}") from None
        except OSError as exc:
            raise ImportFailed(f"{self.root}: cannot read {name}: {exc.strerror}") from None

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()


class _TarFiles(_Files):
    def __init__(self, path: Path) -> None:
        try:
            self.tar = tarfile.open(path, "r:*")  # noqa: SIM115 (closed by close())
            members = self.tar.getmembers()
        except (OSError, tarfile.TarError, EOFError) as exc:
            raise ImportFailed(f"{path}: not a readable tar archive ({exc})") from None
        self.path = path
        self.members: dict[str, tarfile.TarInfo] = {}
        for m in members:
            try:
                parts = normalize_member_name(m.name)
            except ImportFailed:
                continue  # never addressed: names we look up are always clean
            if m.isreg():
                self.members["/".join(parts)] = m

    def _member(self, name: str) -> tarfile.TarInfo:
        member = self.members.get("/".join(normalize_member_name(name)))
        if member is None:
            raise ImportFailed(f"{self.path}: missing {name}")
        return member

    def open(self, name: str) -> IO[bytes]:
        f = self.tar.extractfile(self._member(name))
        assert f is not None  # regular members always have a file object
        return f

    def exists(self, name: str) -> bool:
        return "/".join(normalize_member_name(name)) in self.members

    def close(self) -> None:
        self.tar.close()


def _blob_name(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    return f"blobs/{algo}/{hexpart}"


class LocalSource:
    """An image inside an OCI layout (dir or tar) or a ``docker save`` tar."""

    def __init__(self, url: str) -> None:
        scheme, _, rest = url.partition(":")
        self.kind = scheme
        self.path, self.ref = split_path_ref(rest, scheme + ":")
        self.path = self.path.resolve()
        self.source = f"{scheme}:{self.path}" + (f":{self.ref}" if self.ref else "")
        self._files: _Files | None = None  # opened on first use: normalising stays cheap

    @property
    def files(self) -> _Files:
        if self._files is None:
            self._files = _DirFiles(self.path) if self.kind == "oci" else _TarFiles(self.path)
        return self._files

    def close(self) -> None:
        if self._files is not None:
            self._files.close()

    # -- resolving ------------------------------------------------------------------

    def _blob(self, digest: str) -> bytes:
        data = self.files.read(_blob_name(digest))
        algo, _, expected = digest.partition(":")
        if hashlib.new(algo, data).hexdigest() != expected:
            raise ImportFailed(f"{self.source}: blob {digest} does not match its digest")
        return data

    def _fetch(self, digest: str) -> tuple[bytes, str | None]:
        return self._blob(digest), None

    def resolve(self, want: Platform) -> Plan:
        if self.kind == "docker-archive":
            return self._resolve_docker()
        return self._resolve_oci(want)

    def _resolve_oci(self, want: Platform) -> Plan:
        if not self.files.exists("oci-layout"):
            raise ImportFailed(f"{self.source}: not an OCI layout (no oci-layout file)")
        index = load_json(self.files.read("index.json"), f"{self.source}: index.json")
        entries = index.get("manifests") if isinstance(index, dict) else None
        if not isinstance(entries, list) or not entries:
            raise ImportFailed(f"{self.source}: index.json lists no images")
        entries = [e for e in entries if isinstance(e, dict)]
        if self.ref is not None:
            chosen = [e for e in entries if (e.get("annotations") or {}).get(_REF_NAME) == self.ref]
            if not chosen:
                names = sorted(
                    {str(n) for e in entries if (n := (e.get("annotations") or {}).get(_REF_NAME))}
                )
                raise ImportFailed(
                    f"{self.source}: no image tagged {self.ref!r} (tags: {', '.join(names) or 'none'})"
                )
            entries = chosen
        elif len(entries) > 1:
            latest = [e for e in entries if (e.get("annotations") or {}).get(_REF_NAME) == "latest"]
            entries = latest or entries
        if len(entries) == 1:
            digest = check_digest(entries[0].get("digest"), f"{self.source} index.json")
            data, ctype = self._blob(digest), entries[0].get("mediaType")
        else:
            # Several untagged entries with platforms: index.json acts as the index.
            data, ctype = json.dumps({"manifests": entries}).encode(), None
            if not all(isinstance(e.get("platform"), dict) for e in entries):
                raise ImportFailed(f"{self.source}: several images; name one with :TAG")
        digest, manifest = resolve_image_manifest(self._fetch, data, ctype, want, self.source)
        config_desc, layer_descs = check_image_manifest(manifest, self.source)
        config_doc = load_json(self._blob(config_desc["digest"]), f"{self.source}: config")
        ids = diff_ids(config_doc)
        if ids is not None and len(ids) != len(layer_descs):
            raise ImportFailed(
                f"{self.source}: config lists {len(ids)} layers, manifest {len(layer_descs)}"
            )
        plan = Plan(digest=digest, config=image_config(config_doc))
        for i, desc in enumerate(layer_descs):
            plan.layers.append(
                LayerRef(
                    label=desc["digest"],
                    key=_blob_name(desc["digest"]),
                    compression=layer_compression(desc),
                    digest=desc["digest"],
                    diff_id=ids[i] if ids else None,
                    size=desc.get("size") if isinstance(desc.get("size"), int) else None,
                )
            )
        return plan

    def _resolve_docker(self) -> Plan:
        if not self.files.exists("manifest.json"):
            raise ImportFailed(f"{self.source}: not a docker save archive (no manifest.json)")
        entries = load_json(self.files.read("manifest.json"), f"{self.source}: manifest.json")
        if not isinstance(entries, list) or not entries:
            raise ImportFailed(f"{self.source}: manifest.json lists no images")
        entries = [e for e in entries if isinstance(e, dict)]
        if self.ref is not None:
            wanted = {self.ref, f"{self.ref}:latest"}
            entries = [e for e in entries if wanted & set(e.get("RepoTags") or [])]
            if not entries:
                raise ImportFailed(f"{self.source}: no image tagged {self.ref!r}")
        if len(entries) != 1:
            tags = sorted({t for e in entries for t in (e.get("RepoTags") or [])})
            raise ImportFailed(
                f"{self.source}: several images; name one with :NAME:TAG ({', '.join(tags)})"
            )
        entry = entries[0]
        config_name, layer_names = entry.get("Config"), entry.get("Layers")
        if not isinstance(config_name, str) or not isinstance(layer_names, list):
            raise ImportFailed(f"{self.source}: malformed manifest.json")
        config_bytes = self.files.read(config_name)
        config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        expected = _digest_from_blob_name(config_name)
        if expected and expected != config_digest:
            raise ImportFailed(f"{self.source}: {config_name} does not match its digest")
        config_doc = load_json(config_bytes, f"{self.source}: {config_name}")
        ids = diff_ids(config_doc)
        if ids is None or len(ids) != len(layer_names):
            raise ImportFailed(f"{self.source}: config and manifest.json disagree on the layers")
        plan = Plan(digest=config_digest, config=image_config(config_doc))
        for name, diff_id in zip(layer_names, ids, strict=True):
            if not isinstance(name, str):
                raise ImportFailed(f"{self.source}: malformed manifest.json")
            plan.layers.append(
                LayerRef(
                    label=diff_id,
                    key=name,
                    compression="auto",
                    digest=_digest_from_blob_name(name),
                    diff_id=diff_id,
                )
            )
        return plan

    # -- layers ---------------------------------------------------------------------

    @contextmanager
    def open_layer(self, layer: LayerRef) -> Iterator[IO[bytes]]:
        """The layer's bytes; the blob digest is checked once the caller read it all."""
        with self.files.open(layer.key) as raw:
            if layer.digest is None:
                yield raw
                return
            hashed = HashingReader(raw, layer.digest.split(":", 1)[0])
            yield hashed  # type: ignore[misc]
            hashed.drain()
            if hashed.digest() != layer.digest:
                raise ImportFailed(f"{self.source}: layer {layer.digest} does not match its digest")


def _digest_from_blob_name(name: str) -> str | None:
    """``blobs/sha256/HEX`` (the newer ``docker save`` layout) → ``sha256:HEX``."""
    parts = name.strip("/").split("/")
    if len(parts) == 3 and parts[0] == "blobs":
        digest = f"{parts[1]}:{parts[2]}"
        if DIGEST_RE.match(digest):
            return digest
    return None
