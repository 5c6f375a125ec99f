"""Parameters from seeds: each view's randomness, drawn once into a small explicit record.

A view (epoch, row) draws everything random about it from its own PCG64 streams
(:mod:`tinydistill.seeds`): stream 0 for the crop, flips, colour jitter, auto-augment ops
and erasing boxes; stream 1 for its mix (partner weight, Mixup or CutMix, the box). The
mix partner itself comes from a seeded pairing of the view's mix group. The result is a
:class:`ViewParams`: plain numbers a renderer turns into pixels (``tinydistill.render_pil``
on CPU workers). Nothing here touches a global RNG, so drawing is the same in any process,
worker, batch or order.

The distributions are timm's (``transforms_imagenet_train``, RandAugment / AutoAugment /
AugMix policies, ``RandomErasing``, ``Mixup``): the policies, op lists and level functions
are taken from timm's own factories; only where the random numbers come from differs.
"""

from __future__ import annotations

import math
import random
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .augment import AugSpec, SpecError
from .seeds import group_generator, view_generator

LEVEL_DENOM = 10.0  # timm's default upper bound of a magnitude
_level_lock = threading.Lock()


@dataclass
class OpParams:
    """One applied PIL op of an AutoAugment / RandAugment / AugMix policy."""

    name: str  # timm's op name, e.g. "Rotate", "PosterizeIncreasing"
    magnitude: float  # after noise (mstd) and clamping
    args: tuple  # what timm's level function made of it (sign included)
    resample: str | None = None  # "bilinear" / "bicubic" for geometric ops
    fill: tuple | None = None  # fill colour of geometric ops


@dataclass
class ViewParams:
    """Everything random about one view. Boxes are (top, left, height, width) in pixels."""

    epoch: int
    row: int
    seed: int  # the encoded seed the store keeps
    src_size: tuple[int, int]  # (width, height) of the decoded image the crop refers to
    crop: tuple[int, int, int, int]  # in source pixels; resized to (img_size, img_size)
    interpolation: str  # of the crop's resize
    hflip: bool = False
    vflip: bool = False
    ops: list[OpParams] = field(default_factory=list)  # RandAugment / AutoAugment, in order
    augmix: dict | None = None  # {"weights": [...], "m": float, "blended": bool, "chains": [[OpParams]]}
    jitter: dict | None = None  # {"order": [...], "brightness": f, "contrast": f, "saturation": f, "hue": f}
    erase: list[tuple[int, int, int, int]] = field(default_factory=list)  # on the output image
    erase_mode: str = "const"  # "const" (zeros), "rand" (one normal colour), "pixel" (normal noise)
    erase_seed: int = 0  # seeds the noise of "rand" / "pixel" erasing
    partner: int = -1  # row mixed in (== row when not mixed)
    mix: str = "none"  # "none" | "mixup" | "cutmix"
    lam: float = 1.0  # weight of this row's image
    box: tuple[int, int, int, int] | None = None  # cutmix: (top, left, height, width) taken from the partner

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line a person can read: crop, flips, ops, erasing, mix."""
        t, l, h, w = self.crop
        parts = [f"({self.epoch},{self.row}) crop {h}x{w}@{t},{l} of {self.src_size[0]}x{self.src_size[1]} "
                 f"{self.interpolation}"]
        if self.hflip or self.vflip:
            parts.append("flip " + "h" * self.hflip + "v" * self.vflip)
        if self.ops:
            parts.append("ops " + ", ".join(f"{o.name}({', '.join(f'{a:.3g}' for a in o.args)})" for o in self.ops))
        if self.augmix:
            parts.append(f"augmix m={self.augmix['m']:.2f} chains={[len(c) for c in self.augmix['chains']]}")
        if self.jitter:
            parts.append("jitter " + " ".join(f"{k[0]}={self.jitter[k]:.2f}" for k in
                                              ("brightness", "contrast", "saturation", "hue")))
        if self.erase:
            parts.append(f"erase {len(self.erase)} box(es) {self.erase_mode}")
        if self.mix != "none":
            parts.append(f"{self.mix} with row {self.partner} lam={self.lam:.3f}")
        return "; ".join(parts)


class Policy:
    """What a spec draws per view, built once from timm's factories (the same objects timm
    would apply), so ``draw`` only decides the random numbers."""

    def __init__(self, spec: AugSpec):
        from timm.data.constants import IMAGENET_DEFAULT_MEAN
        from timm.data.auto_augment import (
            augment_and_mix_transform, auto_augment_transform, rand_augment_transform,
        )

        self.spec = spec
        s = spec.img_size
        aa = spec.auto_augment
        self.kind = None
        self.tf = None
        if aa:
            hp = dict(translate_const=int(s * 0.45), img_mean=tuple(min(255, round(255 * x)) for x in IMAGENET_DEFAULT_MEAN))
            if spec.interpolation and spec.interpolation != "random":
                from timm.data.transforms import str_to_pil_interp

                hp["interpolation"] = str_to_pil_interp(spec.interpolation)
            try:
                if aa.startswith("rand"):
                    self.kind, self.tf = "rand", rand_augment_transform(aa, hp)
                elif aa.startswith("augmix"):
                    hp["translate_pct"] = 0.3
                    self.kind, self.tf = "augmix", augment_and_mix_transform(aa, hp)
                else:
                    self.kind, self.tf = "auto", auto_augment_transform(aa, hp)
            except (AssertionError, ValueError, KeyError, IndexError) as e:
                raise SpecError(f"auto_augment {aa!r}: timm cannot build it ({type(e).__name__}: {e})") from e
        # timm switches colour jitter off under auto-augment, except for the '3a' policies
        cj = spec.color_jitter
        self.jitter = None
        if cj and (not aa or "3a" in aa):
            lo = max(0.0, 1.0 - cj)
            self.jitter = {"brightness": (lo, 1.0 + cj), "contrast": (lo, 1.0 + cj), "saturation": (lo, 1.0 + cj)}
        self.interpolations = ["bilinear", "bicubic"] if spec.interpolation == "random" else [spec.interpolation]

    # ---- drawing -----------------------------------------------------------------------------

    def draw(self, base_seed: int, epoch: int, row: int, seed: int, src_size: tuple[int, int],
             partner: int | None = None) -> ViewParams:
        """The record of view (epoch, row) whose decoded image is ``src_size`` = (w, h)."""
        spec = self.spec
        g = view_generator(base_seed, seed, stream=0)
        w, h = int(src_size[0]), int(src_size[1])
        p = ViewParams(epoch=int(epoch), row=int(row), seed=int(seed), src_size=(w, h),
                       crop=_rrc(g, w, h, spec.scale, spec.ratio),
                       interpolation=self.interpolations[int(g.integers(len(self.interpolations)))])
        p.hflip = spec.hflip > 0 and bool(g.random() < spec.hflip)
        p.vflip = spec.vflip > 0 and bool(g.random() < spec.vflip)
        if self.kind in ("rand", "auto"):
            p.ops = self._policy_ops(g)
        elif self.kind == "augmix":
            p.augmix = self._augmix(g)
        if self.jitter:
            order = [int(i) for i in g.permutation(3)]
            p.jitter = {"order": [("brightness", "contrast", "saturation")[i] for i in order],
                        **{k: float(g.uniform(*r)) for k, r in self.jitter.items()}, "hue": 0.0}
        if spec.re_prob > 0:
            p.erase, p.erase_mode = _erase_boxes(g, spec), spec.re_mode
            p.erase_seed = int(g.integers(0, 2**63))
        p.partner = int(row) if partner is None else int(partner)
        if spec.mixing and p.partner != p.row:
            self._mix(view_generator(base_seed, seed, stream=1), p)
        if p.mix == "none":
            p.partner = p.row
        return p

    def _op(self, g: np.random.Generator, op) -> OpParams | None:
        """timm's ``AugmentOp.__call__`` decisions, drawn from ``g``; None when skipped."""
        if op.prob < 1.0 and g.random() > op.prob:
            return None
        m = op.magnitude
        if op.magnitude_std > 0:
            m = g.uniform(0, m) if op.magnitude_std == float("inf") else g.normal(m, op.magnitude_std)
        m = max(0.0, min(float(m), op.magnitude_max or LEVEL_DENOM))
        resample = op.kwargs.get("resample")
        if isinstance(resample, (list, tuple)):
            resample = resample[int(g.integers(len(resample)))]
        negate = random.Random(int(g.integers(0, 2**63)))  # the level function's sign coin
        args = _level_args(op, m, negate)
        name = op.name
        if name == "GaussianBlurRand":  # its radius is drawn inside timm's op: draw it here instead
            name, args = "GaussianBlur", (float(g.uniform(0.1, 2.0 * args[0])),)
        geometric = name in _GEOMETRIC
        return OpParams(name=name, magnitude=m, args=tuple(float(a) if isinstance(a, float) else int(a) for a in args),
                        resample=_interp_name(resample) if geometric else None,
                        fill=tuple(op.kwargs["fillcolor"]) if geometric else None)

    def _policy_ops(self, g) -> list[OpParams]:
        if self.kind == "rand":
            tf = self.tf
            pick = g.choice(len(tf.ops), tf.num_layers, replace=tf.choice_weights is None, p=tf.choice_weights)
            chosen = [tf.ops[int(i)] for i in pick]
        else:
            chosen = self.tf.policy[int(g.integers(len(self.tf.policy)))]
        return [o for o in (self._op(g, op) for op in chosen) if o is not None]

    def _augmix(self, g) -> dict:
        tf = self.tf
        weights = np.float32(g.dirichlet([tf.alpha] * tf.width))
        m = np.float32(g.beta(tf.alpha, tf.alpha))
        chains = []
        for _ in range(tf.width):
            depth = tf.depth if tf.depth > 0 else int(g.integers(1, 4))
            ops = [tf.ops[int(i)] for i in g.choice(len(tf.ops), depth, replace=True)]
            chains.append([o for o in (self._op(g, op) for op in ops) if o is not None])
        return {"weights": [float(x) for x in weights], "m": float(m), "blended": bool(tf.blended), "chains": chains}

    def _mix(self, g, p: ViewParams) -> None:
        """timm's ``Mixup._params_per_batch`` and ``cutmix_bbox_and_lam`` (correct_lam), per view."""
        spec = self.spec
        if not g.random() < spec.mix_prob:
            return
        if spec.mixup > 0 and spec.cutmix > 0:
            cut = bool(g.random() < spec.switch_prob)
            lam = g.beta(spec.cutmix, spec.cutmix) if cut else g.beta(spec.mixup, spec.mixup)
        elif spec.mixup > 0:
            cut, lam = False, g.beta(spec.mixup, spec.mixup)
        else:
            cut, lam = True, g.beta(spec.cutmix, spec.cutmix)
        lam = float(lam)
        if cut:
            s = spec.img_size
            r = math.sqrt(1 - lam)
            ch, cw = int(s * r), int(s * r)
            cy, cx = int(g.integers(0, s)), int(g.integers(0, s))
            yl, yh = int(np.clip(cy - ch // 2, 0, s)), int(np.clip(cy + ch // 2, 0, s))
            xl, xh = int(np.clip(cx - cw // 2, 0, s)), int(np.clip(cx + cw // 2, 0, s))
            lam = 1.0 - (yh - yl) * (xh - xl) / float(s * s)
            if lam < 1.0:
                p.box = (yl, xl, yh - yl, xh - xl)
        if lam < 1.0:
            p.mix, p.lam = ("cutmix" if cut else "mixup"), float(lam)


_GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel"}


def blended_augmix_weights(mix: dict) -> list[float]:
    """The blend factor of each chain of a blended AugMix record (timm's
    ``AugMixAugment._apply_blended``): chain k's output is blended into the running image with
    weight ``w[k]``. Computed from the float32 weights times ``m``, in timm's order."""
    ws = np.float32(mix["weights"]) * np.float32(mix["m"])
    cump, rws = 1.0, []
    for w in ws[::-1]:
        a = w / cump
        cump *= 1 - a
        rws.append(a)
    return [float(v) for v in rws[::-1]]


def _level_args(op, magnitude: float, coin: random.Random) -> tuple:
    """timm's level function of ``op``; its random sign comes from ``coin``, not the global RNG."""
    if op.level_fn is None:
        return ()
    import timm.data.auto_augment as aa

    with _level_lock:
        saved = aa.random
        aa.random = coin
        try:
            return tuple(op.level_fn(magnitude, op.hparams))
        finally:
            aa.random = saved


def _interp_name(mode) -> str | None:
    if mode is None:
        return None
    from timm.data.transforms import _pil_interpolation_to_str

    return _pil_interpolation_to_str.get(mode, str(mode))


def _rrc(g, w: int, h: int, scale, ratio) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, height, width): 10 tries, then a centre crop."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = g.uniform(*scale) * area
        aspect = math.exp(g.uniform(*log_ratio))
        tw, th = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if tw <= w and th <= h:
            return int(g.integers(0, h - th + 1)), int(g.integers(0, w - tw + 1)), th, tw
    in_ratio = w / h
    if in_ratio < min(ratio):
        tw, th = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        th, tw = h, int(round(h * max(ratio)))
    else:
        tw, th = w, h
    return (h - th) // 2, (w - tw) // 2, th, tw


def _erase_boxes(g, spec: AugSpec) -> list[tuple[int, int, int, int]]:
    """timm's RandomErasing boxes (area 2-33 %, aspect 0.3-3.3) on the output image."""
    if g.random() > spec.re_prob:
        return []
    s = spec.img_size
    count = 1 if spec.re_count <= 1 else int(g.integers(1, spec.re_count + 1))
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    boxes = []
    for _ in range(count):
        for _attempt in range(10):
            target = g.uniform(0.02, 1 / 3) * s * s / count
            aspect = math.exp(g.uniform(*log_aspect))
            bh, bw = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if bw < s and bh < s:
                boxes.append((int(g.integers(0, s - bh + 1)), int(g.integers(0, s - bw + 1)), bh, bw))
                break
    return boxes


# ---- mix partners --------------------------------------------------------------------------------

def mix_pairs(base_seed: int, epoch: int, group: int, rows) -> dict[int, int]:
    """Partner of each row of one mix group: a seeded random pairing (a <-> b).

    With an odd number of rows the one left over is its own partner (not mixed).
    """
    perm = group_generator(base_seed, epoch, group).permutation(np.asarray(rows))
    partner = {}
    for i in range(0, len(perm) - 1, 2):
        a, b = int(perm[i]), int(perm[i + 1])
        partner[a], partner[b] = b, a
    if len(perm) % 2:
        partner[int(perm[-1])] = int(perm[-1])
    return partner


def pair_order(base_seed: int, epoch: int, group: int, rows) -> np.ndarray:
    """The rows of one mix group with every pair adjacent, in the pairing's order."""
    return group_generator(base_seed, epoch, group).permutation(np.asarray(rows))
