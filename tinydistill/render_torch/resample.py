"""Crop + resize: Pillow's antialiased resampling of every record's crop, batched, in its integer
arithmetic (so the same bits on any device and in any batch; see ``docs/render.md``)."""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
import torch

from ..params import ViewParams
from ._device import _rows, upload
from .decode import Frames, _as_frames

CANVAS_BUDGET = 4 << 30  # bytes of the crop step's temporaries in one pass; bigger batches go in chunks


# PIL's resampling filters (Resample.c): support and kernel, in double precision
def _f_bilinear(x):
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _f_bicubic(x):  # a = -0.5
    a = -0.5
    x = np.abs(x)
    return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1,
                    np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _f_box(x):
    return np.where((x > -0.5) & (x <= 0.5), 1.0, 0.0)


def _sinc(x):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(x == 0.0, 1.0, np.sin(x * math.pi) / (x * math.pi))


def _f_hamming(x):
    x = np.abs(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        y = np.sin(x * math.pi) / (x * math.pi) * (0.54 + 0.46 * np.cos(x * math.pi))
    return np.where(x == 0.0, 1.0, np.where(x >= 1.0, 0.0, y))


def _f_lanczos(x):
    return np.where((x > -3.0) & (x < 3.0), _sinc(x) * _sinc(x / 3.0), 0.0)


_FILTERS = {"bilinear": (_f_bilinear, 1.0), "bicubic": (_f_bicubic, 2.0), "box": (_f_box, 0.5),
            "hamming": (_f_hamming, 1.0), "lanczos": (_f_lanczos, 3.0)}
_PRECISION_BITS = 32 - 8 - 2


def _coeffs(in_size: int, out_size: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``precompute_coeffs`` + ``normalize_coeffs_8bpc`` of Pillow's Resample.c for one axis:
    first input index [out] and fixed-point (22-bit) weights [out, ksize]."""
    filt, fsupport = _FILTERS[name]
    scale = filterscale = in_size / out_size
    if filterscale < 1.0:
        filterscale = 1.0
    support = fsupport * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    ss = 1.0 / filterscale
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C's (int) truncates
    xmax = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin
    k = np.arange(ksize)
    w = filt(((k[None, :] + xmin[:, None]) - center[:, None] + 0.5) * ss)
    w = np.where(k[None, :] < xmax[:, None], w, 0.0)
    ww = np.cumsum(w, axis=1)[:, -1:]  # C sums in order; cumsum is sequential
    w = np.where(ww != 0.0, w / np.where(ww != 0.0, ww, 1.0), w)
    scaled = w * (1 << _PRECISION_BITS)
    kk = np.where(scaled < 0, -0.5 + scaled, 0.5 + scaled).astype(np.int64)  # truncation toward 0
    return xmin, kk


def _filter_name(interpolation: str) -> str:
    """The resampling filter of a record's crop: "nearest", or one of ``_FILTERS``."""
    if interpolation in ("nearest", "nearest-exact"):
        return "nearest"
    return interpolation if interpolation in _FILTERS else "bilinear"


@functools.lru_cache(maxsize=16384)
def _axis_taps(in_size: int, out_size: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One axis of a crop's resize as taps: input index [K, out] (crop-local, clamped to the
    crop, so padded and edge taps stay inside it) and 22-bit fixed-point weight [K, out]
    (int32), ``K`` = Pillow's kernel size. Nearest is one tap of weight 1.0, at PIL's source
    pixel floor((i + 0.5) * in / out). Cached: a batch has few distinct crop sizes; the arrays
    are read-only."""
    if name == "nearest":
        idx = np.floor((np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size)).astype(np.int64)
        idx = np.clip(idx, 0, in_size - 1)[None, :]
        w = np.full((1, out_size), 1 << _PRECISION_BITS, np.int32)
    else:
        xmin, kk = _coeffs(in_size, out_size, name)
        k = np.arange(kk.shape[1])
        idx = np.minimum(xmin[None, :] + k[:, None], in_size - 1)
        w = np.ascontiguousarray(kk.T).astype(np.int32)
    idx.setflags(write=False)
    w.setflags(write=False)
    return idx, w


def _tap_tables(lengths: np.ndarray, filters: list[str], flip: list[bool], size: int):
    """One axis of a batch's resize: every record's taps (:func:`_axis_taps`) padded with zero
    weights to the batch's largest kernel: index int64 [K, n, size] and weight int32
    [K, n, size]. A flipped record's output positions come in reverse order (an exact flip)."""
    taps = [_axis_taps(int(n_in), size, f) for n_in, f in zip(lengths, filters)]
    k = max(t[0].shape[0] for t in taps)
    idx = np.zeros((k, len(taps), size), np.int64)
    wts = np.zeros((k, len(taps), size), np.int32)
    for i, ((a, b), f) in enumerate(zip(taps, flip)):
        idx[:a.shape[0], i] = a[:, ::-1] if f else a
        wts[:a.shape[0], i] = b[:, ::-1] if f else b
    return idx, wts


def _tap_pass(src: torch.Tensor, dim: int, taps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One of Pillow's 8-bit resampling passes along ``dim`` (3: columns, 2: rows) of uint8
    ``src`` [n, 3, H, W]: per output position the sum of its taps' pixels times their 22-bit
    weights, rounded, shifted, clipped to 0..255 (int32). One ``gather`` + ``addcmul_`` per tap
    position, over the whole batch; ``taps`` / ``weights`` are :func:`_tap_tables` on the
    device, shaped by :func:`_tap_view`."""
    n, c, h, w = src.shape
    k, size = taps.shape[0], taps.shape[-1] if dim == 3 else taps.shape[-2]
    out_shape = (n, c, h, size) if dim == 3 else (n, c, size, w)
    device = src.device
    taps = taps.expand(k, *out_shape).unbind(0)
    weights = weights.unbind(0)
    acc = torch.full(out_shape, 1 << (_PRECISION_BITS - 1), dtype=torch.int32, device=device)
    for j in range(k):
        acc.addcmul_(src.gather(dim, taps[j]), weights[j])
    return acc.bitwise_right_shift_(_PRECISION_BITS).clamp_(0, 255)


def _tap_view(a: np.ndarray, dim: int) -> np.ndarray:
    """A [K, n, size] tap table shaped to broadcast over [n, 3, H, W] along ``dim``."""
    k, n, size = a.shape
    return a.reshape((k, n, 1, 1, size) if dim == 3 else (k, n, 1, size, 1))


def _crop_starts(frames: Frames, top, left, h) -> np.ndarray:
    """Where every crop row starts in the packed buffer: int64 [n, 3, max h]. Rows past a
    crop's height repeat its last one."""
    hc = int(h.max())
    H, W, off = frames.heights, frames.widths, frames.offsets
    rows = top[:, None] + np.minimum(np.arange(hc)[None, :], h[:, None] - 1)  # [n, hc]
    return ((off + left)[:, None, None] + (np.arange(3)[None, :, None] * (H * W)[:, None, None])
            + (rows * W[:, None])[:, None, :])


def _crop_rows(frames: Frames, start: np.ndarray, start_t: torch.Tensor, wc: int) -> torch.Tensor:
    """Every crop's rows as uint8 [n, 3, max h, wc], read from the packed buffer at ``start``
    (:func:`_crop_starts`; ``start_t`` the same on the device): one ``index_select`` from a
    sliding-window view of it (``unfold``: row r = buffer[r : r + wc]). Columns past a crop's
    width are whatever follows in the buffer (they get zero weights)."""
    n, _, hc = start.shape
    flat = frames.flat
    need = int(start.max()) + wc
    if flat.numel() < need:  # the sliding window reads up to wc - 1 elements past a crop row
        flat = torch.nn.functional.pad(flat, (0, need - flat.numel()))
    return flat.unfold(0, wc, 1).index_select(0, start_t.view(-1)).view(n, 3, hc, wc)


def _resize_pil(frames: Frames, params: Sequence[ViewParams], size: int, flips: bool = False) -> torch.Tensor:
    """PIL's own antialiased resize of each crop (``crop`` then ``resize``), batched and in
    its integer arithmetic: a horizontal pass into 8 bits, then a vertical pass, 22-bit
    fixed-point weights, round, clip. Per-sample taps are padded with zero weights, and integer
    sums do not depend on their order or on the padding. Nearest crops are one tap of weight 1.
    A fixed number of device ops, whatever the batch. With ``flips`` the records' hflip / vflip
    are folded into the tap tables: exact, no ops."""
    top, left, h, w = (np.array([p.crop[k] for p in params], np.int64) for k in range(4))
    filters = [_filter_name(p.interpolation) for p in params]
    cx, wx = _tap_tables(w, filters, [flips and p.hflip for p in params], size)
    cy, wy = _tap_tables(h, filters, [flips and p.vflip for p in params], size)
    start = _crop_starts(frames, top, left, h)
    start_t, cx, wx, cy, wy = upload(start, _tap_view(cx, 3), _tap_view(wx, 3), _tap_view(cy, 2), _tap_view(wy, 2),
                                     device=frames.device)  # the crop's tables: one copy
    crops = _crop_rows(frames, start, start_t, int(w.max()))
    tmp = _tap_pass(crops, 3, cx, wx).to(torch.uint8)  # horizontal
    del crops
    return _tap_pass(tmp, 2, cy, wy).float()  # vertical


def _chunks(params: Sequence[ViewParams], size: int) -> list[list[int]]:
    """Positions of the records in passes whose temporaries (uint8 crop rows; an int32 sum and
    a uint8 tap per output) stay within ``CANVAS_BUDGET`` bytes: all of them in their order
    when they fit, else chunks of similar crop area. Results do not depend on the chunking
    (every crop has its own taps)."""
    def cost(hc, wc):
        return 3 * hc * (wc + 9 * size)

    hs = [p.crop[2] for p in params]
    ws = [p.crop[3] for p in params]
    if len(params) * cost(max(hs) + 1, max(ws) + 1) <= CANVAS_BUDGET:
        return [list(range(len(params)))]
    order = sorted(range(len(params)), key=lambda i: hs[i] * ws[i])
    chunks: list[list[int]] = []
    chunk: list[int] = []
    hmax = wmax = 0
    for i in order:
        nh, nw = max(hmax, hs[i] + 1), max(wmax, ws[i] + 1)
        if chunk and (len(chunk) + 1) * cost(nh, nw) > CANVAS_BUDGET:
            chunks.append(chunk)
            chunk, nh, nw = [], hs[i] + 1, ws[i] + 1
        chunk.append(i)
        hmax, wmax = nh, nw
    chunks.append(chunk)
    return chunks


def _crop_resize(frames: Frames, params: Sequence[ViewParams], size: int, flips: bool) -> torch.Tensor:
    """:func:`_resize_pil` of every record, in chunks when the batch's temporaries would pass
    ``CANVAS_BUDGET``: float32 [B, 3, size, size], integer values 0..255."""
    chunks = _chunks(params, size)
    if len(chunks) == 1:
        return _resize_pil(frames, params, size, flips)
    out = torch.empty((len(params), 3, size, size), device=frames.device)
    for idx in chunks:
        out.index_copy_(0, _rows(idx, frames.device),
                        _resize_pil(frames.select(idx), [params[i] for i in idx], size, flips))
    return out


def crop_resize(images, params: Sequence[ViewParams], size: int) -> torch.Tensor:
    """Crop + resize of every record (no flips): float32 [B, 3, size, size], integer values
    0..255, from :class:`Frames` or a list of uint8 [3, H, W] tensors."""
    return _crop_resize(_as_frames(images), params, size, flips=False)
