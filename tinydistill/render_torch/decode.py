"""Decoding and packed frames: images in any form -> uint8 CHW tensors -> one flat device buffer.

A batch travels as :class:`Frames` (one uint8 buffer plus host-side offsets and sizes), so a
CPU worker can pack it with :func:`pack_numpy` and the device side moves it in one copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..params import ViewParams


def _to_rgb3(t: torch.Tensor) -> torch.Tensor:
    """[C, H, W] uint8 with C in 1..4 -> [3, H, W] the way PIL's convert("RGB") does."""
    if t.shape[0] == 3:
        return t
    if t.shape[0] in (1, 2):  # L / LA: grey replicated, alpha dropped
        return t[:1].expand(3, -1, -1).contiguous()
    return t[:3].contiguous()  # RGBA: alpha dropped (no compositing)


def _from_pil(img) -> torch.Tensor:
    if img.mode != "RGB":
        img = img.convert("RGB")
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def decode(datas: list, device) -> list[torch.Tensor]:
    """Decode images to uint8 [3, H, W] tensors on ``device``; the first image that cannot be
    decoded raises (:func:`decode_each` keeps each failure in its place instead).

    Items are encoded bytes, PIL images or numpy uint8 arrays (HxW, HxWx1/3/4). Grey, grey+alpha,
    RGBA and palette images become RGB as PIL's ``convert("RGB")`` makes them (grey replicated,
    alpha dropped). JPEGs are decoded together by torchvision's ``decode_jpeg(list, device=...)``
    (nvjpeg on CUDA, libjpeg-turbo on the CPU); other formats, CMYK JPEGs and files the batch
    does not take one at a time on the CPU (torchvision, then PIL), then moved.
    """
    out = decode_each(datas, device)
    for t in out:
        if isinstance(t, Exception):
            raise t
    return out


def decode_each(datas: list, device) -> list:
    """:func:`decode`, with each image that cannot be decoded as its exception in its place:
    one bad file costs its own retry, never the batch's. JPEG bytes that :func:`batchable`
    accepts are decoded in one batched call; when that call fails (it returns nothing then),
    each half is decoded again, down to the files that fail, which get the CPU decoders."""
    device = torch.device(device)
    out: list = [None] * len(datas)
    batch = []
    for i, d in enumerate(datas):
        if isinstance(d, torch.Tensor):
            if d.dtype != torch.uint8 or d.dim() != 3:
                raise ValueError(f"item {i}: expected a uint8 [C, H, W] tensor, got {d.dtype} {tuple(d.shape)}")
            out[i] = _to_rgb3(d)
        elif isinstance(d, np.ndarray):
            if d.dtype != np.uint8 or d.ndim not in (2, 3):
                raise ValueError(f"item {i}: expected a uint8 HxW or HxWxC array, got {d.dtype} {d.shape}")
            a = d[:, :, None] if d.ndim == 2 else d
            out[i] = _to_rgb3(torch.from_numpy(np.array(a, copy=True)).permute(2, 0, 1))
        elif isinstance(d, (bytes, bytearray, memoryview)):
            if batchable(d):
                batch.append(i)
            else:
                out[i] = _decode_one(d)
        elif hasattr(d, "convert") and hasattr(d, "mode"):  # PIL image
            out[i] = _from_pil(d)
        else:
            raise TypeError(f"item {i}: cannot decode a {type(d).__name__}")
    if batch:
        tensors = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in batch]
        for i, t in zip(batch, _decode_jpegs(tensors, device)):
            out[i] = t if isinstance(t, Exception) else _to_rgb3(t)
    return [t if isinstance(t, Exception) or _on(t, device) else t.to(device, non_blocking=True) for t in out]


def _decode_jpegs(tensors: list[torch.Tensor], device: torch.device) -> list:
    """JPEGs in one ``decode_jpeg`` call; if it fails, each half again (so only the halves
    holding a bad file are redone), and a lone file that fails goes to :func:`_decode_one`."""
    import torchvision.io as tio

    try:
        return list(tio.decode_jpeg(tensors, mode=tio.ImageReadMode.RGB, device=device))
    except RuntimeError:
        if len(tensors) == 1:
            return [_decode_one(tensors[0].numpy().tobytes(), torchvision=device.type != "cpu")]
        mid = len(tensors) // 2
        return _decode_jpegs(tensors[:mid], device) + _decode_jpegs(tensors[mid:], device)


def _decode_one(d, torchvision: bool = True):
    """One file on the CPU: torchvision's decoder (unless it has just failed on this file),
    else PIL (CMYK JPEGs, formats torchvision lacks); PIL's exception when neither reads it."""
    import torchvision.io as tio

    if torchvision:
        try:
            return _to_rgb3(tio.decode_image(torch.frombuffer(bytearray(d), dtype=torch.uint8),
                                             mode=tio.ImageReadMode.RGB))
        except RuntimeError:
            pass
    from io import BytesIO

    from PIL import Image

    try:
        with Image.open(BytesIO(bytes(d))) as img:
            return _from_pil(img)
    except Exception as e:
        return e


def batchable(data) -> bool:
    """JPEG bytes the batched decoder takes: a baseline or progressive JPEG with 1 or 3
    components (not CMYK/YCCK, which need the CPU decoders' colour conversion) that ends with
    its end-of-image marker (a cut file would make the batched call fail, or on some decoders
    decode to grey instead of failing as the CPU decoder does). Reads the markers only."""
    if len(data) < 4 or bytes(data[:3]) != b"\xff\xd8\xff":
        return False
    if not bytes(data[-64:]).rstrip(b"\0").endswith(b"\xff\xd9"):
        return False
    b = memoryview(data)
    i, n = 2, len(b)
    while i + 4 <= n:
        if b[i] != 0xFF:
            return False
        m = b[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m in _SOF:
            return i + 9 < n and b[i + 9] in (1, 3)
        if m == 0xDA or m == 0xD9:  # scan or end before any frame header
            return False
        i += 2 + (b[i + 2] << 8 | b[i + 3])
    return False


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _on(t: torch.Tensor, device: torch.device) -> bool:
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)


def decode_frames(datas: list, device) -> Frames:
    """:func:`decode` and :func:`pack`: the images as :class:`Frames` on ``device`` (JPEGs on
    CUDA in one batched ``decode_jpeg`` call, then one ``cat``)."""
    return pack(decode(datas, device))


@dataclass
class Frames:
    """A batch of uint8 images packed into one flat buffer on the device: image i is
    ``flat[offsets[i] : offsets[i] + 3 * heights[i] * widths[i]]`` in CHW order. The sizes and
    offsets are numpy int64 arrays on the host (no device reads needed to use them). ``flat``
    may run past the last image (``pack_numpy`` pads its tail so that the crop step need not).

    Make one with :func:`pack` (tensors already on the device), or with :meth:`from_numpy` from
    a buffer a CPU worker packed with :func:`pack_numpy`: the whole batch moves in one copy."""

    flat: torch.Tensor
    offsets: np.ndarray
    heights: np.ndarray
    widths: np.ndarray

    def __post_init__(self):
        self.offsets = np.asarray(self.offsets, np.int64).reshape(-1)
        self.heights = np.asarray(self.heights, np.int64).reshape(-1)
        self.widths = np.asarray(self.widths, np.int64).reshape(-1)
        if not len(self.offsets) == len(self.heights) == len(self.widths):
            raise ValueError(f"Frames: {len(self.offsets)} offsets, {len(self.heights)} heights, "
                             f"{len(self.widths)} widths")
        if self.flat.dtype != torch.uint8 or self.flat.dim() != 1:
            raise ValueError(f"Frames: expected a flat uint8 buffer, got {self.flat.dtype} {tuple(self.flat.shape)}")
        if len(self.offsets):
            end = self.offsets + 3 * self.heights * self.widths
            if self.offsets.min() < 0 or int(end.max()) > self.flat.numel():
                raise ValueError(f"Frames: images run past the buffer ({int(end.max())} > {self.flat.numel()})")

    @classmethod
    def from_numpy(cls, flat, offsets, heights, widths, device="cpu", non_blocking: bool = False) -> Frames:
        """Frames from a worker's packed buffer (:func:`pack_numpy`; a numpy array or a CPU
        uint8 tensor, e.g. one a DataLoader pinned): one copy to ``device``."""
        t = flat if torch.is_tensor(flat) else torch.from_numpy(np.asarray(flat, np.uint8))
        return cls(t.to(device, non_blocking=non_blocking), offsets, heights, widths)

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def device(self) -> torch.device:
        return self.flat.device

    def select(self, idx) -> Frames:
        """The images ``idx`` (a sequence of positions), sharing this buffer: no device op."""
        idx = np.asarray(idx, np.int64)
        return Frames(self.flat, self.offsets[idx], self.heights[idx], self.widths[idx])

    def image(self, i: int) -> torch.Tensor:
        """Image i as a uint8 [3, H, W] view of the buffer (two ops: for callers, not for loops)."""
        o, h, w = int(self.offsets[i]), int(self.heights[i]), int(self.widths[i])
        return self.flat[o:o + 3 * h * w].view(3, h, w)



def pack(images: Sequence[torch.Tensor]) -> Frames:
    """uint8 [3, H, W] tensors on one device packed into :class:`Frames` (one ``cat``, plus
    one ``reshape`` per image: cheaper to pack on a CPU worker with :func:`pack_numpy`)."""
    if not images:
        return Frames(torch.zeros(0, dtype=torch.uint8), np.zeros(0), np.zeros(0), np.zeros(0))
    for i, im in enumerate(images):
        if im.dtype != torch.uint8 or im.dim() != 3 or im.shape[0] != 3:
            raise ValueError(f"image {i}: expected a uint8 [3, H, W] tensor, got {im.dtype} {tuple(im.shape)}")
    heights = np.array([im.shape[1] for im in images], np.int64)
    widths = np.array([im.shape[2] for im in images], np.int64)
    sizes = 3 * heights * widths
    flat = torch.cat([im.reshape(-1) for im in images]) if len(images) > 1 else images[0].reshape(-1)
    return Frames(flat, np.cumsum(sizes) - sizes, heights, widths)


def pack_numpy(arrays: Sequence[np.ndarray], layout: str = "hwc", pad: bool = True):
    """Decoded images packed on a CPU worker: (flat uint8, offsets, heights, widths), numpy
    only, each image CHW inside the buffer, ready for :meth:`Frames.from_numpy`.

    ``layout="hwc"`` takes HxW, HxWx1 (grey), HxWx2 (grey + alpha), HxWx3 and HxWx4 arrays and
    makes RGB as PIL's ``convert("RGB")`` does (grey replicated, alpha dropped); ``"chw"``
    takes [3, H, W] arrays. With ``pad`` the buffer gets max(width) zero bytes of tail, so that
    the crop step's sliding window never needs to pad it on the device."""
    if layout not in ("hwc", "chw"):
        raise ValueError(f"layout must be 'hwc' or 'chw', got {layout!r}")
    hw = []
    for i, a in enumerate(arrays):
        if not isinstance(a, np.ndarray) or a.dtype != np.uint8:
            raise ValueError(f"array {i}: expected uint8, got {type(a).__name__} {getattr(a, 'dtype', '')}")
        if layout == "chw":
            if a.ndim != 3 or a.shape[0] != 3:
                raise ValueError(f"array {i}: expected [3, H, W], got {a.shape}")
            hw.append(a.shape[1:])
        else:
            if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 2, 3, 4)):
                raise ValueError(f"array {i}: expected HxW or HxWxC (C in 1..4), got {a.shape}")
            hw.append(a.shape[:2])
    heights = np.array([h for h, _ in hw], np.int64)
    widths = np.array([w for _, w in hw], np.int64)
    sizes = 3 * heights * widths
    offsets = np.cumsum(sizes) - sizes
    total = int(sizes.sum())
    tail = int(widths.max()) if pad and len(widths) else 0
    flat = np.empty(total + tail, np.uint8)
    flat[total:] = 0
    for a, o, h, w in zip(arrays, offsets.tolist(), heights.tolist(), widths.tolist()):
        dst = flat[o:o + 3 * h * w].reshape(3, h, w)
        if layout == "chw":
            dst[...] = a
        elif a.ndim == 2 or a.shape[2] in (1, 2):
            dst[...] = (a if a.ndim == 2 else a[:, :, 0])[None]
        else:
            dst[...] = a[:, :, :3].transpose(2, 0, 1)
    return flat, offsets, heights, widths


def _as_frames(images) -> Frames:
    """:class:`Frames` as given, or a list of uint8 [3, H, W] tensors packed (one op per image)."""
    if isinstance(images, Frames):
        return images
    images = list(images)
    for i, im in enumerate(images):
        if not torch.is_tensor(im) or im.dtype != torch.uint8 or im.dim() != 3 or im.shape[0] != 3:
            raise ValueError(f"image {i}: expected a uint8 [3, H, W] tensor, got "
                             f"{getattr(im, 'dtype', type(im).__name__)} {tuple(getattr(im, 'shape', ()))}")
    return pack(images)


def _check_sizes(frames: Frames, params: Sequence[ViewParams]) -> None:
    """Image i's (W, H) must be record i's ``src_size`` (checked on the host: no device op)."""
    if len(frames) != len(params):
        raise ValueError(f"{len(frames)} images for {len(params)} records")
    if not params:
        return
    src = np.array([p.src_size for p in params], np.int64).reshape(-1, 2)
    bad = np.flatnonzero((src[:, 0] != frames.widths) | (src[:, 1] != frames.heights))
    if len(bad):
        i = int(bad[0])
        p = params[i]
        raise ValueError(f"view ({p.epoch},{p.row}): record is for a {tuple(p.src_size)} image, "
                         f"got {(int(frames.widths[i]), int(frames.heights[i]))}")
