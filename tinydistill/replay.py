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

import numpy as np

from .kinds import views_hash
from .augment import AugSpec
from .errors import TinydistillError
from .sources import Source
from .batch import Batch
from .views import VIEW_FORMAT, ReplayError, render_views, resolve_decode


def canary_views(num_rows: int, epochs: int) -> list[tuple[int, int]]:
    """A few fixed views spread over the store: first and last epoch, start and middle rows."""
    cand = [(0, 0), (0, num_rows // 2), (epochs - 1, min(1, num_rows - 1)), (epochs - 1, num_rows - 1)]
    return sorted(set(cand))


def views_digest(views: Batch) -> str:
    """sha256 over the exact pixels (float32 bytes), mix partners and lambdas of views."""
    h = hashlib.sha256()
    for i in range(len(views)):
        h.update(np.ascontiguousarray(views.image[i].numpy(), dtype=np.float32).tobytes())
        h.update(f"{int(views.epoch[i])},{int(views.row[i])},{int(views.partner[i])},{float(views.lam[i])!r},"
                 f"{bool(views.valid[i])}".encode())
    return h.hexdigest()


def make_canary(source: Source, spec: AugSpec, base_seed: int, epochs: int, device="cpu",
                decode="auto") -> tuple[dict, np.ndarray]:
    """The canary a new store keeps: which views, the digest of their pixels (exact replay),
    and the pixels themselves as float16 (to measure how far another renderer or device is)."""
    views = canary_views(len(source), epochs)
    rendered = render_views(source, spec, base_seed, views, skip_bad=True, device=device, decode=decode)
    pixels = rendered.image.numpy().astype(np.float16)
    return {"views": [list(v) for v in views], "digest": views_digest(rendered)}, pixels


def device_name(device) -> str:
    """What the canary was rendered on: "cpu", or the GPU's model name."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return "cuda:" + torch.cuda.get_device_name(device)
    return device.type


def decoded_on(spec: AugSpec, device, decode="auto") -> str:
    """Where a run's JPEGs are decoded (:func:`device_name`): the run's device under ``decode``
    device with the torch renderer, else the CPU. The two decoders are the same function on
    the CPU; on CUDA (nvjpeg against libjpeg-turbo) their pixels may differ slightly."""
    torch_dev = spec.renderer == "torch" and resolve_decode(decode, device) == "device"
    return device_name(device) if torch_dev else "cpu"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of pixel arrays in [0, 1] (inf when equal)."""
    mse = float(np.mean((np.clip(a.astype(np.float64), 0, 1) - np.clip(b.astype(np.float64), 0, 1)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def store_spec(store) -> AugSpec:
    """The store's augmentation spec, checked against its hash and its view format."""
    attrs = store.attrs
    fmt = int(attrs.get("view_format", 1))
    if fmt != VIEW_FORMAT:
        raise ReplayError(
            f"{store.path}: its views are of view format {fmt} (timm transforms under reseeded global RNGs, "
            f"tinydistill < 0.2); this tinydistill renders view format {VIEW_FORMAT} (parameter records) and "
            "cannot replay them: regenerate the store with gen-logits (its teacher outputs stay readable)")
    stored = attrs.get("augmentation", {})
    got = views_hash(stored, attrs.get("targets", {}))
    if got != attrs.get("spec_hash"):  # the recorded spec (or target kinds) was edited
        raise ReplayError(f"{store.path}: stored augmentation and target kinds do not match their hash "
                          f"({got[:12]} != {str(attrs.get('spec_hash'))[:12]})")
    try:  # fields added to AugSpec since the store was made take their defaults
        return AugSpec.from_dict(stored, source=f"{store.path} augmentation")
    except TinydistillError as e:
        raise ReplayError(str(e)) from e


def check_replay(store, source: Source, renderer: str | None = None, allow_renderer_change: bool = False,
                 device="cpu", decode="auto") -> AugSpec:
    """Refuse to replay a store whose data, spec or rendered canary views no longer match.

    Returns the spec to render with: the store's, or with ``renderer`` in place of the
    store's renderer. Another renderer needs ``allow_renderer_change``; its pixel difference
    from the canary (PSNR) is then logged instead of refused. The store's own renderer must
    reproduce the canary exactly, except on another kind of device than the one that made the
    store (the torch renderer on another GPU model, or on the CPU), or with its JPEGs decoded
    on another device (``decode``: nvjpeg against the CPU's decoder), where the difference is
    logged and refused below 30 dB.
    """
    import dataclasses
    import logging

    from ._util import library_versions

    log = logging.getLogger("tinydistill")
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
    other = renderer is not None and renderer != spec.renderer
    if other and not allow_renderer_change:
        raise ReplayError(f"{store.path}: its views were rendered by the {spec.renderer} renderer; replaying them with "
                          f"--render {renderer} needs --allow-renderer-change (pixels will differ slightly)")
    use = dataclasses.replace(spec, renderer=renderer) if other else spec
    rendered = render_views(source, use, store.base_seed, views, skip_bad=True, device=device, decode=decode)
    made_on, here = attrs.get("render_device", "cpu"), device_name(device)
    jpegs_then = attrs.get("decode_device", made_on)  # stores before --decode: on the render device
    jpegs_now = decoded_on(use, device, decode)
    if not other and views_digest(rendered) == canary["digest"]:
        return spec
    if not other and (spec.renderer == "pil" or (made_on == here and jpegs_then == jpegs_now)):
        then, now = attrs.get("versions", {}), library_versions()
        diff = [f"{k} {then.get(k)} -> {now.get(k)}" for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]
        raise ReplayError(
            f"{store.path}: replayed canary views differ from what the teacher saw (spec {spec.hash[:12]}); "
            + (f"library versions differ: {', '.join(diff)}" if diff else "same library versions: the view code or data changed")
        )
    ref = store.canary_pixels()
    if ref is None:
        raise ReplayError(f"{store.path}: has no canary pixels to compare another renderer or device with")
    got = rendered.image.numpy()
    db = psnr(got, ref)
    what = (f"the {renderer} renderer on {here}" if other else f"the {spec.renderer} renderer on {here}, JPEGs "
            f"decoded on {jpegs_now} (the store was rendered on {made_on}, its JPEGs decoded on {jpegs_then})")
    if not other and db < 30:
        raise ReplayError(f"{store.path}: canary views rendered by {what} are {db:.1f} dB from the stored ones "
                          "(below 30 dB): refusing to replay")
    log.warning("%s: canary views rendered by %s differ from the stored ones: PSNR %.1f dB, max |diff| %.4f",
                store.path, what, db, float(np.abs(got - ref).max()))
    return use


def run_mismatch(store, *, out: str, teacher, k: int, spec: AugSpec, source: Source, seed: int,
                 epochs: tuple[int, int], total_epochs: int | None, attention_grid: int = 0) -> str | None:
    """Why a gen-logits run cannot resume ``store`` (a one-line message), or None."""
    a = store.attrs
    t = a.get("teacher", {})
    checks = [
        ("view format", int(a.get("view_format", 1)), VIEW_FORMAT),
        ("teacher", t.get("name"), teacher.name),
        ("teacher weights", t.get("weights_digest"), teacher.weights_digest),
        ("teacher amp", t.get("amp", teacher.meta.get("amp")), teacher.meta.get("amp")),
        ("teacher compile", bool(t.get("compile", False)), bool(teacher.meta.get("compile", False))),
        ("K", a.get("k"), k),
        ("attention grid", int((a.get("targets") or {}).get("attention", {}).get("grid", 0)), int(attention_grid)),
        ("num_classes", a.get("num_classes"), teacher.num_classes),
        ("augmentation spec hash", AugSpec.from_dict(a.get("augmentation", {})).hash, spec.hash),
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


def view_store_attrs(source: Source, spec: AugSpec, base_seed: int, epochs: int, device="cpu",
                     decode="auto") -> tuple[dict, dict]:
    """What a new store keeps so that replay can check itself later: attributes (data, view
    format, renderer and the device it ran on, where its JPEGs were decoded, the canary) and
    arrays (the canary's pixels)."""
    canary, pixels = make_canary(source, spec, base_seed, epochs, device, decode)
    attrs = {"data": source.name, "view_format": VIEW_FORMAT, "renderer": spec.renderer,
             "render_device": device_name(device) if spec.renderer == "torch" else "cpu",
             "decode_device": decoded_on(spec, device, decode), "canary": canary}
    return attrs, {"canary_pixels": (pixels, ("view", "channel", "y", "x"))}
