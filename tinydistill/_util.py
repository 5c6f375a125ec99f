"""Small helpers shared by the store and the CLI: canonical JSON, hashing, library versions."""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from typing import Any, Iterable


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal specs hash equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def spec_hash(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def keys_fingerprint(keys: Iterable[str]) -> str:
    """Hash of the ordered sample keys: any added, dropped or reordered sample changes it."""
    h = hashlib.sha256()
    for k in keys:
        b = str(k).encode()
        h.update(len(b).to_bytes(4, "little"))
        h.update(b)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour decides what a replayed view looks like."""
    out = {}
    for dist in ("tinydistill", "torch", "torchvision", "timm", "pillow", "numpy", "zarr"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out
