"""Erasing and mixing: the steps after the policy ops. Erasing noise is drawn on a CPU worker
as data (:func:`erase_fill`) and written with one scatter; ``mix`` is a fixed number of ops."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..params import ViewParams
from ._device import _NP_DTYPES, upload


def erase_fill(p: ViewParams, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Random erasing of one record as ``render_pil.erase`` does it, as data: (flat indices
    within one [3, size, size] view, int64; their float32 values). The noise is drawn from a
    CPU generator seeded with ``erase_seed``, box by box, the calls render_pil makes (the same
    numbers); where boxes overlap the later one's values are kept, so indices are unique.
    Meant for CPU workers: the device then writes a whole batch with one scatter
    (``render_base(..., erase=...)``; see :func:`erase_fills`)."""
    if not p.erase:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    c, s = 3, size
    g = torch.Generator().manual_seed(p.erase_seed)
    parts = []
    for top, left, h, w in p.erase:
        if p.erase_mode == "pixel":
            f = torch.empty((c, h, w)).normal_(generator=g).numpy()
        elif p.erase_mode == "rand":
            f = np.broadcast_to(torch.empty((c, 1, 1)).normal_(generator=g).numpy(), (c, h, w))
        else:
            f = np.zeros((c, h, w), np.float32)
        idx = (np.arange(c)[:, None, None] * (s * s) + (np.arange(h)[None, :, None] + top) * s
               + (np.arange(w)[None, None, :] + left))
        parts.append((idx.reshape(-1), np.ascontiguousarray(f, np.float32).reshape(-1)))
    if len(parts) == 1:
        return parts[0]
    vals = np.zeros(c * s * s, np.float32)
    mask = np.zeros(c * s * s, bool)
    for idx, f in parts:  # in order: a later box overwrites an earlier one
        vals[idx] = f
        mask[idx] = True
    idx = np.flatnonzero(mask)
    return idx, vals[idx]


def erase_fills(params: Sequence[ViewParams], size: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`erase_fill` of every record of a batch, as ``render_base``'s ``erase``: indices
    into the flattened [B, 3, size, size] batch (record i at i * 3 * size * size) and values."""
    css = 3 * size * size
    idx, val = [], []
    for i, p in enumerate(params):
        if p.erase:
            a, b = erase_fill(p, size)
            idx.append(a + i * css)
            val.append(b)
    if not idx:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(idx), np.concatenate(val)


def _write_erase(x: torch.Tensor, params: Sequence[ViewParams], size: int, erase) -> torch.Tensor:
    """The erased pixels written into ``x`` [B, 3, size, size] with one ``index_put_``: ``erase``
    as :func:`erase_fills` makes them (numpy or tensors), or drawn here when None."""
    if erase is None and any(p.erase for p in params):
        erase = erase_fills(params, size)
    if erase is not None and len(erase[0]):
        if not x.is_contiguous():
            x = x.contiguous()
        idx, val = erase
        if not (torch.is_tensor(idx) and idx.device == x.device and torch.is_tensor(val) and val.device == x.device):
            idx, val = upload(np.asarray(idx, np.int64), np.asarray(val, np.float32), device=x.device)
        x.view(-1).index_put_((idx.to(torch.int64),), val.to(torch.float32))
    return x


def mix(x: torch.Tensor, partner: torch.Tensor, params: Sequence[ViewParams]) -> torch.Tensor:
    """Row i of ``x`` mixed with row i of ``partner`` as ``params[i]`` says: mixup
    ``x * lam + partner * (1 - lam)`` (float32, as render_pil), cutmix the partner's pixels in
    ``box`` = (top, left, h, w); rows with mix "none" unchanged. A fixed number of ops: the
    boxes' row / column masks and the weights are built in numpy and moved in one copy."""
    n, _, h, w = x.shape
    dev = x.device
    if len(params) != n or partner.shape != x.shape:
        raise ValueError(f"mix: {n} rows, {len(params)} records, partner {tuple(partner.shape)}")
    kinds = [p.mix for p in params]
    out = x
    if "cutmix" not in kinds and "mixup" not in kinds:
        return out
    b = np.array([p.box if k == "cutmix" else (0, 0, 0, 0) for p, k in zip(params, kinds)], np.int64).reshape(n, 4)
    ys, xs = np.arange(h)[None, :], np.arange(w)[None, :]
    rin = (ys >= b[:, 0:1]) & (ys < b[:, 0:1] + b[:, 2:3])  # [n, h]
    cin = (xs >= b[:, 1:2]) & (xs < b[:, 1:2] + b[:, 3:4])  # [n, w]
    up = np.array([k == "mixup" for k in kinds])
    lam = np.array([[p.lam, 1.0 - p.lam] if u else [1.0, 0.0] for p, u in zip(params, up)], np.float64)
    rin, cin, lam, up = upload(rin.reshape(n, 1, h, 1), cin.reshape(n, 1, 1, w),  # the masks and weights: one copy
                               lam.T.astype(_NP_DTYPES.get(x.dtype, np.float32)).reshape(2, n, 1, 1, 1),
                               up.reshape(n, 1, 1, 1), device=dev)
    if "cutmix" in kinds:
        out = torch.where(rin & cin, partner, out)
    if "mixup" in kinds:
        a, r = lam.unbind(0)
        out = torch.where(up, x * a + partner * r, out)
    return out
