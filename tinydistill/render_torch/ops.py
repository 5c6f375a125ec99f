"""Policy ops on a batch: Pillow's uint8 arithmetic on float32 [n, 3, S, S] integer values.

Every op rounds or truncates where Pillow's C code does, so it gives PIL's pixels; each runs
once per op kind (or op position in a record) over all the samples that need it, with their
numbers as per-sample tensors (see ``docs/render.md``).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..params import _GEOMETRIC, OpParams, blended_augmix_weights
from ._device import _col, _const, _update_rows, constant, upload


# ---- PIL's uint8 arithmetic, batched ------------------------------------------------------------

def _blend(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``Image.blend(a, b, alpha)``: a + alpha * (b - a) in float32, truncated, clipped
    (``a`` may broadcast: a grey image [n, 1, S, S] or a mean [n, 1, 1, 1])."""
    return (a + (b - a) * alpha).trunc_().clamp_(0, 255)


_GREY_WEIGHTS = [[[[19595]], [[38470]], [[7471]]]]  # [1, 3, 1, 1]


def _grey(x: torch.Tensor) -> torch.Tensor:
    """``convert("L")``: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16, exact in float32: every
    product and partial sum is an integer below 2**24 (so any summation order gives the same
    bits), and the shift is a multiplication by 2**-16, exact as a power of two (the same
    bits as a division, on any device)."""
    s = (x * constant(_GREY_WEIGHTS, x.device)).sum(1, keepdim=True).add_(32768)
    return s.mul_(1.0 / 65536).floor_()


def _color(x, factor):
    return _blend(_grey(x), x, factor)


def _contrast(x, factor):
    g = _grey(x)
    # integers summed in float64: exact whatever the order; Python's int(sum / count + 0.5)
    total = g.sum(dim=(1, 2, 3), keepdim=True, dtype=torch.float64)
    mean = (total / _const(g.shape[2] * g.shape[3], x.device, torch.float64)).add_(0.5).floor_().float()
    return _blend(mean, x, factor)


def _brightness(x, factor):
    # _blend(zeros, x, factor): 0 + (x - 0) * f is x * f exactly (x, f >= 0)
    return (x * factor).trunc_().clamp_(0, 255)


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
    # a fixed 256-bin histogram per row: bincount's output size depends on the data, so on
    # CUDA it reads its range back to the host; scatter_add_ needs no host read
    h = torch.zeros((n * c, 256), dtype=torch.int64, device=x.device).scatter_add_(1, v, torch.ones_like(v))
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


def _posterize(x, step):
    """``ImageOps.posterize``: floor(x / step) * step, ``step`` = 2 ** (8 - bits) per sample
    (powers of two: exact)."""
    return torch.floor(x / step) * step


AFFINE_DTYPE = torch.float64  # Pillow's: float32 changes pixels (measured; docs/render.md)


def _affine(x: torch.Tensor, mats: torch.Tensor, fill: torch.Tensor, bicubic: bool) -> torch.Tensor:
    """``Image.transform(size, AFFINE, mats[i], resample, fillcolor=fill[i])`` for each sample:
    Pillow's GenericTransform with its bilinear / bicubic (a = -1) filters, in float64,
    edge-clamped taps, truncated; output pixels whose source is off the image get ``fill``.
    Taps are gathered a filter row at a time (one gather for the row's 2 or 4 columns)."""
    n, c, H, W = x.shape
    dev, dt = x.device, AFFINE_DTYPE
    a = mats.to(dt).view(n, 6, 1, 1).unbind(1)
    xo = (torch.arange(W, device=dev, dtype=dt) + 0.5).view(1, 1, W)
    yo = (torch.arange(H, device=dev, dtype=dt) + 0.5).view(1, H, 1)
    xin = (a[0] * xo + a[1] * yo) + a[2]  # [n, H, W]
    yin = (a[3] * xo + a[4] * yo) + a[5]
    valid = (xin >= 0) & (xin < W) & (yin >= 0) & (yin < H)
    xs, ys = xin - 0.5, yin - 0.5
    fx, fy = torch.floor(xs), torch.floor(ys)
    dx, dy = (xs - fx)[:, None], (ys - fy)[:, None]
    # far-off coordinates only matter through their clamp; keep them in int range
    ix, iy = fx.clamp(-4, W + 4).long(), fy.clamp(-4, H + 4).long()
    r = 4 if bicubic else 2
    t = constant([-1, 0, 1, 2] if bicubic else [0, 1], dev, torch.int64).view(1, r, 1, 1)
    cols = (ix[:, None] + t).clamp_(0, W - 1)  # [n, r, H, W]
    rows = (iy[:, None] + t).clamp_(0, H - 1).mul_(W).unbind(1)  # r x [n, H, W]
    src = x.reshape(n, c, H * W).to(dt)

    def row(k):  # the r taps of filter row k: r x [n, c, H, W]
        idx = (cols + rows[k][:, None]).view(n, 1, r * H * W).expand(n, c, r * H * W)
        return src.gather(2, idx).view(n, c, r, H, W).unbind(2)

    if bicubic:
        def cubic(v1, v2, v3, v4, d):
            p1 = v2
            p2 = -v1 + v3
            p3 = 2 * (v1 - v2) + v3 - v4
            p4 = -v1 + v2 - v3 + v4
            return p1 + d * (p2 + d * (p3 + d * p4))

        v = cubic(*(cubic(*row(k), dx) for k in range(4)), dy)
    else:
        def lin(a_, b_, d):
            return a_ + (b_ - a_) * d

        v = lin(lin(*row(0), dx), lin(*row(1), dx), dy)
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


def _box_tables(radius: list[float]) -> np.ndarray:
    """Per-sample integer radius, inner weight ``ww`` and edge weight ``fw`` of Pillow's box
    blur (8.24 fixed point): int64 [3, n, 1, 1, 1]."""
    r_int = [int(r) for r in radius]
    ww = [int(np.float32(1 << 24) / (np.float32(r) * np.float32(2) + np.float32(1))) for r in radius]
    fw = [((1 << 24) - (2 * ri + 1) * wi) // 2 for ri, wi in zip(r_int, ww)]
    return np.array([r_int, ww, fw], np.int64).reshape(3, len(radius), 1, 1, 1)


def _box_blur_rows(x: torch.Tensor, R: int, tables: torch.Tensor) -> torch.Tensor:
    """One ``ImagingHorizontalBoxBlur`` pass along the last axis, per-sample radius, in
    Pillow's 8.24 fixed point: taps inside the integer radius weigh ``ww``, the two just
    outside weigh ``fw``, edges replicated, rounded. ``tables``: :func:`_box_tables` on the
    device; ``R``: the largest integer radius + 1."""
    n, c, h, w = x.shape
    dev = x.device
    v = x.to(torch.int64)
    pad = torch.cat([v[..., :1].expand(n, c, h, R), v, v[..., -1:].expand(n, c, h, R)], dim=-1)
    csum = torch.nn.functional.pad(torch.cumsum(pad, -1), (1, 0))  # csum[k] = sum pad[:k]
    ri, wwt, fwt = tables.unbind(0)
    pos = torch.arange(w, device=dev).view(1, 1, 1, w) + R  # index of x in pad
    g = lambda t: t.expand(n, c, h, w)  # noqa: E731
    acc = csum.gather(-1, g(pos + ri + 1)) - csum.gather(-1, g(pos - ri))
    far = pad.gather(-1, g(pos - ri - 1)) + pad.gather(-1, g(pos + ri + 1))
    bulk = acc * wwt + far * fwt
    out = (bulk + (1 << 23)) >> 24
    return out.to(x.dtype)


def _gaussian_blur(x: torch.Tensor, radius: list[float]) -> torch.Tensor:
    rb = [_box_radius(r) for r in radius]
    R = max(int(r) for r in rb) + 1
    keep, tables = upload(np.array([r == 0 for r in radius]).reshape(-1, 1, 1, 1), _box_tables(rb), device=x.device)
    y = x
    for _ in range(3):
        y = _box_blur_rows(y, R, tables)
    y = y.transpose(-1, -2)
    for _ in range(3):
        y = _box_blur_rows(y, R, tables)
    y = y.transpose(-1, -2).contiguous()
    return torch.where(keep, x, y)




# ---- ops ----------------------------------------------------------------------------------------

def _op_key(o: OpParams) -> str:
    """Ops batched together: one kind, or every geometric op (one affine pass per resample)."""
    return "geometric" if o.name in _GEOMETRIC else o.name


def apply_ops(x: torch.Tensor, ops: Sequence[OpParams]) -> torch.Tensor:
    """Op ``ops[i]`` on sample ``x[i]``, all of one kind (same name; geometric ops of any names
    and resamples may be mixed): float32 [n, 3, S, S] integer-valued in, a new tensor out."""
    name = ops[0].name
    dev = x.device
    if name in _GEOMETRIC:
        return _geometric(x, ops)
    if name == "AutoContrast":
        return _autocontrast(x)
    if name == "Equalize":
        return _equalize(x)
    if name == "Invert":
        return 255 - x
    if name.startswith("Posterize"):
        bits = np.array([int(o.args[0]) for o in ops], np.int64)
        return _posterize(x, _col(np.exp2(np.clip(8 - bits, 0, 8)), dev))
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
    raise ValueError(f"render_torch: unknown op {name!r}")


def _affine_groups(ops: Sequence[OpParams], rest: list[int]) -> list[tuple[list[int], bool]]:
    """The positions ``rest`` of geometric ops split by resample: (positions, bicubic) pairs."""
    groups = []
    for bicubic in (False, True):
        idx = [i for i in rest if (ops[i].resample == "bicubic") == bicubic]
        if not idx:
            continue
        if not bicubic and any(ops[i].resample not in ("bilinear", None) for i in idx):
            bad = {ops[i].resample for i in idx} - {"bilinear", None}
            raise ValueError(f"render_torch: geometric resample {bad} not supported (bilinear, bicubic)")
        groups.append((idx, bicubic))
    return groups


def _geometric(x: torch.Tensor, ops: Sequence[OpParams]) -> torch.Tensor:
    """Geometric ops of any names: one affine pass per resample; Image.rotate's exact
    transpose shortcuts (multiples of 90 degrees) where a rotation has one."""
    size = x.shape[-1]
    dev = x.device
    fast = [_rotate_fast_path(o) if o.name == "Rotate" else None for o in ops]
    groups = _affine_groups(ops, [i for i, a in enumerate(fast) if a is None])

    def tables(idx):  # the rows' affine matrices and fills, and their positions: one copy
        return upload(np.array([_affine_matrix(ops[i], size) for i in idx], np.float64),
                      np.array([list(ops[i].fill or (0, 0, 0)) for i in idx], np.float32),
                      np.array(idx, np.int64), device=dev)

    if len(groups) == 1 and len(groups[0][0]) == len(ops):  # the usual case: one pass over all
        mats, fill, _ = tables(groups[0][0])
        return _affine(x, mats, fill, groups[0][1])
    out = x.clone()
    for angle, k in ((90.0, 1), (180.0, 2), (270.0, 3)):
        idx = [i for i, a in enumerate(fast) if a == angle]
        if idx:  # transpose fast paths: exact rotations (counter-clockwise)
            _update_rows(out, idx, lambda xs, k=k: torch.rot90(xs, k, dims=(-2, -1)), src=x)
    for idx, bicubic in groups:
        mats, fill, t = tables(idx)
        _update_rows(out, idx, lambda xs, m=mats, f=fill, b=bicubic: _affine(xs, m, f, b), src=x, t=t)
    return out


def _run_op_lists(x: torch.Tensor, op_lists: Sequence[Sequence[OpParams]], inplace: bool = False) -> torch.Tensor:
    """Sample i through its own op list, batched by op position and kind (every geometric op
    of a position in one group). ``inplace``: ``x`` may be overwritten (else it is cloned
    before the first partial update)."""
    n = len(op_lists)
    depth = max((len(o) for o in op_lists), default=0)
    owned = inplace
    for j in range(depth):
        groups: dict[str, list[int]] = {}
        for i, ops in enumerate(op_lists):
            if j < len(ops):
                groups.setdefault(_op_key(ops[j]), []).append(i)
        for idx in groups.values():
            ops_j = [op_lists[i][j] for i in idx]
            if len(idx) == n:
                y = apply_ops(x, ops_j)
                owned = owned or y is not x
                x = y
            else:
                if not owned:
                    x, owned = x.clone(), True
                _update_rows(x, idx, lambda xs, ops_j=ops_j: apply_ops(xs, ops_j))
    return x


def _augmix_basic(img: torch.Tensor, mixes: Sequence[dict], width: int) -> torch.Tensor:
    """timm's basic AugMix: the chains' float32 weighted sum, clipped and truncated, blended
    with the image by ``m``."""
    dev = img.device
    mixed = torch.zeros_like(img)
    for k in range(width):
        w = _col([float(np.float32(m["weights"][k])) if k < len(m["chains"]) else 0.0 for m in mixes], dev)
        aug = _run_op_lists(img, [m["chains"][k] if k < len(m["chains"]) else [] for m in mixes])
        mixed = mixed + w * aug  # numpy: mixed += float32(w) * aug, in float32
    mixed = mixed.clamp_(0, 255).trunc_()
    return _blend(img, mixed, _col([float(m["m"]) for m in mixes], dev))


def _augmix_blended(orig: torch.Tensor, mixes: Sequence[dict], width: int) -> torch.Tensor:
    """timm's blended AugMix: each chain's output blended into the running image in turn."""
    rws = [blended_augmix_weights(m) for m in mixes]
    cur = orig
    for k in range(width):
        aug = _run_op_lists(orig, [m["chains"][k] if k < len(m["chains"]) else [] for m in mixes])
        cur = _blend(cur, aug, _col([r[k] if k < len(r) else 0.0 for r in rws], orig.device))
    return cur


def _augmix(x: torch.Tensor, mixes: Sequence[dict]) -> torch.Tensor:
    """timm's AugMix (basic or blended) per sample, chains batched by chain index."""
    width = max(len(m["chains"]) for m in mixes)
    out = x.clone()
    for blended, run in ((False, _augmix_basic), (True, _augmix_blended)):
        idx = [i for i, m in enumerate(mixes) if bool(m["blended"]) == blended]
        if idx:
            _update_rows(out, idx, lambda xs, idx=idx, run=run: run(xs, [mixes[i] for i in idx], width), src=x)
    return out


_JITTER = {"brightness": _brightness, "contrast": _contrast, "saturation": _color}


def _jitter(x: torch.Tensor, jit: Sequence[dict], inplace: bool = False) -> torch.Tensor:
    """torchvision's colour jitter (brightness, contrast, saturation) in each record's order."""
    dev = x.device
    if not inplace:
        x = x.clone()
    for j in range(3):
        groups: dict[str, list[int]] = {}
        for i, d in enumerate(jit):
            groups.setdefault(d["order"][j], []).append(i)
        for name, idx in groups.items():
            f = _col([float(jit[i][name]) for i in idx], dev)
            if len(idx) == len(jit):
                x = _JITTER[name](x, f)
                continue
            _update_rows(x, idx, lambda xs, name=name, f=f: _JITTER[name](xs, f))
    return x
