"""The augmentation spec, in timm's vocabulary.

The spec is what decides a view's pixels besides its seed, so it is stored in the logit store
as canonical JSON with a hash, and replay refuses to run when it differs. What a spec draws
per view is in :mod:`tinydistill.params`; how a record becomes pixels, in the renderers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from ._util import canonical_json, spec_hash
from .options import option
from .errors import TinydistillError


RENDERERS = ("pil", "torch")  # what can turn parameter records into pixels


class SpecError(TinydistillError):
    """An augmentation spec that timm cannot build, or a YAML file that is not a spec."""


@dataclass(frozen=True)
class AugSpec:
    """Augmentation of one view. Field names and meanings follow timm's ``create_transform``."""

    img_size: int = option(224, "View size the store renders (consumers resize).")
    scale: tuple[float, float] = option((0.08, 1.0), "RandomResizedCrop area range, e.g. 0.08 1.0.")
    ratio: tuple[float, float] = option((3 / 4, 4 / 3), "RandomResizedCrop aspect range.")
    hflip: float = option(0.5, "Horizontal flip probability.")
    vflip: float = option(0.0, "Vertical flip probability.")
    color_jitter: float | None = option(0.4, "Colour jitter strength (0 = off; off under auto_augment, as in timm).")
    auto_augment: str | None = option(None, "timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1, augmix-m5-w3, original.")
    interpolation: str = option("bicubic", "bicubic, bilinear, random, ...")
    re_prob: float = option(0.0, "Random erasing probability.")
    re_mode: str = option("pixel", "Random erasing fill: const, rand, pixel.")
    re_count: int = option(1, "Random erasing: at most this many boxes.")
    mixup: float = option(0.0, "Mixup Beta alpha (0 = off).")
    cutmix: float = option(0.0, "CutMix Beta alpha (0 = off).")
    mix_prob: float = option(1.0, "Probability a view is mixed.")
    switch_prob: float = option(0.5, "Probability of CutMix over Mixup when both are on.")
    mix_group: int = option(256, "Rows per mix-pairing group (power of two, divides the store's chunk rows).")
    renderer: str | None = option(None, "Renderer of views: pil (CPU workers) or torch (batched on --device; on a GPU "
                                        "workers only read bytes) [default: torch on cuda, pil on cpu].",
                                  flag="--render", type=click.Choice(RENDERERS))

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
        if self.renderer is not None and self.renderer not in RENDERERS:
            raise SpecError(f"renderer must be pil or torch, got {self.renderer!r}")
        if self.re_mode not in ("const", "rand", "pixel"):
            raise SpecError(f"re_mode must be const, rand or pixel, got {self.re_mode!r}")
        if self.re_count < 1:
            raise SpecError(f"re_count must be >= 1, got {self.re_count}")
        if self.mix_group < 2 or self.mix_group & (self.mix_group - 1):
            raise SpecError(f"mix_group must be a power of two >= 2, got {self.mix_group}")

    def for_device(self, device) -> "AugSpec":
        """The spec with its renderer decided: the torch renderer on CUDA, PIL on the CPU."""
        if self.renderer is not None:
            return self
        return dataclasses.replace(self, renderer="torch" if str(device).startswith("cuda") else "pil")

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
        """A spec from YAML: a recipe's ``augmentation:`` section, or a file of spec fields."""
        from .options import RecipeError, read_yaml

        try:
            d = read_yaml(path)
        except RecipeError as e:
            raise SpecError(str(e)) from None
        return cls.from_dict(d.get("augmentation", d), source=str(path))
