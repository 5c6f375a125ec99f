"""The batch types the stages pass around, each field written once.

:class:`Batch` is a batch of views as a model takes it: per-row tensors, the pixels once
rendered, the stored targets once joined, and which DataLoader worker made it. The view core
makes it (:meth:`tinydistill.views.Views.render`), the stream cuts and yields it, the device
renderer fills it, gen-logits, train-student, verify and the replay canary consume it.

:class:`Encoded` is what a DataLoader worker ships when the pixels are made in the main
process (the torch renderer): its views as a :class:`Batch` without pixels, each image once
(JPEG bytes for a GPU decoder, or a packed uint8 buffer) with its parameter record, and
erasing's noise. Several merge into one render unit (:meth:`Encoded.merge`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

# per-row fields of both types, in this order
ROW_FIELDS = ("epoch", "row", "seed", "label", "partner", "partner_label", "lam", "valid")
_DTYPES = {"lam": torch.float64, "valid": torch.bool}


@dataclass
class Batch:
    """Views, one per row. ``seed`` holds the encoded uint64 seeds' bits as int64; ``lam`` is
    the weight of the row's own image (1.0 unmixed); ``valid`` is False for a view whose image
    could not be read (its pixels are zeros) or whose stored targets are NaN."""

    epoch: torch.Tensor
    row: torch.Tensor
    seed: torch.Tensor
    label: torch.Tensor
    partner: torch.Tensor
    partner_label: torch.Tensor
    lam: torch.Tensor
    valid: torch.Tensor
    image: torch.Tensor | None = None  # float32 [B, 3, S, S], pixels in [0, 1]
    # stored targets by field name (offline KD; tinydistill.kinds): "logp" [B, K] top-K
    # log-probs, "index" [B, K] their class ids, "attention" [B, G, G] maps
    targets: dict = dataclasses.field(default_factory=dict)
    params: list | None = None  # each view's parameter record (None for a skipped one), on request
    worker: int = 0  # the DataLoader worker that made it
    busy_s: float = 0.0  # the seconds it worked on it

    @classmethod
    def of(cls, **rows) -> "Batch":
        """A batch from per-row sequences or arrays (and any optional field)."""
        kw = {k: torch.as_tensor(np.asarray(rows.pop(k)), dtype=_DTYPES.get(k, torch.int64)) for k in ROW_FIELDS}
        return cls(**kw, **rows)

    @classmethod
    def cat(cls, parts: Sequence["Batch"]) -> "Batch":
        """Batches one after the other (fields absent from any part are absent)."""
        out = {}
        for f in dataclasses.fields(cls):
            vals = [getattr(p, f.name) for p in parts]
            if f.name in ("worker", "busy_s"):
                out[f.name] = vals[0] if f.name == "worker" else sum(vals)
            elif f.name == "targets":  # fields every part holds
                out[f.name] = {k: torch.cat([v[k] for v in vals]) for k in set.intersection(*(set(v) for v in vals))}
            elif any(v is None for v in vals):
                out[f.name] = None
            else:
                out[f.name] = [x for v in vals for x in v] if f.name == "params" else torch.cat(vals)
        return cls(**out)

    def __len__(self) -> int:
        return len(self.row)

    @property
    def logp(self) -> torch.Tensor | None:
        return self.targets.get("logp")

    @property
    def index(self) -> torch.Tensor | None:
        return self.targets.get("index")

    def _map(self, fn) -> "Batch":
        """The batch with ``fn`` applied to every per-row tensor (the targets' too, and the records list)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "targets":
                out[f.name] = {k: fn(t) for k, t in v.items()}
            else:
                out[f.name] = fn(v) if torch.is_tensor(v) or (f.name == "params" and v is not None) else v
        return Batch(**out)

    def slice(self, lo: int, hi: int) -> "Batch":
        return self._map(lambda v: v[lo:hi])

    def select(self, keep: torch.Tensor) -> "Batch":
        """The rows ``keep`` (int64 ids on the CPU). Device tensors are indexed with a copy of
        the ids sent ahead (``index_select``), never with a mask, so nothing waits on the device."""
        on: dict = {}

        def take(v):
            if isinstance(v, list):
                return [v[i] for i in keep.tolist()]
            if v.device.type == "cpu":
                return v[keep]
            if v.device not in on:
                on[v.device] = keep.to(v.device, non_blocking=True)
            return v.index_select(0, on[v.device])

        return self._map(take)

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader's pin-memory thread."""
        return self._map(lambda v: v.pin_memory() if torch.is_tensor(v) else v)


@dataclass
class Encoded:
    """A worker's encoded batch: its ``views`` (a :class:`Batch` without pixels yet), and per
    row ``slot`` (which image, -1 when unreadable) and ``pslot`` (the mix partner's, -1 when
    unmixed). Per image slot: ``params`` (its record), ``keys``, ``pix_off`` (its offset in
    ``pixels``, CHW; -1 for a JPEG in ``jpeg``, in slot order). Erasing: ``erase_slot`` /
    ``erase_idx`` / ``erase_val`` (slot, flat index in the [3, S, S] view, value)."""

    views: Batch
    slot: np.ndarray
    pslot: np.ndarray
    params: list
    keys: list
    jpeg: list
    pixels: torch.Tensor  # uint8, shared memory between processes
    pix_off: np.ndarray
    erase_slot: np.ndarray
    erase_idx: np.ndarray
    erase_val: np.ndarray

    def __len__(self) -> int:
        return len(self.views)

    def pin_memory(self) -> "Encoded":
        return dataclasses.replace(self, views=self.views.pin_memory(), pixels=self.pixels.pin_memory())

    @classmethod
    def merge(cls, parts: Sequence["Encoded"]) -> "Encoded":
        """Several encoded batches (of any epochs) as one render unit: views joined, image
        slots renumbered, pixel buffers and erasing joined. The buffer ends with zero bytes one
        image width long (the renderer's crop windows read up to that far)."""
        n_slots = np.cumsum([0] + [len(p.params) for p in parts])
        n_pix = np.cumsum([0] + [len(p.pixels) for p in parts])
        shift = lambda a, by: np.where(a >= 0, a + by, -1)  # noqa: E731
        tail = max((q.src_size[0] for p in parts for q in p.params), default=0)
        return cls(
            views=Batch.cat([p.views for p in parts]),
            slot=np.concatenate([shift(p.slot, n_slots[i]) for i, p in enumerate(parts)]),
            pslot=np.concatenate([shift(p.pslot, n_slots[i]) for i, p in enumerate(parts)]),
            params=[q for p in parts for q in p.params], keys=[k for p in parts for k in p.keys],
            jpeg=[j for p in parts for j in p.jpeg], pixels=_cat_pixels([p.pixels for p in parts], tail),
            pix_off=np.concatenate([shift(p.pix_off, n_pix[i]) for i, p in enumerate(parts)]),
            erase_slot=np.concatenate([p.erase_slot + n_slots[i] for i, p in enumerate(parts)]),
            erase_idx=np.concatenate([p.erase_idx for p in parts]),
            erase_val=np.concatenate([p.erase_val for p in parts]),
        )


def _cat_pixels(buffers: list[torch.Tensor], tail: int) -> torch.Tensor:
    """Pixel buffers one after the other, then ``tail`` zero bytes; pinned when the DataLoader
    pinned its inputs, so the copy to the device stays asynchronous."""
    n = sum(len(b) for b in buffers) + tail
    out = torch.empty(n, dtype=torch.uint8, pin_memory=all(b.is_pinned() for b in buffers))
    torch.cat(buffers + [torch.zeros(tail, dtype=torch.uint8)], out=out)
    return out
