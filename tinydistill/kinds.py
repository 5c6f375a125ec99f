"""Target kinds: what the teacher leaves in the store for each view, one class per kind.

A kind holds its three stages in one place:

- **extraction** (:meth:`extract`): the teacher's logits and attention maps -> the kind's
  values (``fields``), on the device;
- **stored encoding** (:meth:`arrays`, :meth:`encode`, :meth:`decode`): the Zarr arrays it
  keeps, (epoch, row, ...) chunked and sharded like every target array, and the conversion of
  a shard's values to and from them;
- **loss term** (:meth:`loss`, for kinds other than top-K, whose objective is
  :class:`tinydistill.losses.DistillLoss`).

The store records its kinds and their settings in the ``targets`` attribute; the writer,
the stream, the training loop and verify loop over them. :data:`KINDS` is the registry.

- ``topk`` (always): top-K log-probabilities (``logp``, fp16) and class ids (``index_gap`` or
  ``index``), see :mod:`tinydistill.store.format`;
- ``attention`` (``gen-logits --attention-grid G``): a G x G spatial attention map per view
  that sums to 1 (:mod:`tinydistill.attention`), stored as ``attention`` (epoch, row, y, x)
  uint8: ``code = round(255 * (map / max(map)) ** (1/3))``, decoded as ``code**3 / sum(code**3)``.
  The cube root spends the 256 levels where attention maps have most of their cells (small
  values): the decoded map is within 1 % of the map's mass (L1) where a linear code loses up to
  10 % on peaky maps (docs/store.md); all-zero codes mean never written or skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import StoreError


@dataclass(frozen=True)
class StoredArray:
    """One Zarr array of a kind: (epoch, row) + ``tail``, chunked and sharded by rows."""

    name: str
    dtype: str
    tail: tuple[int, ...]
    dims: tuple[str, ...]  # names of the tail dimensions
    fill: Any
    description: str


class TopK:
    """Top-K log-probabilities and their class ids."""

    name = "topk"
    fields = ("logp", "index")
    needs_maps = False

    def __init__(self, k: int, num_classes: int, id_layout: str = "gaps"):
        self.k, self.num_classes, self.gaps = int(k), int(num_classes), id_layout == "gaps"

    @classmethod
    def from_settings(cls, settings: dict, k: int, num_classes: int, id_layout: str) -> "TopK":
        return cls(k, num_classes, id_layout)  # the store's own shape attributes

    def settings(self) -> dict:
        return {"k": self.k}

    def extract(self, logits, maps) -> dict:
        import torch

        logp, index = torch.log_softmax(logits.float(), dim=-1).topk(self.k, dim=-1)
        return {"logp": logp, "index": index}

    def arrays(self) -> list[StoredArray]:
        index_dtype = "int16" if self.num_classes <= np.iinfo(np.int16).max + 1 else "int32"
        ids = ("class ids of the logp slots as gaps: slot 0 is the smallest id of the row, slot j is id[j] - "
               "id[j-1]; ids = cumsum over the last axis; -1 = never written or skipped" if self.gaps else
               "class ids of the logp slots, ascending within a row; -1 = never written or skipped")
        return [StoredArray("logp", "float16", (self.k,), ("slot",), np.nan,
                            "top-K log-probabilities at T=1; the K slots of a row are in ascending class-id "
                            "order; NaN = never written or skipped"),
                StoredArray("index_gap" if self.gaps else "index", index_dtype, (self.k,), ("slot",), -1, ids)]

    def encode(self, values: dict, skip: np.ndarray, where: str) -> dict:
        from .store.format import ids_to_gaps, stored_logp

        n = len(skip)
        logp, index = np.asarray(values["logp"], np.float32), np.asarray(values["index"])
        if logp.shape != (n, self.k) or index.shape != (n, self.k):
            raise StoreError(f"{where}: expected logp/index [{n}, {self.k}], got {list(logp.shape)}, "
                             f"{list(index.shape)}")
        index = np.where(skip[:, None], np.arange(self.k), index)  # placeholders, replaced below
        logp = np.where(skip[:, None], 0.0, logp)
        if np.isnan(logp).any():
            raise StoreError(f"{where}: log-probabilities contain NaN")
        if ((index < 0) | (index >= self.num_classes)).any():
            raise StoreError(f"{where}: class ids outside [0, {self.num_classes})")
        order = np.argsort(index, axis=1, kind="stable")
        index = np.take_along_axis(index, order, 1)
        logp = np.take_along_axis(logp, order, 1)
        if self.k > 1 and not (np.diff(index, axis=1) > 0).all():
            raise StoreError(f"{where}: a row repeats a class id")
        logp = stored_logp(logp)
        logp[skip], index[skip] = np.nan, -1
        if self.gaps:
            index = ids_to_gaps(index)
            index[skip] = -1
        name = self.arrays()[1].name
        return {"logp": logp, name: index}

    def decode(self, stored: dict) -> tuple[dict, np.ndarray]:
        """(values, rows holding no data) of stored arrays; ids in the stored (ascending) order."""
        from .store.format import gaps_to_ids

        logp = stored["logp"].astype(np.float32)
        index = gaps_to_ids(stored["index_gap"]) if self.gaps else stored["index"].astype(np.int64)
        return {"logp": logp, "index": index}, np.isnan(logp).any(1) | (index < 0).any(1)


class Attention:
    """A G x G spatial attention map per view, summing to 1 (see :mod:`tinydistill.attention`)."""

    name = "attention"
    fields = ("attention",)
    needs_maps = True

    def __init__(self, grid: int):
        if int(grid) < 1:
            raise ValueError(f"attention grid must be >= 1, got {grid}")
        self.grid = int(grid)

    @classmethod
    def from_settings(cls, settings: dict, k: int, num_classes: int, id_layout: str) -> "Attention":
        return cls(int(settings["grid"]))

    def settings(self) -> dict:
        return {"grid": self.grid, "encoding": "uint8 cube root: code = round(255 * (map / max) ** (1/3)); "
                                               "map = code**3 / sum(code**3)"}

    def extract(self, logits, maps) -> dict:
        return {"attention": maps}

    def arrays(self) -> list[StoredArray]:
        g = self.grid
        return [StoredArray("attention", "uint8", (g, g), ("y", "x"), 0,
                            f"{g}x{g} spatial attention map of the teacher over the view (class-token attention of "
                            "its last block, or the energy of its last feature map), cube-root coded: map = "
                            "code**3 / sum(code**3); all zeros = never written or skipped")]

    @staticmethod
    def to_codes(maps: np.ndarray) -> np.ndarray:
        """uint8 codes of maps [n, G, G] (non-negative, any scale)."""
        m = np.asarray(maps, np.float64)
        top = m.reshape(len(m), -1).max(1)[:, None, None]
        return np.rint(255 * np.cbrt(m / np.where(top > 0, top, 1))).astype(np.uint8)

    @staticmethod
    def from_codes(codes: np.ndarray) -> np.ndarray:
        """float32 maps [n, G, G] summing to 1 (NaN for all-zero codes: no data)."""
        c = np.asarray(codes, np.float64) ** 3
        total = c.reshape(len(c), -1).sum(1)[:, None, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            return (c / total).astype(np.float32)

    def encode(self, values: dict, skip: np.ndarray, where: str) -> dict:
        n, g = len(skip), self.grid
        maps = np.asarray(values["attention"], np.float32)
        if maps.shape != (n, g, g):
            raise StoreError(f"{where}: expected attention [{n}, {g}, {g}], got {list(maps.shape)}")
        maps = np.where(skip[:, None, None], 1.0, maps)
        if not np.isfinite(maps).all() or (maps < 0).any() or (maps.reshape(n, -1).max(1) <= 0).any():
            raise StoreError(f"{where}: attention maps must be finite, non-negative and not all zero")
        codes = self.to_codes(maps)
        codes[skip] = 0
        return {"attention": codes}

    def decode(self, stored: dict) -> tuple[dict, np.ndarray]:
        codes = stored["attention"]
        return {"attention": self.from_codes(codes)}, ~codes.reshape(len(codes), -1).any(1)

    def loss(self, student_maps, targets: dict):
        """MSE between the student's maps and the teacher's, both in units of the uniform map
        (G**2 * map: 1 everywhere for a uniform map), so a weight means the same at any grid."""
        import torch.nn.functional as F

        g2 = self.grid * self.grid
        return F.mse_loss(student_maps.float() * g2, targets["attention"].float() * g2)


KINDS = {"topk": TopK, "attention": Attention}


def store_kinds(attrs: dict, k: int, num_classes: int, id_layout: str) -> list:
    """The kinds of a store, from its ``targets`` attribute (older stores: top-K alone)."""
    recorded = attrs.get("targets") or {"topk": {"k": k}}
    unknown = [name for name in recorded if name not in KINDS]
    if unknown:
        raise StoreError(f"unknown target kind {unknown[0]!r} (this tinydistill knows {', '.join(KINDS)})")
    return [KINDS[name].from_settings(settings, k, num_classes, id_layout) for name, settings in recorded.items()]


def targets_attr(kinds) -> dict:
    """The store's ``targets`` attribute for its kinds."""
    return {kind.name: kind.settings() for kind in kinds}


def views_hash(augmentation: dict, targets: dict) -> str:
    """The store's ``spec_hash``: of its augmentation, and of its target kinds beyond top-K when
    it has any (so a store of top-K alone keeps the hash of its augmentation, as before)."""
    from ._util import spec_hash

    extra = {name: settings for name, settings in (targets or {}).items() if name != "topk"}
    return spec_hash({"augmentation": augmentation, "targets": extra} if extra else augmentation)
