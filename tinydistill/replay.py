"""Does this store match this run? Every rule in one place.

- :func:`view_store_attrs`: what a new store records about its views (data, view format,
  renderer, replay canary); :func:`tinydistill.generate.create_view_store` writes it.
- :func:`check_replay`: refuse to replay a store whose data, spec, view format or rendered
  canary views no longer match what the teacher saw.
- :func:`run_mismatch`: what differs between an existing store and a gen-logits run that
  would resume it.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from .augment import AugSpec
from .errors import TinydistillError
from .sources import Source
from .views import RENDERER, VIEW_FORMAT, ReplayError, render_views


def canary_views(num_rows: int, epochs: int) -> list[tuple[int, int]]:
    """A few fixed views spread over the store: first and last epoch, start and middle rows."""
    cand = [(0, 0), (0, num_rows // 2), (epochs - 1, min(1, num_rows - 1)), (epochs - 1, num_rows - 1)]
    return sorted(set(cand))


def views_digest(views: Sequence[dict]) -> str:
    """sha256 over the exact pixels (float32 bytes), mix partners and lambdas of views."""
    h = hashlib.sha256()
    for v in views:
        h.update(np.ascontiguousarray(v["image"].numpy(), dtype=np.float32).tobytes())
        h.update(f"{v['epoch']},{v['row']},{v['partner']},{v['lam']!r},{v['valid']}".encode())
    return h.hexdigest()


def make_canary(source: Source, spec: AugSpec, base_seed: int, epochs: int) -> dict:
    """The canary record a new store keeps: which views, and the digest of their pixels."""
    views = canary_views(len(source), epochs)
    return {"views": [list(v) for v in views],
            "digest": views_digest(render_views(source, spec, base_seed, views, skip_bad=True))}


def store_spec(store) -> AugSpec:
    """The store's augmentation spec, checked against its hash and its view format."""
    attrs = store.attrs
    fmt = int(attrs.get("view_format", 1))
    if fmt != VIEW_FORMAT:
        raise ReplayError(
            f"{store.path}: its views are of view format {fmt} (timm transforms under reseeded global RNGs, "
            f"tinydistill < 0.2); this tinydistill renders view format {VIEW_FORMAT} (parameter records) and "
            "cannot replay them: regenerate the store with gen-logits (its teacher outputs stay readable)")
    try:
        spec = AugSpec.from_dict(attrs.get("augmentation", {}), source=f"{store.path} augmentation")
    except TinydistillError as e:
        raise ReplayError(str(e)) from e
    if spec.hash != attrs.get("spec_hash"):
        raise ReplayError(f"{store.path}: stored augmentation does not match its hash "
                          f"({spec.hash[:12]} != {str(attrs.get('spec_hash'))[:12]})")
    return spec


def check_replay(store, source: Source) -> AugSpec:
    """Refuse to replay a store whose data, spec or rendered canary views no longer match.

    Returns the store's augmentation spec for the caller to render with.
    """
    from ._util import library_versions

    attrs = store.attrs
    if source.fingerprint != attrs.get("dataset_fingerprint"):
        keys = list(store.keys)
        if len(keys) != len(source):
            why = f"{len(source)} samples, the store has {len(keys)}"
        else:
            i = next((i for i, (a, b) in enumerate(zip(keys, source.keys)) if a != b), None)
            why = f"row {i} is {source.keys[i]!r}, the store has {keys[i]!r}" if i is not None else "keys differ"
        raise ReplayError(f"{store.path}: data {source.name} is not the data the store was made from ({why})")
    spec = store_spec(store)
    canary = attrs.get("canary")
    if not canary:
        raise ReplayError(f"{store.path}: store has no replay canary; it cannot be checked for replay")
    views = [tuple(v) for v in canary["views"]]
    digest = views_digest(render_views(source, spec, store.base_seed, views, skip_bad=True))
    if digest != canary["digest"]:
        then, now = attrs.get("versions", {}), library_versions()
        diff = [f"{k} {then.get(k)} -> {now.get(k)}" for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]
        raise ReplayError(
            f"{store.path}: replayed canary views differ from what the teacher saw (spec {spec.hash[:12]}); "
            + (f"library versions differ: {', '.join(diff)}" if diff else "same library versions: the view code or data changed")
        )
    return spec


def run_mismatch(store, *, out: str, teacher, k: int, spec: AugSpec, source: Source, seed: int,
                 epochs: tuple[int, int], total_epochs: int | None) -> str | None:
    """Why a gen-logits run cannot resume ``store`` (a one-line message), or None."""
    a = store.attrs
    t = a.get("teacher", {})
    checks = [
        ("view format", int(a.get("view_format", 1)), VIEW_FORMAT),
        ("teacher", t.get("name"), teacher.name),
        ("teacher weights", t.get("weights_digest"), teacher.weights_digest),
        ("K", a.get("k"), k),
        ("num_classes", a.get("num_classes"), teacher.num_classes),
        ("augmentation spec hash", a.get("spec_hash"), spec.hash),
        ("dataset fingerprint", a.get("dataset_fingerprint"), source.fingerprint),
        ("seed", a.get("base_seed"), seed),
    ]
    if total_epochs is not None:
        checks.append(("total epochs", a.get("epochs"), total_epochs))
    for what, old, new in checks:
        if old != new:
            short = (lambda v: v[:16] + "..." if isinstance(v, str) and len(v) > 19 else v)
            return (f"{out}: existing store has {what} {short(old)!r}, this run has {short(new)!r}; "
                    "pass --overwrite to replace it, or another --out")
    if epochs[1] > store.epochs:
        return f"{out}: store holds {store.epochs} epochs, --epochs asks for up to {epochs[1]}"
    return None


def view_store_attrs(source: Source, spec: AugSpec, base_seed: int, epochs: int) -> dict:
    """Attributes a new store keeps so that replay can check itself later."""
    return {"data": source.name, "view_format": VIEW_FORMAT, "renderer": RENDERER,
            "canary": make_canary(source, spec, base_seed, epochs)}
