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
    renderer: str = "pil"  # what turns parameter records into pixels: "pil" (CPU workers) or "torch" (batched)

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
        if self.renderer not in ("pil", "torch"):
            raise SpecError(f"renderer must be pil or torch, got {self.renderer!r}")
        if self.re_mode not in ("const", "rand", "pixel"):
            raise SpecError(f"re_mode must be const, rand or pixel, got {self.re_mode!r}")
        if self.re_count < 1:
            raise SpecError(f"re_count must be >= 1, got {self.re_count}")
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
