"""Import OCI/Docker images as overlay layers: the one entry point the server uses.

``import_reference`` resolves a reference (a registry, an OCI layout directory or tar,
or a ``docker save`` tar) to the image for this host's platform, then converts each layer
tar into an overlay upper-format directory under ``workdir``, bottom to top, with no
flattening. Every user-caused failure is an ``ImportFailed`` with a one-line message.

This module and its ``oci_*`` parts import nothing else from contree_shell.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import httpx

from contree_shell.sandbox.oci_layers import ImportFailed, convert_layer
from contree_shell.sandbox.oci_local import LayerRef, LocalSource, Plan
from contree_shell.sandbox.oci_manifest import (
    Platform,
    check_image_manifest,
    diff_ids,
    image_config,
    layer_compression,
    load_json,
    platform_from,
    resolve_image_manifest,
)
from contree_shell.sandbox.oci_registry import (
    DockerRef,
    RegistryClient,
    human_mb,
    parse_docker_reference,
    short_digest,
)

__all__ = [
    "ImportFailed",
    "PulledImage",
    "convert_layer",
    "import_reference",
    "normalize_reference",
]

SCHEMES = ("docker://", "oci:", "oci-archive:", "docker-archive:")


@dataclass
class PulledImage:
    """An imported image: layer directories ready to move into the store."""

    layers: list[Path]  # converted overlay-format layer dirs, bottom..top, under workdir
    config: dict[str, Any]  # {"env": {K: V}, "workdir": str | None, "user": str | None}
    digest: str  # image manifest digest (docker-archive: config digest)
    source: str  # normalised reference


class _Source(Protocol):
    source: str

    def resolve(self, want: Platform) -> Plan: ...

    def open_layer(self, layer: LayerRef) -> Any: ...

    def close(self) -> None: ...


class _RegistrySource:
    """A registry image; layers are downloaded (verified) before conversion."""

    def __init__(
        self,
        ref: DockerRef,
        blobs: Path,
        *,
        credentials: tuple[str, str] | None,
        progress: Callable[[str], None],
        transport: httpx.BaseTransport | None,
    ) -> None:
        self.ref = ref
        self.source = ref.source
        self.blobs = blobs
        self.progress = progress
        self.client = RegistryClient(ref, credentials=credentials, transport=transport)

    def close(self) -> None:
        self.client.close()

    def resolve(self, want: Platform) -> Plan:
        self.client.ping()
        data, ctype = self.client.manifest(self.ref.reference)
        digest, manifest = resolve_image_manifest(
            self.client.manifest, data, ctype, want, self.source
        )
        config_desc, layer_descs = check_image_manifest(manifest, self.source)
        config_doc = load_json(self.client.blob_bytes(config_desc["digest"]), "image config")
        ids = diff_ids(config_doc)
        if ids is not None and len(ids) != len(layer_descs):
            raise ImportFailed(f"{self.source}: config and manifest disagree on the layers")
        plan = Plan(digest=digest, config=image_config(config_doc))
        for i, desc in enumerate(layer_descs):
            size = desc.get("size")
            plan.layers.append(
                LayerRef(
                    label=desc["digest"],
                    key=desc["digest"],
                    compression=layer_compression(desc),
                    digest=desc["digest"],
                    diff_id=ids[i] if ids else None,
                    size=size if isinstance(size, int) else None,
                )
            )
        return plan

    @contextmanager
    def open_layer(self, layer: LayerRef) -> Iterator[IO[bytes]]:
        self.blobs.mkdir(parents=True, exist_ok=True)
        path = self.blobs / layer.key.replace(":", "-")
        self.client.download(layer.key, path, size=layer.size, progress=self.progress)
        try:
            with open(path, "rb") as f:
                yield f
        finally:
            path.unlink(missing_ok=True)


def normalize_reference(url: str) -> str:
    """The canonical form of a reference (Docker Hub defaults filled in); ImportFailed
    for an unknown scheme or a malformed reference. Local paths are made absolute."""
    url = url.strip()
    if url.startswith("docker://"):
        return parse_docker_reference(url).source
    if url.startswith(("oci:", "oci-archive:", "docker-archive:")):
        src = LocalSource(url)
        src.close()
        return src.source
    raise ImportFailed(
        f"unsupported image URL: {url} (use docker://, oci:, oci-archive: or docker-archive:)"
    )


def import_reference(
    url: str,
    workdir: Path,
    *,
    credentials: tuple[str, str] | None = None,
    progress: Callable[[str], None] = lambda s: None,
    platform: tuple[str, str] | None = None,
    transport: httpx.BaseTransport | None = None,
) -> PulledImage:
    """Pull ``url`` and convert its layers into ``workdir/layers/NNN`` (bottom..top).

    Schemes: ``docker://REGISTRY/NAME[:TAG|@sha256:…]`` (Docker Hub short names allowed),
    ``oci:DIR[:TAG]``, ``oci-archive:FILE[:TAG]``, ``docker-archive:FILE[:NAME:TAG]``.
    ``platform`` is ``(os, arch)`` with an optional ``/variant`` on arch, default the
    host's. ``progress`` receives one-line status messages; an exception it raises aborts
    the import (the server's cancellation hook). ``transport`` is for tests. On any
    failure the layer directories created here are removed and the exception propagates
    (ImportFailed for everything the user can cause).
    """
    url = url.strip()
    want = platform_from(platform)
    workdir.mkdir(parents=True, exist_ok=True)
    layers_root = workdir / "layers"
    blobs = workdir / ".blobs"
    source: _Source
    if url.startswith("docker://"):
        ref = parse_docker_reference(url)
        source = _RegistrySource(
            ref, blobs, credentials=credentials, progress=progress, transport=transport
        )
    elif url.startswith(("oci:", "oci-archive:", "docker-archive:")):
        source = LocalSource(url)
    else:
        raise ImportFailed(
            f"unsupported image URL: {url} (use docker://, oci:, oci-archive: or docker-archive:)"
        )
    try:
        progress(f"resolving {source.source} for {want}")
        plan = source.resolve(want)
        n = len(plan.layers)
        progress(f"image {short_digest(plan.digest)}: {n} layer{'s' if n != 1 else ''}")
        out: list[Path] = []
        layers_root.mkdir(exist_ok=True)
        for i, layer in enumerate(plan.layers):
            dest = layers_root / f"{i:03d}"
            if dest.exists():
                shutil.rmtree(dest)
            out.append(dest)
            with source.open_layer(layer) as stream:
                written = convert_layer(
                    stream, dest, compression=layer.compression, diff_id=layer.diff_id
                )
            progress(
                f"layer {i + 1}/{n} {short_digest(layer.label)} done ({human_mb(written)} unpacked)"
            )
        return PulledImage(layers=out, config=plan.config, digest=plan.digest, source=source.source)
    except BaseException:
        shutil.rmtree(layers_root, ignore_errors=True)
        raise
    finally:
        source.close()
        shutil.rmtree(blobs, ignore_errors=True)
