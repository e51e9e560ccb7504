"""OCI / Docker image manifests: media types, platform selection, image config.

Pure functions over parsed JSON, shared by the registry client and the local layout
readers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from contree_shell.sandbox.oci_layers import ImportFailed

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))

CONFIG_TYPES = (
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
)

LAYER_COMPRESSION: dict[str, str | None] = {
    "application/vnd.oci.image.layer.v1.tar": None,
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": None,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": None,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}

DIGEST_RE = re.compile(r"^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")

# os.uname().machine → GOARCH (and variant) as used in image indexes.
_MACHINE_TO_GOARCH: dict[str, tuple[str, str | None]] = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i686": ("386", None),
    "i386": ("386", None),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return f"{base}/{self.variant}" if self.variant else base


def host_platform() -> Platform:
    """linux + the GOARCH name of this machine."""
    machine = os.uname().machine
    arch, variant = _MACHINE_TO_GOARCH.get(machine, (machine, None))
    return Platform("linux", arch, variant)


def platform_from(value: tuple[str, str] | None) -> Platform:
    """``("linux", "arm64")`` or ``("linux", "arm/v7")`` → Platform; None → the host's."""
    if value is None:
        return host_platform()
    os_name, arch = value
    arch, _, variant = arch.partition("/")
    return Platform(os_name, arch, variant or None)


def check_digest(value: Any, what: str) -> str:
    """A descriptor digest, validated (it becomes a file name in layouts)."""
    if not isinstance(value, str) or not DIGEST_RE.match(value):
        raise ImportFailed(f"invalid digest in {what}: {value!r}")
    return value


def media_type_of(doc: Any, header: str | None = None) -> str:
    """The manifest media type: Content-Type first, then the body's ``mediaType``."""
    header = (header or "").split(";")[0].strip()
    if header in INDEX_TYPES or header in MANIFEST_TYPES:
        return header
    if isinstance(doc, dict):
        mt = doc.get("mediaType")
        if isinstance(mt, str) and mt:
            return mt
        # OCI allows mediaType to be absent; tell the two kinds apart by shape.
        if isinstance(doc.get("manifests"), list):
            return OCI_INDEX
        if isinstance(doc.get("layers"), list):
            return OCI_MANIFEST
        if doc.get("schemaVersion") == 1:
            return "application/vnd.docker.distribution.manifest.v1+json"
    return header or "unknown"


def _variant_rank(want: Platform, got: str | None) -> int:
    """Lower is better: exact variant, then a missing one, then (arm64 only) any."""
    if got == want.variant:
        return 0
    if got is None or want.variant is None:
        return 1
    return 9


def select_from_index(index: dict[str, Any], want: Platform, ref: str) -> dict[str, Any]:
    """The manifest descriptor of ``index`` for ``want``; ImportFailed listing the others."""
    manifests = index.get("manifests")
    if not isinstance(manifests, list) or not manifests:
        raise ImportFailed(f"{ref}: the image index lists no manifests")
    best: tuple[int, dict[str, Any]] | None = None
    seen: list[str] = []
    for desc in manifests:
        if not isinstance(desc, dict):
            continue
        plat = desc.get("platform")
        if not isinstance(plat, dict):
            continue
        p_os, p_arch, p_var = plat.get("os"), plat.get("architecture"), plat.get("variant")
        if p_os == "unknown" or p_arch == "unknown":
            continue  # attestation manifests (buildx provenance, SBOM)
        seen.append("/".join(str(x) for x in (p_os, p_arch, p_var) if x))
        if p_os != want.os or p_arch != want.architecture:
            continue
        rank = _variant_rank(want, p_var if isinstance(p_var, str) else None)
        if rank < 9 and (best is None or rank < best[0]):
            best = (rank, desc)
    if best is None:
        available = ", ".join(sorted(set(seen))) or "none"
        raise ImportFailed(f"{ref}: no image for {want} (available: {available})")
    return best[1]


def layer_compression(desc: dict[str, Any]) -> str | None:
    """Compression of a layer descriptor; ImportFailed for unknown layer media types."""
    mt = desc.get("mediaType")
    if mt not in LAYER_COMPRESSION:
        raise ImportFailed(f"unsupported layer media type: {mt}")
    return LAYER_COMPRESSION[mt]


def check_image_manifest(manifest: Any, ref: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(config descriptor, layer descriptors) of an image manifest, validated."""
    if not isinstance(manifest, dict):
        raise ImportFailed(f"{ref}: malformed manifest")
    config = manifest.get("config")
    layers = manifest.get("layers")
    if not isinstance(config, dict) or not isinstance(layers, list):
        raise ImportFailed(f"{ref}: malformed manifest (no config or layers)")
    ctype = config.get("mediaType")
    if ctype not in CONFIG_TYPES:
        raise ImportFailed(f"{ref}: not a container image (config media type {ctype})")
    check_digest(config.get("digest"), f"{ref} config")
    out: list[dict[str, Any]] = []
    for desc in layers:
        if not isinstance(desc, dict):
            raise ImportFailed(f"{ref}: malformed layer descriptor")
        check_digest(desc.get("digest"), f"{ref} layer")
        layer_compression(desc)
        out.append(desc)
    return config, out


def image_config(doc: Any) -> dict[str, Any]:
    """The parts of an image config we keep: ``{"env", "workdir", "user"}``."""
    if not isinstance(doc, dict):
        raise ImportFailed("malformed image config")
    cfg = doc.get("config") or doc.get("container_config") or {}
    if not isinstance(cfg, dict):
        cfg = {}
    env: dict[str, str] = {}
    for item in cfg.get("Env") or []:
        if isinstance(item, str):
            key, sep, value = item.partition("=")
            if key:
                env[key] = value if sep else ""
    workdir = cfg.get("WorkingDir")
    user = cfg.get("User")
    return {
        "env": env,
        "workdir": workdir if isinstance(workdir, str) and workdir else None,
        "user": user if isinstance(user, str) and user else None,
    }


def diff_ids(doc: Any) -> list[str] | None:
    """``rootfs.diff_ids`` of an image config, or None when absent or malformed."""
    if not isinstance(doc, dict):
        return None
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict):
        return None
    ids = rootfs.get("diff_ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) and DIGEST_RE.match(i) for i in ids):
        return None
    return list(ids)


def resolve_image_manifest(
    fetch: Callable[[str], tuple[bytes, str | None]],
    data: bytes,
    content_type: str | None,
    want: Platform,
    ref: str,
) -> tuple[str, dict[str, Any]]:
    """Follow indexes down to the image manifest for ``want``.

    ``data``/``content_type`` is the first document (manifest or index); ``fetch(digest)``
    returns another one, already verified against its digest. Returns the image
    manifest's digest and body.
    """
    for _ in range(4):  # an index may point at another index; more is a loop
        doc = _json(data, f"{ref}: manifest")
        mt = media_type_of(doc, content_type)
        if mt in INDEX_TYPES:
            desc = select_from_index(doc, want, ref)
            digest = check_digest(desc.get("digest"), f"{ref} index")
            data, content_type = fetch(digest)
            continue
        if mt in MANIFEST_TYPES:
            return "sha256:" + hashlib.sha256(data).hexdigest(), doc
        raise ImportFailed(f"{ref}: unsupported manifest media type {mt}")
    raise ImportFailed(f"{ref}: image indexes nested too deeply")


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        raise ImportFailed(f"{what} is not valid JSON") from None


def load_json(data: bytes, what: str) -> Any:
    """JSON from a manifest/config blob; ImportFailed when it is not JSON."""
    return _json(data, what)
