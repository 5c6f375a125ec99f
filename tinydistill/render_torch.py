"""The torch renderer: parameter records -> pixels, a whole batch at a time, on any device.

It applies the same :class:`~tinydistill.params.ViewParams` records as
:mod:`tinydistill.render_pil`, with batched torch ops: every step runs once per op *kind*
(or per op position in a record), over all the samples that need it, with each sample's
numbers broadcast as per-sample tensors; nothing launches kernels sample by sample.

Between steps the batch is held as float32 [B, 3, S, S] with integer values 0..255, the
way PIL holds a uint8 image between ops, and every op rounds or truncates exactly where
Pillow's C code does (``Image.blend`` truncates, affine transforms truncate, the 3x3
filter rounds, box blurs round in 8.24 fixed point). So most ops give PIL's pixels exactly;
see ``docs/render.md`` for the table measured against :mod:`render_pil`.

Crop + resize: three batched-or-not ways were measured on this machine's CPU (2 shared
cores, torch 2.14.1), a batch of 64 RandomResizedCrop boxes from 640x427 / 500x375 / 260x300
photos, output 224, against render_pil (PIL's own loop: 0.68 s bicubic, 0.26 s bilinear):

==========================================  ================  ================  ===========
method                                      bicubic PSNR      bilinear PSNR     CPU, B=64
                                            (exact pixels)    (exact pixels)    bicub/bilin
==========================================  ================  ================  ===========
``"pil"`` (default): PIL's separable        62.4 dB (96 %)    63.0 dB (97 %)    6.6 / 3.7 s
filter, 22-bit fixed-point weights, batched
as one gather per tap position
(a) ``"roi_align"``: one roi_align,         40.1 dB (52 %)    44.0 dB (66 %)    1.0 / 1.4 s
adaptive sampling ratio (antialias)
(b) ``"interpolate"``: per-sample           56.2 dB (85 %)    56.5 dB (85 %)    0.24 / 0.18 s
``F.interpolate(antialias=True)``
==========================================  ================  ================  ===========

(b) is fastest on a CPU, but it is a Python loop of one kernel per sample: launch-bound on a
GPU (11,000/s on an H100 against 275,000/s for batched roi_align, /work/shared/BRIEF.md).
(a) is one kernel, but its box-of-bilinear-samples filter is far enough from PIL's cubic that
threshold ops after it (Solarize, SolarizeAdd, Posterize 1 bit) turn one-level differences
into jumps: whole rand-m9 records fell to 23 dB against PIL. ``"pil"`` is batched (a loop
over tap positions, ~2*ceil(2*scale)+1 of them, never over samples), in integer arithmetic
(so bit-identical on any device and in any batch), and keeps whole records >= 40 dB. It is
the default; ``CROP_METHOD`` or ``crop_resize(method=...)`` pick another. Its CPU cost is the
price of emulating Pillow's 8-bit passes with int32 gathers; the renderer is meant for GPUs.

Exact: flips, crops without resampling, nearest resizes, and every policy op on the same
input (AutoContrast, Equalize, Invert, Posterize*, Solarize*, SolarizeAdd, Color*,
Contrast*, Brightness*, Sharpness*, Desaturate, GaussianBlur, Rotate / Shear / Translate with
bilinear or bicubic resampling and fill), AugMix, colour jitter, erasing and mix. Not exact:
PIL's antialiased resize on ~4 % of pixels (one grey level; the resize precision of this
Pillow build is not the one in Pillow's Resample.c source), which later ops may amplify.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .params import OpParams, ViewParams

NAME = "torch"
CROP_METHOD = "pil"  # or "roi_align" (approximate), "interpolate" (per-sample, launch-bound on GPUs)
CANVAS_BUDGET = 1 << 25  # elements of one crop canvas (128 MiB float32 + 256 MiB int64 index)

_GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel"}


# ---- decode ---------------------------------------------------------------------------------------

def _is_jpeg(b) -> bool:
    return len(b) >= 3 and bytes(b[:3]) == b"\xff\xd8\xff"


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
    """Decode images to uint8 [3, H, W] tensors on ``device``.

    Items are encoded bytes (JPEGs decoded batched on the GPU with
    ``torchvision.io.decode_jpeg(list, device=...)`` when ``device`` is CUDA; other formats and
    CPU devices through ``torchvision.io.decode_image`` on the CPU, then moved), PIL images or
    numpy uint8 arrays (HxW, HxWx1/3/4). Grey, grey+alpha, RGBA and palette images become RGB
    as PIL's ``convert("RGB")`` makes them (grey replicated, alpha dropped). CMYK JPEGs and
    other modes torchvision cannot read go through PIL.
    """
    import torchvision.io as tio

    device = torch.device(device)
    out: list[torch.Tensor | None] = [None] * len(datas)
    gpu_jpeg = []
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
            if device.type == "cuda" and _is_jpeg(d):
                gpu_jpeg.append(i)
                continue
            data = torch.frombuffer(bytearray(d), dtype=torch.uint8)
            try:
                t = tio.decode_image(data, mode=tio.ImageReadMode.RGB)
            except RuntimeError:  # e.g. CMYK / odd JPEGs, formats torchvision lacks: PIL decides
                from io import BytesIO

                from PIL import Image

                t = _from_pil(Image.open(BytesIO(bytes(d))))
            out[i] = _to_rgb3(t)
        elif hasattr(d, "convert") and hasattr(d, "mode"):  # PIL image
            out[i] = _from_pil(d)
        else:
            raise TypeError(f"item {i}: cannot decode a {type(d).__name__}")
    if gpu_jpeg:
        tensors = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in gpu_jpeg]
        try:
            dec = tio.decode_jpeg(tensors, mode=tio.ImageReadMode.RGB, device=device)
        except RuntimeError:  # one odd JPEG fails the batch: decode those one by one on the CPU
            dec = []
            for t in tensors:
                try:
                    dec.append(tio.decode_jpeg(t, mode=tio.ImageReadMode.RGB, device=device))
                except RuntimeError:
                    dec.append(decode([bytes(t.numpy())], "cpu")[0])
        for i, t in zip(gpu_jpeg, dec):
            out[i] = _to_rgb3(t)
    return [t.to(device, non_blocking=True) for t in out]


# ---- crop + resize ------------------------------------------------------------------------------

def _interp_mode(name: str) -> str:
    return {"bicubic": "bicubic", "nearest": "nearest", "nearest-exact": "nearest"}.get(name, "bilinear")


def _crop_canvas(images: Sequence[torch.Tensor], boxes: list[tuple[int, int, int, int]], hc: int, wc: int):
    """Each crop gathered into one float32 [n, 3, hc, wc] canvas at (0, 0), its last row and
    column replicated over the rest (so a sampler that reads one pixel past a crop's edge sees
    the edge, as PIL's resampling does, whatever the canvas size). One cat + one gather."""
    device = images[0].device
    flat = torch.cat([im.reshape(-1) for im in images])
    sizes = torch.tensor([im.numel() for im in images], device=device)
    offs = torch.cumsum(sizes, 0) - sizes
    b = torch.tensor(boxes, device=device, dtype=torch.long)  # top, left, h, w
    W = torch.tensor([im.shape[2] for im in images], device=device)
    H = torch.tensor([im.shape[1] for im in images], device=device)
    ys = torch.minimum(torch.arange(hc, device=device)[None, :], b[:, 2:3] - 1) + b[:, 0:1]  # [n, hc]
    xs = torch.minimum(torch.arange(wc, device=device)[None, :], b[:, 3:4] - 1) + b[:, 1:2]  # [n, wc]
    chan = torch.arange(3, device=device)[None, :, None, None] * (H * W)[:, None, None, None]
    idx = offs[:, None, None, None] + chan + (ys * W[:, None])[:, None, :, None] + xs[:, None, None, :]
    return flat[idx].float()


def _resize_roi_align(images, params, size: int) -> torch.Tensor:
    from torchvision.ops import roi_align

    boxes = [tuple(p.crop) for p in params]
    hc = max(b[2] for b in boxes) + 1  # always >= 1 replicated row/column past every crop
    wc = max(b[3] for b in boxes) + 1
    canvas = _crop_canvas(images, boxes, hc, wc)
    device = canvas.device
    rois = torch.tensor([[i, 0.0, 0.0, b[3], b[2]] for i, b in enumerate(boxes)], dtype=torch.float32, device=device)
    # sampling_ratio=0: ceil(crop / size) samples per bin and axis, per box: an area average
    # when shrinking (antialias), plain bilinear when enlarging
    out = roi_align(canvas, rois, (size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)
    del canvas
    return out.add_(0.5).floor_().clamp_(0, 255)


def _resize_interpolate(images, params, size: int) -> torch.Tensor:
    import torch.nn.functional as F

    outs = []
    for im, p in zip(images, params):  # CPU path: no launches to save
        top, left, h, w = p.crop
        crop = im[None, :, top:top + h, left:left + w]
        mode = _interp_mode(p.interpolation)
        if (h, w) == (size, size):
            outs.append(crop.float())
        elif mode == "nearest":
            outs.append(_nearest(crop, size))
        else:
            outs.append(F.interpolate(crop.float(), size=(size, size), mode=mode, align_corners=False, antialias=True))
    x = torch.cat(outs)
    return x.add_(0.5).floor_().clamp_(0, 255)


def _nearest(crop: torch.Tensor, size: int) -> torch.Tensor:
    """PIL's nearest resize of a crop: source pixel floor((i + 0.5) * scale)."""
    _, _, h, w = crop.shape
    iy = ((torch.arange(size, dtype=torch.float64) + 0.5) * (h / size)).floor().long().clamp_(0, h - 1)
    ix = ((torch.arange(size, dtype=torch.float64) + 0.5) * (w / size)).floor().long().clamp_(0, w - 1)
    return crop[:, :, iy.to(crop.device)][:, :, :, ix.to(crop.device)].float()


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
    prec = _PRECISION_BITS
    scaled = w * (1 << prec)
    kk = np.where(scaled < 0, -0.5 + scaled, 0.5 + scaled).astype(np.int64)  # truncation toward 0
    return xmin, kk, prec


def _resize_pil(images, params, size: int) -> torch.Tensor:
    """PIL's own antialiased resize of each crop (``crop`` then ``resize``), batched and in
    its integer arithmetic: a horizontal pass into 8 bits, then a vertical pass, 22-bit
    fixed-point weights, round, clip. Exact; per-sample taps are padded with zero weights, and
    integer sums do not depend on their order or on the padding."""
    device = images[0].device
    n = len(params)
    hcs, xcol, kcol, xrow, krow, pcol, prow = [], [], [], [], [], [], []
    for p in params:
        top, left, h, w = p.crop
        mode = p.interpolation if p.interpolation in _FILTERS else "bilinear"
        a, b, pb = _coeffs(w, size, mode)
        c, d, pd = _coeffs(h, size, mode)
        pcol.append(pb); prow.append(pd)
        xcol.append(a); kcol.append(b); xrow.append(c); krow.append(d)
        hcs.append(h)
    kx = max(k.shape[1] for k in kcol)
    ky = max(k.shape[1] for k in krow)
    pad = lambda ks, K: np.stack([np.pad(k, ((0, 0), (0, K - k.shape[1]))) for k in ks])  # noqa: E731
    t = lambda a, dt=torch.int64: torch.from_numpy(np.asarray(a)).to(device=device, dtype=dt)  # noqa: E731
    kcol, krow = t(pad(kcol, kx)), t(pad(krow, ky))  # [n, S, K]
    xcol, xrow = t(np.stack(xcol)), t(np.stack(xrow))  # [n, S]
    box = t([p.crop for p in params])  # top, left, h, w
    flat = torch.cat([im.reshape(-1) for im in images])
    sizes = t([im.numel() for im in images])
    offs = torch.cumsum(sizes, 0) - sizes
    W = t([im.shape[2] for im in images])
    H = t([im.shape[1] for im in images])
    hc = max(hcs)
    rows = torch.minimum(torch.arange(hc, device=device)[None, :], box[:, 2:3] - 1) + box[:, 0:1]  # [n, hc]
    base = (offs[:, None, None, None] + torch.arange(3, device=device)[None, :, None, None] * (H * W)[:, None, None, None]
            + (rows * W[:, None])[:, None, :, None])  # [n, 3, hc, 1]
    pc = t(pcol).view(n, 1, 1, 1)
    pr = t(prow).view(n, 1, 1, 1)
    i32 = torch.int32  # Pillow's accumulators are C ints: the same sums, no overflow
    pc, pr = pc.to(i32), pr.to(i32)
    kcol, krow = kcol.to(i32), krow.to(i32)
    acc = (torch.ones((n, 3, hc, size), dtype=i32, device=device) << (pc - 1))
    for k in range(kx):  # horizontal: one gather per tap position, over the whole batch
        col = torch.minimum(xcol + k, box[:, 3:4] - 1) + box[:, 1:2]  # [n, S]
        acc += flat[base + col[:, None, None, :]].to(i32) * kcol[:, None, None, :, k]
    tmp = (acc >> pc).clamp_(0, 255)
    del acc, base
    acc = (torch.ones((n, 3, size, size), dtype=i32, device=device) << (pr - 1))
    for k in range(ky):  # vertical
        row = torch.minimum(xrow + k, box[:, 2:3] - 1)  # [n, S] rows of the crop
        acc += tmp.gather(2, row[:, None, :, None].expand(n, 3, size, size)) * krow[:, None, :, k, None]
    return (acc >> pr).clamp_(0, 255).float()


def _nearest_batched(images, params, size: int) -> torch.Tensor:
    """PIL's nearest resize of every crop, one gather: pixel floor((i + 0.5) * crop / size)."""
    device = images[0].device
    flat = torch.cat([im.reshape(-1) for im in images])
    sizes = torch.tensor([im.numel() for im in images], device=device)
    offs = torch.cumsum(sizes, 0) - sizes
    b = torch.tensor([p.crop for p in params], device=device, dtype=torch.float64)
    W = torch.tensor([im.shape[2] for im in images], device=device)
    H = torch.tensor([im.shape[1] for im in images], device=device)
    c = torch.arange(size, device=device, dtype=torch.float64)[None, :] + 0.5
    ys = (c * (b[:, 2:3] / size)).floor().long().clamp_(max=b[:, 2:3].long() - 1) + b[:, 0:1].long()
    xs = (c * (b[:, 3:4] / size)).floor().long().clamp_(max=b[:, 3:4].long() - 1) + b[:, 1:2].long()
    chan = torch.arange(3, device=device)[None, :, None, None] * (H * W)[:, None, None, None]
    idx = offs[:, None, None, None] + chan + (ys * W[:, None])[:, None, :, None] + xs[:, None, None, :]
    return flat[idx].float()


def crop_resize(images: Sequence[torch.Tensor], params: Sequence[ViewParams], size: int,
                method: str | None = None) -> torch.Tensor:
    """Crop + resize of every record: float32 [B, 3, size, size], integer values 0..255."""
    device = images[0].device
    method = method or CROP_METHOD
    if method == "interpolate":
        return _resize_interpolate(images, params, size)
    if method not in ("roi_align", "pil"):
        raise ValueError(f"unknown crop method {method!r}")
    out = torch.empty((len(params), 3, size, size), device=device)
    near = [i for i, p in enumerate(params) if _interp_mode(p.interpolation) == "nearest"]
    if near:
        idx = torch.tensor(near, device=device)
        out[idx] = _nearest_batched([images[i] for i in near], [params[i] for i in near], size)
    # canvases over a memory budget are split into chunks of similar crop sizes; results do
    # not depend on the chunking (every crop has its own replicated margin)
    near = set(near)
    order = sorted((i for i in range(len(params)) if i not in near), key=lambda i: params[i].crop[2] * params[i].crop[3])
    chunk: list[int] = []
    hmax = wmax = 0

    def flush():
        if chunk:
            idx = torch.tensor(chunk, device=device)
            fn = _resize_pil if method == "pil" else _resize_roi_align
            out[idx] = fn([images[i] for i in chunk], [params[i] for i in chunk], size)

    for i in order:
        h, w = params[i].crop[2], params[i].crop[3]
        nh, nw = max(hmax, h + 1), max(wmax, w + 1)
        cost = nh * (nw if method == "roi_align" else size)
        if chunk and (len(chunk) + 1) * 3 * cost > CANVAS_BUDGET:
            flush()
            chunk, nh, nw = [], h + 1, w + 1
        chunk.append(i)
        hmax, wmax = nh, nw
    flush()
    return out


# ---- PIL's uint8 arithmetic, batched ------------------------------------------------------------

def _col(values, device, dtype=torch.float32) -> torch.Tensor:
    """Per-sample scalars as an [n, 1, 1, 1] tensor."""
    return torch.tensor(values, dtype=dtype, device=device).view(-1, 1, 1, 1)


def _blend(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``Image.blend(a, b, alpha)``: a + alpha * (b - a) in float32, truncated, clipped."""
    return (a + (b - a) * alpha).trunc_().clamp_(0, 255)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """``convert("L")``: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16, exact in float32."""
    s = x[:, 0:1] * 19595 + x[:, 1:2] * 38470 + x[:, 2:3] * 7471 + 32768
    return torch.floor(s / 65536)


def _color(x, factor):
    return _blend(_grey(x).expand_as(x), x, factor)


def _contrast(x, factor):
    g = _grey(x).to(torch.int64)
    total = g.sum(dim=(1, 2, 3), keepdim=True)  # integers: exact whatever the order
    count = torch.full_like(total, g.shape[2] * g.shape[3], dtype=torch.float64)
    mean = torch.floor(total.double().div(count) + 0.5).float()  # Python's int(sum / count + 0.5)
    return _blend(mean.expand_as(x), x, factor)


def _brightness(x, factor):
    return _blend(torch.zeros_like(x), x, factor)


_K1, _K5 = float(np.float32(1) / np.float32(13)), float(np.float32(5) / np.float32(13))


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """``filter(ImageFilter.SMOOTH)``: 3x3 (1 1 1, 1 5 1, 1 1 1)/13, Pillow's float32 sum
    order, +0.5 and truncation; the one-pixel border is copied unchanged."""
    out = x.clone()

    def row(r, k_mid):
        return (r[:, :, :, :-2] * _K1 + r[:, :, :, 1:-1] * k_mid) + r[:, :, :, 2:] * _K1

    ss = ((0.5 + row(x[:, :, 2:], _K1)) + row(x[:, :, 1:-1], _K5)) + row(x[:, :, :-2], _K1)
    out[:, :, 1:-1, 1:-1] = ss.clamp_(0, 255).trunc_()
    return out


def _sharpness(x, factor):
    return _blend(_smooth(x), x, factor)


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True).double()
    hi = x.amax(dim=(2, 3), keepdim=True).double()
    ok = hi > lo
    # a true division (``255.0 / t`` is reciprocal(t) * 255 in torch: one rounding too many)
    scale = torch.full_like(hi, 255.0).div_(torch.where(ok, hi - lo, torch.ones_like(hi)))
    offset = -lo * scale
    y = (x.double() * scale + offset).trunc_().clamp_(0, 255).float()
    return torch.where(ok, y, x)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """``ImageOps.equalize`` per sample and channel: histogram, Pillow's integer LUT."""
    n, c = x.shape[:2]
    v = x.to(torch.int64).view(n * c, -1)
    keys = (torch.arange(n * c, device=x.device)[:, None] * 256 + v).view(-1)
    h = torch.bincount(keys, minlength=n * c * 256).view(n * c, 256)
    nz = h > 0
    last = 255 - torch.flip(nz, dims=[1]).to(torch.int64).argmax(dim=1)  # highest non-empty bin
    h_last = h.gather(1, last[:, None]).squeeze(1)
    step = (h.sum(1) - h_last) // 255
    ok = (nz.sum(1) > 1) & (step > 0)
    step1 = torch.where(ok, step, torch.ones_like(step))
    before = torch.cumsum(h, 1) - h  # sum of h[j] for j < i
    lut = torch.div(step1[:, None] // 2 + before, step1[:, None], rounding_mode="floor").clamp_(max=255)
    ident = torch.arange(256, device=x.device).expand(n * c, 256)
    lut = torch.where(ok[:, None], lut, ident)
    return lut.gather(1, v).view_as(x).to(x.dtype)


def _posterize(x, bits):
    m = torch.pow(2.0, (8 - bits).clamp(0, 8))
    return torch.floor(x / m) * m


def _affine(x: torch.Tensor, mats: torch.Tensor, fill: torch.Tensor, bicubic: bool) -> torch.Tensor:
    """``Image.transform(size, AFFINE, mats[i], resample, fillcolor=fill[i])`` for each sample:
    Pillow's GenericTransform with its bilinear / bicubic (a = -1) filters, in float64,
    edge-clamped taps, truncated; output pixels whose source is off the image get ``fill``."""
    n, c, H, W = x.shape
    dev = x.device
    a = mats.to(torch.float64).view(n, 6, 1, 1)
    xo = (torch.arange(W, device=dev, dtype=torch.float64) + 0.5).view(1, 1, W)
    yo = (torch.arange(H, device=dev, dtype=torch.float64) + 0.5).view(1, H, 1)
    xin = (a[:, 0] * xo + a[:, 1] * yo) + a[:, 2]  # [n, H, W]
    yin = (a[:, 3] * xo + a[:, 4] * yo) + a[:, 5]
    valid = (xin >= 0) & (xin < W) & (yin >= 0) & (yin < H)
    xs, ys = xin - 0.5, yin - 0.5
    fx, fy = torch.floor(xs), torch.floor(ys)
    dx, dy = (xs - fx)[:, None], (ys - fy)[:, None]
    # far-off coordinates only matter through their clamp; keep them in int range
    ix, iy = fx.clamp(-4, W + 4).long(), fy.clamp(-4, H + 4).long()
    src = x.reshape(n, c, H * W).double()

    def tap(yy, xx):
        idx = (yy.clamp(0, H - 1) * W + xx.clamp(0, W - 1)).view(n, 1, H * W).expand(n, c, H * W)
        return src.gather(2, idx).view(n, c, H, W)

    if bicubic:
        def cubic(v1, v2, v3, v4, d):
            p1 = v2
            p2 = -v1 + v3
            p3 = 2 * (v1 - v2) + v3 - v4
            p4 = -v1 + v2 - v3 + v4
            return p1 + d * (p2 + d * (p3 + d * p4))

        rows = [cubic(*(tap(iy + r, ix + k) for k in (-1, 0, 1, 2)), dx) for r in (-1, 0, 1, 2)]
        v = cubic(*rows, dy)
    else:
        def lin(a_, b_, d):
            return a_ + (b_ - a_) * d

        v1 = lin(tap(iy, ix), tap(iy, ix + 1), dx)
        v2 = lin(tap(iy + 1, ix), tap(iy + 1, ix + 1), dx)
        v = lin(v1, v2, dy)
    out = v.clamp_(0, 255).trunc_().float()
    return torch.where(valid[:, None], out, fill.view(n, c, 1, 1).to(out.dtype))


def _affine_matrix(op: OpParams, size: int) -> list[float]:
    name, args = op.name, op.args
    if name == "Rotate":  # Image.rotate about the centre, no expand
        w = h = size
        angle = -math.radians(args[0] % 360.0)
        m = [round(math.cos(angle), 15), round(math.sin(angle), 15), 0.0,
             round(-math.sin(angle), 15), round(math.cos(angle), 15), 0.0]
        cx, cy = w / 2, h / 2
        m[2] = m[0] * -cx + m[1] * -cy + m[2] + cx
        m[5] = m[3] * -cx + m[4] * -cy + m[5] + cy
        return m
    f = float(args[0])
    return {
        "ShearX": [1, f, 0, 0, 1, 0],
        "ShearY": [1, 0, 0, f, 1, 0],
        "TranslateX": [1, 0, f, 0, 1, 0],
        "TranslateY": [1, 0, 0, 0, 1, f],
        "TranslateXRel": [1, 0, f * size, 0, 1, 0],
        "TranslateYRel": [1, 0, 0, 0, 1, f * size],
    }[name]


def _rotate_fast_path(op: OpParams) -> float | None:
    """Image.rotate's exact shortcuts (0 and 180 degrees; 90/270 on square images)."""
    a = op.args[0] % 360.0
    return a if a in (0.0, 90.0, 180.0, 270.0) else None


# ---- Gaussian blur: Pillow's three extended box blurs -------------------------------------------

def _box_radius(radius: float, passes: int = 3) -> float:
    """``_gaussian_blur_radius`` of BoxBlur.c, in its float32 / double mix."""
    f = np.float32
    sigma2 = f(f(radius) * f(radius)) / f(passes)
    L = f(math.sqrt(12.0 * float(sigma2) + 1.0))
    l = f(math.floor((float(L) - 1.0) / 2.0))
    a = f((f(2) * l + f(1)) * (l * (l + f(1)) - f(3) * sigma2))
    a = f(a / (f(6) * (sigma2 - (l + f(1)) * (l + f(1)))))
    return float(f(l + a))


def _box_blur_rows(x: torch.Tensor, radius: list[float]) -> torch.Tensor:
    """One ``ImagingHorizontalBoxBlur`` pass along the last axis, per-sample radius, in
    Pillow's 8.24 fixed point: taps inside the integer radius weigh ``ww``, the two just
    outside weigh ``fw``, edges replicated, rounded."""
    n, c, h, w = x.shape
    dev = x.device
    r_int = [int(r) for r in radius]
    ww = [int(np.float32(1 << 24) / (np.float32(r) * np.float32(2) + np.float32(1))) for r in radius]
    fw = [((1 << 24) - (2 * ri + 1) * wi) // 2 for ri, wi in zip(r_int, ww)]
    R = max(r_int) + 1
    v = x.to(torch.int64)
    pad = torch.cat([v[..., :1].expand(n, c, h, R), v, v[..., -1:].expand(n, c, h, R)], dim=-1)
    csum = torch.nn.functional.pad(torch.cumsum(pad, -1), (1, 0))  # csum[k] = sum pad[:k]
    ri = torch.tensor(r_int, device=dev).view(n, 1, 1, 1)
    pos = torch.arange(w, device=dev).view(1, 1, 1, w) + R  # index of x in pad
    g = lambda t: t.expand(n, c, h, w)  # noqa: E731
    acc = csum.gather(-1, g(pos + ri + 1)) - csum.gather(-1, g(pos - ri))
    far = pad.gather(-1, g(pos - ri - 1)) + pad.gather(-1, g(pos + ri + 1))
    bulk = acc * torch.tensor(ww, device=dev).view(n, 1, 1, 1) + far * torch.tensor(fw, device=dev).view(n, 1, 1, 1)
    out = (bulk + (1 << 23)) >> 24
    return out.to(x.dtype)


def _gaussian_blur(x: torch.Tensor, radius: list[float]) -> torch.Tensor:
    rb = [_box_radius(r) for r in radius]
    keep = torch.tensor([r == 0 for r in radius], device=x.device).view(-1, 1, 1, 1)
    y = x
    for _ in range(3):
        y = _box_blur_rows(y, rb)
    y = y.transpose(-1, -2)
    for _ in range(3):
        y = _box_blur_rows(y, rb)
    y = y.transpose(-1, -2).contiguous()
    return torch.where(keep, x, y)


# ---- ops ----------------------------------------------------------------------------------------

def apply_ops(x: torch.Tensor, ops: Sequence[OpParams]) -> torch.Tensor:
    """Op ``ops[i]`` on sample ``x[i]``, all of one kind (same name; same resample for the
    geometric ops): float32 [n, 3, S, S] integer-valued in, the same out."""
    name = ops[0].name
    dev = x.device
    if name == "AutoContrast":
        return _autocontrast(x)
    if name == "Equalize":
        return _equalize(x)
    if name == "Invert":
        return 255 - x
    if name.startswith("Posterize"):
        return _posterize(x, _col([int(o.args[0]) for o in ops], dev))
    if name.startswith("Solarize") and name != "SolarizeAdd":
        t = _col([float(o.args[0]) for o in ops], dev)
        return torch.where(x < t, x, 255 - x)
    if name == "SolarizeAdd":
        add = _col([float(o.args[0]) for o in ops], dev)
        return torch.where(x < 128, torch.clamp(x + add, max=255), x)
    if name == "Desaturate":
        return _color(x, _col([min(1.0, max(0.0, 1.0 - o.args[0])) for o in ops], dev))
    enhance = {"Color": _color, "Contrast": _contrast, "Brightness": _brightness, "Sharpness": _sharpness}
    base = name[:-len("Increasing")] if name.endswith("Increasing") else name
    if base in enhance:
        return enhance[base](x, _col([float(o.args[0]) for o in ops], dev))
    if name == "GaussianBlur":
        return _gaussian_blur(x, [float(o.args[0]) for o in ops])
    if name in _GEOMETRIC:
        return _geometric(x, ops)
    raise ValueError(f"render_torch: unknown op {name!r}")


def _geometric(x: torch.Tensor, ops: Sequence[OpParams]) -> torch.Tensor:
    size = x.shape[-1]
    dev = x.device
    out = x.clone()
    fast = [_rotate_fast_path(o) if o.name == "Rotate" else None for o in ops]
    for angle, k in ((90.0, 1), (180.0, 2), (270.0, 3)):
        idx = [i for i, a in enumerate(fast) if a == angle]
        if idx:  # transpose fast paths: exact rotations (counter-clockwise)
            t = torch.tensor(idx, device=dev)
            out[t] = torch.rot90(x[t], k, dims=(-2, -1))
    rest = [i for i, a in enumerate(fast) if a is None]
    for bicubic in (False, True):
        idx = [i for i in rest if (ops[i].resample == "bicubic") == bicubic]
        if not idx:
            continue
        if not bicubic and any(ops[i].resample not in ("bilinear", None) for i in idx):
            bad = {ops[i].resample for i in idx} - {"bilinear", None}
            raise ValueError(f"render_torch: geometric resample {bad} not supported (bilinear, bicubic)")
        t = torch.tensor(idx, device=dev)
        mats = torch.tensor([_affine_matrix(ops[i], size) for i in idx], dtype=torch.float64, device=dev)
        fill = torch.tensor([list(ops[i].fill or (0, 0, 0)) for i in idx], dtype=torch.float32, device=dev)
        out[t] = _affine(x[t], mats, fill, bicubic)
    return out


def _run_op_lists(x: torch.Tensor, op_lists: Sequence[Sequence[OpParams]]) -> torch.Tensor:
    """Sample i through its own op list, batched by op position and kind."""
    dev = x.device
    depth = max((len(o) for o in op_lists), default=0)
    x = x.clone()  # updated in place below; the caller's tensor stays as it was
    for j in range(depth):
        groups: dict[tuple, list[int]] = {}
        for i, ops in enumerate(op_lists):
            if j < len(ops):
                o = ops[j]
                key = (o.name, o.resample if o.name in _GEOMETRIC else None)
                groups.setdefault(key, []).append(i)
        for idx in groups.values():
            ops_j = [op_lists[i][j] for i in idx]
            if len(idx) == len(op_lists):
                x = apply_ops(x, ops_j)
            else:
                t = torch.tensor(idx, device=dev)
                x.index_copy_(0, t, apply_ops(x.index_select(0, t), ops_j))
    return x


def _augmix(x: torch.Tensor, mixes: Sequence[dict]) -> torch.Tensor:
    """timm's AugMix (basic or blended) per sample, chains batched by chain index."""
    dev = x.device
    n = x.shape[0]
    blended = [bool(m["blended"]) for m in mixes]
    width = max(len(m["chains"]) for m in mixes)
    out = x.clone()
    if any(not b for b in blended):
        idx = [i for i in range(n) if not blended[i]]
        t = torch.tensor(idx, device=dev)
        img = x.index_select(0, t)
        mixed = torch.zeros_like(img)
        for k in range(width):
            sel = [j for j, i in enumerate(idx) if k < len(mixes[i]["chains"])]
            w = _col([float(np.float32(mixes[idx[j]]["weights"][k])) if j in sel else 0.0 for j in range(len(idx))], dev)
            chains = [mixes[idx[j]]["chains"][k] if j in sel else [] for j in range(len(idx))]
            aug = _run_op_lists(img, chains)
            mixed = mixed + w * aug  # numpy: mixed += float32(w) * aug, in float32
        mixed = mixed.clamp_(0, 255).trunc_()
        m = _col([float(mixes[i]["m"]) for i in idx], dev)
        out = out.index_copy(0, t, _blend(img, mixed, m))
    if any(blended):
        idx = [i for i in range(n) if blended[i]]
        t = torch.tensor(idx, device=dev)
        orig = x.index_select(0, t)
        cur = orig
        rws = []
        for i in idx:
            ws = np.float32(mixes[i]["weights"]) * np.float32(mixes[i]["m"])
            cump, r = 1.0, []
            for w in ws[::-1]:
                a = w / cump
                cump *= 1 - a
                r.append(a)
            rws.append([float(v) for v in r[::-1]])
        for k in range(width):
            chains = [mixes[i]["chains"][k] if k < len(mixes[i]["chains"]) else [] for i in idx]
            aug = _run_op_lists(orig, chains)
            a = _col([rws[j][k] if k < len(rws[j]) else 0.0 for j in range(len(idx))], dev)
            cur = _blend(cur, aug, a)
        out = out.index_copy(0, t, cur)
    return out


_JITTER = {"brightness": _brightness, "contrast": _contrast, "saturation": _color}


def _jitter(x: torch.Tensor, jit: Sequence[dict]) -> torch.Tensor:
    dev = x.device
    x = x.clone()
    for j in range(3):
        groups: dict[str, list[int]] = {}
        for i, d in enumerate(jit):
            groups.setdefault(d["order"][j], []).append(i)
        for name, idx in groups.items():
            f = _col([float(jit[i][name]) for i in idx], dev)
            t = torch.tensor(idx, device=dev)
            x.index_copy_(0, t, _JITTER[name](x.index_select(0, t), f))
    return x


# ---- erasing ------------------------------------------------------------------------------------

def _erase(x: torch.Tensor, params: Sequence[ViewParams]) -> torch.Tensor:
    """Random erasing as ``render_pil.erase``: the noise of each record is drawn on the CPU
    from a generator seeded with its ``erase_seed`` (box by box, in order), all of it moved in
    one copy, and written one box position at a time (a later box overwrites an earlier one)."""
    n, c, s, _ = x.shape
    dev = x.device
    depth = max(len(p.erase) for p in params)
    fills: list[list[torch.Tensor]] = []
    for p in params:  # CPU generators: the exact numbers render_pil draws
        g = torch.Generator().manual_seed(p.erase_seed) if p.erase else None
        f = []
        for top, left, h, w in p.erase:
            if p.erase_mode == "pixel":
                f.append(torch.empty((c, h, w)).normal_(generator=g).reshape(-1))
            elif p.erase_mode == "rand":
                f.append(torch.empty((c, 1, 1)).normal_(generator=g).expand(c, h, w).reshape(-1))
            else:
                f.append(torch.zeros(c * h * w))
        fills.append(f)
    flat = x.reshape(-1)
    for k in range(depth):
        vals, idx = [], []
        for i, p in enumerate(params):
            if k < len(p.erase):
                top, left, h, w = p.erase[k]
                vals.append(fills[i][k])
                cc = torch.arange(c).view(c, 1, 1) * (s * s)
                yy = (torch.arange(h) + top).view(1, h, 1) * s
                xx = (torch.arange(w) + left).view(1, 1, w)
                idx.append((i * c * s * s + cc + yy + xx).reshape(-1))
        if idx:
            flat[torch.cat(idx).to(dev)] = torch.cat(vals).to(dev)
    return x


# ---- the renderer -------------------------------------------------------------------------------

def render_base(images: list[torch.Tensor], params: list[ViewParams], size: int) -> torch.Tensor:
    """The un-mixed views: float32 [B, 3, size, size] on the images' device, in [0, 1] (noise
    erasing may write outside), from uint8 [3, H, W] images whose (W, H) is each record's
    ``src_size``. Crop + resize, flips, policy ops in order, AugMix, colour jitter, erasing:
    render_pil's steps, each batched over the samples that need it."""
    if len(images) != len(params):
        raise ValueError(f"{len(images)} images for {len(params)} records")
    if not params:
        return torch.empty((0, 3, size, size))
    for im, p in zip(images, params):
        if im.dtype != torch.uint8 or im.dim() != 3 or im.shape[0] != 3:
            raise ValueError(f"view ({p.epoch},{p.row}): expected a uint8 [3, H, W] image, got {im.dtype} {tuple(im.shape)}")
        if (im.shape[2], im.shape[1]) != tuple(p.src_size):
            raise ValueError(f"view ({p.epoch},{p.row}): record is for a {tuple(p.src_size)} image, "
                             f"got {(im.shape[2], im.shape[1])}")
    dev = images[0].device
    x = crop_resize(images, params, size)
    hf = torch.tensor([p.hflip for p in params], device=dev).view(-1, 1, 1, 1)
    vf = torch.tensor([p.vflip for p in params], device=dev).view(-1, 1, 1, 1)
    if any(p.hflip for p in params):
        x = torch.where(hf, x.flip(-1), x)
    if any(p.vflip for p in params):
        x = torch.where(vf, x.flip(-2), x)
    if any(p.ops for p in params):
        x = _run_op_lists(x, [p.ops for p in params])
    am = [i for i, p in enumerate(params) if p.augmix]
    if am:
        t = torch.tensor(am, device=dev)
        x = x.index_copy(0, t, _augmix(x.index_select(0, t), [params[i].augmix for i in am]))
    jt = [i for i, p in enumerate(params) if p.jitter]
    if jt:
        t = torch.tensor(jt, device=dev)
        x = x.index_copy(0, t, _jitter(x.index_select(0, t), [params[i].jitter for i in jt]))
    x = x / 255
    if any(p.erase for p in params):
        x = _erase(x, params)
    return x


def mix(x: torch.Tensor, partner: torch.Tensor, params: list[ViewParams]) -> torch.Tensor:
    """Row i of ``x`` mixed with row i of ``partner`` as ``params[i]`` says: mixup
    ``x * lam + partner * (1 - lam)`` (float32, as render_pil), cutmix the partner's pixels in
    ``box`` = (top, left, h, w); rows with mix "none" unchanged."""
    n, _, h, w = x.shape
    dev = x.device
    if len(params) != n or partner.shape != x.shape:
        raise ValueError(f"mix: {n} rows, {len(params)} records, partner {tuple(partner.shape)}")
    out = x
    cut = [i for i, p in enumerate(params) if p.mix == "cutmix"]
    if cut:
        b = torch.zeros((n, 4), dtype=torch.long)
        for i in cut:
            b[i] = torch.tensor(params[i].box)
        b = b.to(dev)
        ys = torch.arange(h, device=dev).view(1, h, 1)
        xs = torch.arange(w, device=dev).view(1, 1, w)
        top, left, bh, bw = (b[:, k].view(n, 1, 1) for k in range(4))
        inside = (ys >= top) & (ys < top + bh) & (xs >= left) & (xs < left + bw)
        out = torch.where(inside[:, None], partner, out)
    up = [i for i, p in enumerate(params) if p.mix == "mixup"]
    if up:
        lam = _col([params[i].lam if params[i].mix == "mixup" else 1.0 for i in range(n)], dev, x.dtype)
        rest = _col([1.0 - params[i].lam if params[i].mix == "mixup" else 0.0 for i in range(n)], dev, x.dtype)
        is_up = torch.tensor([p.mix == "mixup" for p in params], device=dev).view(n, 1, 1, 1)
        out = torch.where(is_up, x * lam + partner * rest, out)
    return out
