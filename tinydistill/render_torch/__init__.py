"""The torch renderer: parameter records -> pixels, a whole batch at a time, on any device.

It applies the same :class:`~tinydistill.params.ViewParams` records as
:mod:`tinydistill.render_pil`, so that a GPU can render the views CPU workers would otherwise
render one by one. Two rules shape it:

- Host dispatch must not grow with the batch: each step runs once per op kind (or op
  position, tap position, crop chunk) over all the samples that need it, with every per-sample
  number moved as one numpy-built array; nothing launches kernels per sample or reads a device
  tensor back.
- The pixels must be PIL's: the batch is held as float32 integers 0..255, as PIL holds a
  uint8 image, and every op rounds where Pillow's C code does, in arithmetic that gives the
  same bits on any device and in any batch.

Modules: :mod:`._device` (:func:`upload`, the one way host tables reach the device, and its
counter ``UPLOADS``; per-device constants), :mod:`.decode` (decoding, packed :class:`Frames`),
:mod:`.resample` (crop + resize),
:mod:`.ops` (policy ops, AugMix, colour jitter), :mod:`.mix` (erasing, mixing). Measurements
and the design notes are in ``docs/render.md``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..params import ViewParams
from ._device import UPLOADS, _const, _update_rows, constant, upload
from .decode import Frames, _as_frames, _check_sizes, batchable, decode, decode_each, decode_frames, pack, pack_numpy
from .mix import _write_erase, erase_fill, erase_fills, mix
from .ops import _augmix, _jitter, _run_op_lists, apply_ops
from .resample import _crop_resize, crop_resize

__all__ = ["UPLOADS", "Frames", "apply_ops", "batchable", "constant", "crop_resize", "decode", "decode_each",
           "decode_frames", "erase_fill", "erase_fills", "mix", "pack", "pack_numpy", "render_base", "upload"]


def render_base(images, params: Sequence[ViewParams], size: int, erase=None) -> torch.Tensor:
    """The un-mixed views: float32 [B, 3, size, size] on the images' device, in [0, 1] (noise
    erasing may write outside). Crop + resize and flips, policy ops in order, AugMix, colour
    jitter, erasing: render_pil's steps, each batched over the samples that need it.

    ``images``: :class:`Frames` (the fast path: see :func:`pack_numpy`, :meth:`Frames.from_numpy`)
    or a list of uint8 [3, H, W] tensors on one device (packed here, one op per image); image
    i's (W, H) must be record i's ``src_size``. ``erase``: (flat indices into the [B, 3, size,
    size] output, float32 values) as :func:`erase_fills` makes them, numpy or tensors; None
    draws them here (the same pixels, but per-view work on this process's CPU).

    The device ops are a fixed number per batch (per op kind, tap position and crop chunk),
    never per view: every per-sample number goes to the device in one copy per step, through
    :func:`upload` (counted in ``UPLOADS``), and nothing reads a device value back."""
    frames = _as_frames(images)
    _check_sizes(frames, params)
    if not params:
        return torch.empty((0, 3, size, size), device=frames.device)
    x = _crop_resize(frames, params, size, flips=True)  # fresh: updated in place below
    if any(p.ops for p in params):
        x = _run_op_lists(x, [p.ops for p in params], inplace=True)
    am = [i for i, p in enumerate(params) if p.augmix]
    if am:
        _update_rows(x, am, lambda xs: _augmix(xs, [params[i].augmix for i in am]))
    jt = [i for i, p in enumerate(params) if p.jitter]
    if len(jt) == len(params):
        x = _jitter(x, [p.jitter for p in params], inplace=True)
    elif jt:
        _update_rows(x, jt, lambda xs: _jitter(xs, [params[i].jitter for i in jt], inplace=True))
    x = x.div_(_const(255.0, frames.device))  # a true division on every device
    return _write_erase(x, params, size, erase)
