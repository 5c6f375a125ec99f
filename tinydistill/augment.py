"""The augmentation spec, in timm's vocabulary, and the transforms built from it.

The spec is what decides a view's pixels besides its seed, so it is stored in the logit store
as canonical JSON with a hash, and replay refuses to run when it differs. The image ops are
timm's (RandomResizedCrop, flips, colour jitter, RandAugment, RandomErasing, Mixup/CutMix
decisions); tinydistill only decides where their randomness comes from.

Views are float32 tensors [3, H, W] of pixel values in [0, 1] (random erasing may write noise
outside that range), not normalised: teacher and student each normalise with their own
mean/std (see :func:`tinydistill.views.prepare`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._util import canonical_json, spec_hash
from .errors import TinydistillError


class SpecError(TinydistillError):
    """An augmentation spec that timm cannot build, or a YAML file that is not a spec."""


@dataclass(frozen=True)
class AugSpec:
    """Augmentation of one view. Field names and meanings follow timm's ``create_transform``."""

    img_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: float | None = 0.4
    auto_augment: str | None = None  # e.g. "rand-m9-mstd0.5-inc1"
    interpolation: str = "bicubic"  # or "bilinear", "random", ...
    re_prob: float = 0.0
    re_mode: str = "pixel"
    re_count: int = 1
    mixup: float = 0.0  # Beta alpha; 0 = off
    cutmix: float = 0.0  # Beta alpha; 0 = off
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    mix_group: int = 256  # partners are paired inside aligned groups of this many rows

    def __post_init__(self):
        for name in ("scale", "ratio"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if self.img_size < 1:
            raise SpecError(f"img_size must be >= 1, got {self.img_size}")
        for name in ("hflip", "vflip", "re_prob", "mix_prob", "switch_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise SpecError(f"{name} must be a probability in [0, 1], got {v}")
        if self.mixup < 0 or self.cutmix < 0:
            raise SpecError("mixup and cutmix are Beta alphas: >= 0")
        if self.mix_group < 2 or self.mix_group & (self.mix_group - 1):
            raise SpecError(f"mix_group must be a power of two >= 2, got {self.mix_group}")

    @property
    def mixing(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mix_prob > 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["scale"], d["ratio"] = list(self.scale), list(self.ratio)
        return d

    def to_json(self) -> str:
        return canonical_json(self.to_dict())

    @property
    def hash(self) -> str:
        return spec_hash(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "spec") -> "AugSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SpecError(f"{source}: unknown augmentation option(s) {unknown}; known: {sorted(known)}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise SpecError(f"{source}: {e}") from e

    @classmethod
    def from_yaml(cls, path: str | Path) -> "AugSpec":
        """A spec from YAML: either top-level keys or under an ``augmentation:`` key."""
        import yaml

        try:
            d = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise SpecError(f"{path}: cannot read ({e.strerror})") from e
        except yaml.YAMLError as e:
            raise SpecError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
        if not isinstance(d, dict):
            raise SpecError(f"{path}: expected a mapping of augmentation options")
        return cls.from_dict(d.get("augmentation", d), source=str(path))


def _posterize(img, bits_to_keep, **__):
    """timm's posterize, with 0 bits meaning a black image as in TF and Pillow < 13.

    ``rand-m9-mstd0.5-inc1`` can ask for 0 bits; Pillow 13 raises on that (~0.14 % of calls).
    """
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(tf) -> None:
    ops = getattr(tf, "ops", None)
    for op in ops or []:
        if "Posterize" in getattr(op, "name", ""):
            op.aug_fn = _posterize
    for child in getattr(tf, "transforms", []) or []:
        _patch_posterize(child)


class ViewMaker:
    """Builds timm's transforms for a spec and renders views under their seeds."""

    def __init__(self, spec: AugSpec, base_seed: int):
        from timm.data.transforms_factory import transforms_imagenet_train
        from timm.data.mixup import Mixup
        from timm.data.random_erasing import RandomErasing
        from timm.data.transforms import MaybeToTensor
        from torchvision import transforms

        self.spec, self.base_seed = spec, int(base_seed)
        try:
            primary, secondary, _ = transforms_imagenet_train(
                img_size=spec.img_size, scale=spec.scale, ratio=spec.ratio, hflip=spec.hflip,
                vflip=spec.vflip, color_jitter=spec.color_jitter, auto_augment=spec.auto_augment,
                interpolation=spec.interpolation, use_prefetcher=True, separate=True,
            )
        except (AssertionError, ValueError, KeyError) as e:
            raise SpecError(f"timm cannot build this augmentation ({type(e).__name__}: {e}): {spec.to_json()}") from e
        # our own final step: float pixels in [0, 1], no normalisation (the consumer's job)
        self.transform = transforms.Compose([primary, secondary, MaybeToTensor()])
        _patch_posterize(self.transform)
        self.erase = (
            RandomErasing(spec.re_prob, mode=spec.re_mode, max_count=spec.re_count, device="cpu")
            if spec.re_prob > 0 else None
        )
        self.mixer = (
            Mixup(mixup_alpha=spec.mixup, cutmix_alpha=spec.cutmix, prob=spec.mix_prob,
                  switch_prob=spec.switch_prob, mode="batch", label_smoothing=0.0)
            if spec.mixing else None
        )

    def base(self, img, seed: int) -> torch.Tensor:
        """The un-mixed view of an image (PIL) under its encoded seed: float32 [3, H, W]."""
        from .seeds import isolated_rng, view_generator

        with isolated_rng(view_generator(self.base_seed, seed, stream=0)):
            x = self.transform(img.convert("RGB") if img.mode != "RGB" else img)
            if self.erase is not None:
                x = self.erase(x)
        return x

    def mix(self, x: torch.Tensor, partner: torch.Tensor, seed: int) -> tuple[torch.Tensor, float]:
        """Mix a view with its partner's view as timm's Mixup would; returns (view, lambda).

        Lambda, the mixup/cutmix switch and the box come from the view's own seed.
        """
        from timm.data.mixup import cutmix_bbox_and_lam

        from .seeds import isolated_rng, view_generator

        if self.mixer is None:
            return x, 1.0
        with isolated_rng(view_generator(self.base_seed, seed, stream=1)):
            lam, use_cutmix = self.mixer._params_per_batch()
            if lam == 1.0:
                return x, 1.0
            if use_cutmix:
                (yl, yh, xl, xh), lam = cutmix_bbox_and_lam(
                    x.shape, lam, ratio_minmax=self.mixer.cutmix_minmax, correct_lam=self.mixer.correct_lam
                )
                out = x.clone()
                out[:, yl:yh, xl:xh] = partner[:, yl:yh, xl:xh]
                return out, float(lam)
            return x * lam + partner * (1.0 - lam), float(lam)


def mix_pairs(base_seed: int, epoch: int, group: int, rows: np.ndarray) -> dict[int, int]:
    """Partner of each row of one mix group: a seeded random pairing (a <-> b).

    With an odd number of rows the one left over is its own partner (not mixed).
    """
    from .seeds import group_generator

    perm = group_generator(base_seed, epoch, group).permutation(np.asarray(rows))
    partner = {}
    for i in range(0, len(perm) - 1, 2):
        a, b = int(perm[i]), int(perm[i + 1])
        partner[a], partner[b] = b, a
    if len(perm) % 2:
        partner[int(perm[-1])] = int(perm[-1])
    return partner
