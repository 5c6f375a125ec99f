"""Views: (epoch, row) -> a parameter record -> pixels, the same in any process.

:class:`Views` is the view core both stages, ``verify``, the replay canary and notebooks go
through. For a set of rows of one epoch it finds each row's mix partner (a seeded pairing of
its mix group), decodes every image it needs once, draws each view's record
(:mod:`tinydistill.params`) and renders it (:mod:`tinydistill.render_pil`). Which rows go to
which worker, rank or batch is the stream's business (:mod:`tinydistill.stream`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .augment import AugSpec
from .batch import Batch, Encoded
from .errors import TinydistillError, one_line
from .params import Policy, ViewParams, mix_pairs
from .seeds import encode_seed
from .sources import BadSampleError, Source

VIEW_FORMAT = 2  # how views are made: 1 = timm transforms under reseeded global RNGs; 2 = records


class ReplayError(TinydistillError):
    """The data, spec or libraries no longer give the views the teacher saw."""


@dataclass
class View:
    """One rendered view, as the teacher saw it before its own resize and normalisation."""

    epoch: int
    row: int
    key: str
    seed: int
    image: torch.Tensor  # float32 [3, H, W], pixels in [0, 1]
    label: int
    partner: int  # row mixed in (== row when not mixed)
    partner_label: int
    lam: float  # weight of this row's image (1.0 when not mixed)
    params: ViewParams | None = None  # the record the pixels were rendered from
    attention: np.ndarray | None = None  # the teacher's G x G map over the view (stores with maps)

    def to_pil(self):
        from torchvision.transforms.functional import to_pil_image

        return to_pil_image(self.image.clamp(0, 1))

    # notebook display; self-contained (numpy + Pillow only) so it can move with the class
    def __repr__(self) -> str:
        shape = "x".join(str(d) for d in getattr(self.image, "shape", ()))
        mixed = (f", mixed with row {self.partner} (label {self.partner_label}) at lam={self.lam:.3f}"
                 if self.partner != self.row else "")
        return (f"View(epoch={self.epoch}, row={self.row}, key={self.key!r}, label={self.label}"
                f"{mixed}, image {shape})")

    def _repr_png_(self) -> bytes:
        """PNG for Jupyter: the view, enlarged to at least 160 px, over a caption naming the
        label and, for a mixed view, the partner row, its label and the mixing weights."""
        import io

        from PIL import Image, ImageDraw

        img = self.image.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
        pic = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
        scale = max(1, -(-160 // max(1, min(pic.size))))
        pic = pic.convert("RGB").resize((pic.width * scale, pic.height * scale), Image.NEAREST)
        lines = [f"epoch {self.epoch}, row {self.row}, label {self.label}"]
        if self.attention is not None and np.isfinite(self.attention).all():
            pic = _side_by_side(pic, attention_overlay(pic, self.attention))
            lines.append(f"right: the teacher's {len(self.attention)}x{len(self.attention)} attention, max cell "
                         f"{float(self.attention.max()):.3f}")
        if self.partner != self.row:
            lines.append(f"{self.lam:.2f} x this + {1 - self.lam:.2f} x row {self.partner} (label {self.partner_label})")
        width = max(pic.width, 7 * max(len(s) for s in lines) + 8)
        canvas = Image.new("RGB", (width, pic.height + 14 * len(lines) + 6), "white")
        canvas.paste(pic, ((width - pic.width) // 2, 0))
        draw = ImageDraw.Draw(canvas)
        for i, s in enumerate(lines):
            draw.text((4, pic.height + 3 + 14 * i), s, fill="black")
        buf = io.BytesIO()
        canvas.save(buf, format="PNG")
        return buf.getvalue()


def attention_overlay(pic, attention: np.ndarray):
    """The picture under a G x G attention map: each cell of the view is tinted red in
    proportion to its share of the map's largest cell (bilinear between cells), the rest dimmed."""
    from PIL import Image

    a = np.asarray(attention, np.float64)
    top = a.max() if a.size and a.max() > 0 else 1.0
    heat = Image.fromarray(np.uint8(np.clip(a / top, 0, 1) * 255)).resize(pic.size, Image.BILINEAR)
    h = np.asarray(heat, np.float64)[..., None] / 255
    base = np.asarray(pic.convert("RGB"), np.float64)
    red = np.array([255.0, 40.0, 0.0])
    out = base * (0.35 + 0.35 * (1 - h)) + red * 0.65 * h
    return Image.fromarray(np.uint8(np.clip(out, 0, 255)))


def _side_by_side(left, right):
    from PIL import Image

    out = Image.new("RGB", (left.width + right.width + 4, max(left.height, right.height)), "white")
    out.paste(left, (0, 0))
    out.paste(right, (left.width + 4, 0))
    return out


class Views:
    """The views of one source under one spec and base seed."""

    def __init__(self, source: Source, spec: AugSpec, base_seed: int, skip_bad: bool = False, device="cpu",
                 decode: str = "auto"):
        self.source, self.spec, self.base_seed, self.skip_bad = source, spec, int(base_seed), skip_bad
        self.device = device  # where :meth:`render` runs the torch renderer
        self.decode = resolve_decode(decode, device)  # "device": JPEGs travel as bytes (the torch renderer)
        self.num_rows = len(source)
        self._policy: Policy | None = None
        self._pairs: dict[tuple[int, int], dict[int, int]] = {}

    def __getstate__(self):  # DataLoader workers build their own policy
        return {**self.__dict__, "_policy": None, "_pairs": {}}

    @property
    def policy(self) -> Policy:
        if self._policy is None:
            self._policy = Policy(self.spec)
        return self._policy

    def seed(self, epoch: int, row: int) -> int:
        return int(encode_seed(epoch, row, self.num_rows))

    def partners(self, epoch: int, rows: Sequence[int]) -> dict[int, int]:
        """Mix partner of each row (the row itself when the spec does not mix)."""
        if not self.spec.mixing:
            return {int(r): int(r) for r in rows}
        g = self.spec.mix_group
        out = {}
        for r in rows:
            group = int(r) // g
            key = (int(epoch), group)
            if key not in self._pairs:
                if len(self._pairs) > 64:
                    self._pairs.clear()
                members = np.arange(group * g, min((group + 1) * g, self.num_rows))
                self._pairs[key] = mix_pairs(self.base_seed, epoch, group, members)
            out[int(r)] = self._pairs[key][int(r)]
        return out

    def _needed(self, epoch: int, rows: Sequence[int]) -> tuple[list[int], dict[int, int], list[int]]:
        """(rows as ints, every needed row's mix partner, the rows whose images are needed:
        the rows and their partners, each once, ascending)."""
        rows = [int(r) for r in rows]
        partner = self.partners(epoch, rows)
        need = sorted(set(rows) | set(partner.values()))
        partner.update(self.partners(epoch, [q for q in need if q not in partner]))
        return rows, partner, need

    def params(self, epoch: int, row: int, src_size: tuple[int, int]) -> ViewParams:
        """The record of view (epoch, row) for a decoded image of ``src_size`` = (w, h)."""
        partner = self.partners(epoch, [row])[int(row)]
        return self.policy.draw(self.base_seed, epoch, row, self.seed(epoch, row), src_size, partner)

    def render(self, epoch: int, rows: Sequence[int], with_params: bool = False) -> Batch:
        """The views of ``rows`` of one epoch, in the order given, each image decoded once, as
        a :class:`~tinydistill.batch.Batch` with its pixels on the CPU (``valid`` False for a
        skipped unreadable image, whose pixels are zeros), and the records with
        ``with_params``. The spec's renderer makes the pixels (the torch renderer batched, on
        this core's device)."""
        if self.spec.renderer != "torch":
            return self._render_pil(epoch, rows, with_params)
        raw = self.encode(epoch, rows)
        out = self.render_encoded(raw, self.device)
        out.image = out.image.cpu()
        if with_params:  # none for an image that failed to decode, here or in render_encoded
            out.params = [raw.params[s] if s >= 0 and v else None
                          for s, v in zip(raw.slot.tolist(), out.valid.tolist())]
        return out

    def encode(self, epoch: int, rows: Sequence[int]) -> Encoded:
        """What a worker ships when the pixels are made in the main process (the torch
        renderer, :mod:`tinydistill.render_device`): each image the rows need, once, with its
        record, and per row which image it is and which it mixes with.

        Per-view work stays here, in the worker: with ``decode`` "device" the JPEGs the batched
        decoder takes (:func:`~tinydistill.render_torch.batchable`) travel as bytes and are
        decoded in the main process, on its device; every other image is decoded here and packed
        into one uint8 buffer (``pixels``, CHW per image at ``pix_off``), so the main process
        moves a batch's pixels in one copy. Erasing's noise and pixel positions are drawn
        here too (``erase_*``: one scatter on the device).
        """
        from . import render_torch

        rows, partner, need = self._needed(epoch, rows)
        ship = self.decode == "device"
        size = self.spec.img_size
        params, keys, jpeg, arrays, array_of, slot_of = [], [], [], [], [], {}
        e_slot, e_idx, e_val = [], [], []
        for r, item, src_size in self.source.read_encoded(need):
            if not isinstance(item, BadSampleError) and not (ship and _is_jpeg(item) and render_torch.batchable(item)):
                item = _decode_here(self.source, r, item)  # CHW uint8, or the error
            if isinstance(item, BadSampleError):
                if not self.skip_bad:
                    raise item
                continue
            p = self.policy.draw(self.base_seed, epoch, r, self.seed(epoch, r), src_size, partner[r])
            if isinstance(item, np.ndarray):
                if (item.shape[2], item.shape[1]) != tuple(src_size):
                    raise BadSampleError(f"{self.source.name}: {self.source.keys[r]}: decoded size "
                                         f"{item.shape[2]}x{item.shape[1]} differs from its header's "
                                         f"{src_size[0]}x{src_size[1]}")
                array_of.append(len(arrays))
                arrays.append(item)
            else:
                array_of.append(-1)
                jpeg.append(bytes(item))
            if p.erase:
                idx, val = render_torch.erase_fill(p, size)
                e_slot.append(np.full(len(idx), len(params), np.int64))
                e_idx.append(idx)
                e_val.append(val)
            slot_of[r] = len(params)
            params.append(p)
            keys.append(self.source.keys[r])
        labels = self.source.labels
        slot = np.array([slot_of.get(r, -1) for r in rows], np.int64)
        pslot, prow, lam = [], [], []
        for r, s in zip(rows, slot):
            p = params[s] if s >= 0 else None
            mixed = p is not None and p.mix != "none" and p.partner in slot_of
            pslot.append(slot_of[p.partner] if mixed else -1)
            prow.append(p.partner if mixed else r)
            lam.append(p.lam if mixed else 1.0)
        cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)  # noqa: E731
        flat, offsets, _, _ = render_torch.pack_numpy(arrays, layout="chw")  # with the crop windows' tail
        return Encoded(
            views=Batch.of(epoch=[int(epoch)] * len(rows), row=rows, seed=[self.seed(epoch, r) for r in rows],
                           label=labels[rows], partner=prow, partner_label=labels[prow], lam=lam, valid=slot >= 0),
            slot=slot, pslot=np.array(pslot, np.int64), params=params, keys=keys, jpeg=jpeg,
            pixels=torch.from_numpy(flat),  # a tensor: shared memory between processes
            pix_off=np.array([offsets[i] if i >= 0 else -1 for i in array_of], np.int64),
            erase_slot=cat(e_slot, np.int64),
            erase_idx=cat(e_idx, np.int64), erase_val=cat(e_val, np.float32))

    def render_encoded(self, raw: Encoded, device) -> Batch:
        """Encoded views (:meth:`encode`, or several merged by :meth:`Encoded.merge`) rendered
        by the torch renderer on ``device``: a :class:`Batch` with its pixels on ``device``. A
        fixed number of device ops per call, plus the decoder's per image."""
        from . import render_torch

        device = torch.device(device)
        size = self.spec.img_size
        n = len(raw)
        frames = None
        if (raw.slot >= 0).any():
            frames, bad = self._frames(raw, device)
            if bad:  # unreadable JPEGs (skip_bad): as if the worker had found them unreadable
                raw = _without(raw, bad)
        out = dataclasses.replace(raw.views)  # the pixels go into a copy
        rows = np.flatnonzero(raw.slot >= 0)
        if not len(rows):
            out.image = torch.zeros((n, 3, size, size), device=device)
            return out
        erase = (raw.erase_slot * (3 * size * size) + raw.erase_idx, raw.erase_val)
        base = render_torch.render_base(frames, raw.params, size, erase=erase)
        own, has = raw.slot[rows], raw.pslot[rows] >= 0
        rec = [raw.params[s] for s in own.tolist()]
        rec = [p if h or p.mix == "none" else _unmixed(p) for p, h in zip(rec, has.tolist())]
        sel, at = render_torch.upload(np.concatenate([own, np.where(has, raw.pslot[rows], own)]), rows, device=device)
        both = base.index_select(0, sel)
        img = render_torch.mix(both[:len(rows)], both[len(rows):], rec)
        if len(rows) < n:
            img = torch.zeros((n, 3, size, size), device=device).index_copy_(0, at, img)
        out.image = img
        return out

    def _frames(self, raw: Encoded, device):
        """(the unit's images on ``device`` as one packed buffer, the slots of JPEGs that could
        not be decoded): worker-decoded pixels moved in one copy, JPEGs decoded by the device's
        decoder. A JPEG that fails stops the unit naming its key, or with ``skip_bad`` is left
        out of the buffer (its slot is returned); one that decodes to another size than its
        header always stops it."""
        from . import render_torch

        widths = np.array([p.src_size[0] for p in raw.params], np.int64)
        heights = np.array([p.src_size[1] for p in raw.params], np.int64)
        parts = [raw.pixels.to(device, non_blocking=True)]
        off = raw.pix_off.copy()
        bad: list[int] = []
        if raw.jpeg:
            at = np.flatnonzero(off < 0)
            n_pix = len(raw.pixels)
            for i, im, key in zip(at, render_torch.decode_each(raw.jpeg, device), [raw.keys[i] for i in at]):
                if isinstance(im, Exception):
                    err = BadSampleError(f"{self.source.name}: {key}: cannot read image ({one_line(im)})")
                    if not self.skip_bad:
                        raise err from im
                    bad.append(int(i))
                    continue
                if (im.shape[0], im.shape[2], im.shape[1]) != (3, widths[i], heights[i]):
                    raise BadSampleError(f"{self.source.name}: {key}: decoded size {im.shape[2]}x{im.shape[1]} "
                                         f"differs from its header's {widths[i]}x{heights[i]}")
                off[i] = n_pix
                n_pix += im.numel()
                parts.append(im.reshape(-1))
            parts.append(torch.zeros(int(widths.max()), dtype=torch.uint8, device=device))  # crop windows' tail
        flat = torch.cat(parts) if len(parts) > 1 else parts[0]
        keep = np.setdiff1d(np.arange(len(off)), bad)
        frames = render_torch.Frames(flat=flat, offsets=off[keep], heights=heights[keep], widths=widths[keep])
        return frames, bad

    def _render_pil(self, epoch: int, rows: Sequence[int], with_params: bool) -> Batch:
        from . import render_pil

        rows, partner, need = self._needed(epoch, rows)
        size = self.spec.img_size
        base: dict[int, tuple] = {}
        for r, img in self.source.read(need):
            if isinstance(img, BadSampleError):
                if not self.skip_bad:
                    raise img
                base[r] = (None, None)
                continue
            p = self.policy.draw(self.base_seed, epoch, r, self.seed(epoch, r), img.size, partner[r])
            base[r] = (render_pil.render_base(img, p, size), p)
        labels = self.source.labels
        images, partners, lams, valid, records = [], [], [], [], []
        for r in rows:
            x, p = base[r]
            if x is None:  # skipped unreadable image: zeros, unmixed, invalid
                x, q, lam = torch.zeros(3, size, size), r, 1.0
            elif p.mix != "none" and base[p.partner][0] is not None:
                x, q, lam = render_pil.mix(x, base[p.partner][0], p), p.partner, p.lam
            else:
                q, lam = r, 1.0
            images.append(x)
            partners.append(q)
            lams.append(float(lam))
            valid.append(p is not None)
            records.append(p)
        return Batch.of(epoch=[int(epoch)] * len(rows), row=rows, seed=[self.seed(epoch, r) for r in rows],
                        label=labels[rows], partner=partners, partner_label=labels[partners], lam=lams,
                        valid=valid, image=torch.stack(images) if images else torch.zeros((0, 3, size, size)),
                        params=records if with_params else None)

    def view(self, epoch: int, row: int) -> View:
        """One view with its record, for people looking at it."""
        if not 0 <= int(row) < self.num_rows:
            raise IndexError(f"row {row} out of range [0, {self.num_rows})")
        b = self.render(epoch, [row], with_params=True)
        return View(epoch=int(epoch), row=int(row), key=self.source.keys[int(row)], seed=int(b.seed[0]),
                    image=b.image[0], label=int(b.label[0]), partner=int(b.partner[0]),
                    partner_label=int(b.partner_label[0]), lam=float(b.lam[0]), params=b.params[0])


def _is_jpeg(data) -> bool:
    return isinstance(data, (bytes, bytearray, memoryview)) and bytes(data[:3]) == b"\xff\xd8\xff"


def _decode_here(source: Source, row: int, data) -> "np.ndarray | BadSampleError":
    """An image decoded on this CPU as a uint8 [3, H, W] array (or the error): JPEGs by
    torchvision's decoder (the torch renderer's CPU decoder), other formats, arrays and PIL
    images the way PIL's ``convert("RGB")`` makes them."""
    import io

    from PIL import Image

    from . import render_torch

    try:
        if _is_jpeg(data):
            return render_torch.decode([data], "cpu")[0].numpy()
        if isinstance(data, np.ndarray):
            a = data[:, :, None] if data.ndim == 2 else data
            return np.ascontiguousarray(render_torch.decode([a], "cpu")[0].numpy())
        if hasattr(data, "convert"):
            img = data.convert("RGB")
        else:
            with Image.open(io.BytesIO(data)) as f:
                img = f.convert("RGB")
        return np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))
    except Exception as e:
        return BadSampleError(f"{source.name}: {source.keys[row]}: cannot read image ({one_line(e)})")


def resolve_decode(decode: str, device) -> str:
    """Where JPEGs are decoded: "device" (bytes to the main process, decoded in batches on
    the run's device) or "worker" (in the DataLoader workers); "auto" is device on CUDA and
    worker elsewhere. The torch renderer only: the PIL renderer decodes in its workers."""
    if decode not in ("auto", "device", "worker"):
        raise TinydistillError(f"`decode` {decode}: expected auto, device or worker")
    if decode == "auto":
        return "device" if torch.device(device).type == "cuda" else "worker"
    return decode


def _without(raw: Encoded, bad: list[int]) -> Encoded:
    """``raw`` as :meth:`Views.encode` would have made it had the images in slots ``bad`` been
    unreadable in the worker: their rows invalid (no slot), rows mixing with them unmixed."""
    keep = np.setdiff1d(np.arange(len(raw.params)), bad)
    new = np.full(len(raw.params) + 1, -1, np.int64)  # old slot -> new slot; index -1 -> -1
    new[keep] = np.arange(len(keep))
    slot = new[raw.slot]
    pslot = np.where(slot >= 0, new[raw.pslot], -1)
    alone = torch.from_numpy(pslot < 0)
    v = raw.views
    views = dataclasses.replace(v, valid=torch.from_numpy(slot >= 0), partner=torch.where(alone, v.row, v.partner),
                                partner_label=torch.where(alone, v.label, v.partner_label),
                                lam=torch.where(alone, torch.ones_like(v.lam), v.lam))
    kept_e = new[raw.erase_slot] >= 0
    jpeg_slots = np.flatnonzero(raw.pix_off < 0)
    return dataclasses.replace(
        raw, views=views, slot=slot, pslot=pslot, params=[raw.params[i] for i in keep],
        keys=[raw.keys[i] for i in keep], pix_off=raw.pix_off[keep],
        jpeg=[d for i, d in zip(jpeg_slots.tolist(), raw.jpeg) if i not in set(bad)],
        erase_slot=new[raw.erase_slot][kept_e], erase_idx=raw.erase_idx[kept_e], erase_val=raw.erase_val[kept_e])


def _unmixed(p: ViewParams) -> ViewParams:
    return dataclasses.replace(p, mix="none", lam=1.0, box=None, partner=p.row)


def render_views(source: Source, spec: AugSpec, base_seed: int, views: Sequence[tuple[int, int]],
                 skip_bad: bool = False, device="cpu", decode: str = "auto") -> Batch:
    """Specific (epoch, row) views as one :class:`Batch`, in the order asked (pixels on the CPU)."""
    core = Views(source, spec, base_seed, skip_bad=skip_bad, device=device, decode=decode)
    by_epoch: dict[int, list[int]] = {}
    for e, r in views:
        if not 0 <= int(r) < len(source):
            raise IndexError(f"row {r} out of range [0, {len(source)})")
        by_epoch.setdefault(int(e), []).append(int(r))
    parts, at = [], {}
    for e, rows in by_epoch.items():
        rows = sorted(set(rows))
        at.update({(e, r): len(at) + i for i, r in enumerate(rows)})
        parts.append(core.render(e, rows))
    return Batch.cat(parts).select(torch.tensor([at[int(e), int(r)] for e, r in views], dtype=torch.int64))


def prepare(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float],
            interpolation: str = "bicubic") -> torch.Tensor:
    """What a consumer does with views: resize to its own input size, then normalise.

    Views are rendered once at the store's size; a teacher or student with another input
    size resizes here (antialiased), on whatever device ``images`` is on.
    """
    from . import render_torch

    x = images.float()
    if x.shape[-1] != size or x.shape[-2] != size:
        mode = interpolation if interpolation in ("bilinear", "bicubic") else "bilinear"
        x = torch.nn.functional.interpolate(x, size=(size, size), mode=mode, antialias=True, align_corners=False)
    # made once per device (render_torch.constant), not copied to the device on every call
    m = render_torch.constant([[[v]] for v in mean], x.device, x.dtype)
    s = render_torch.constant([[[v]] for v in std], x.device, x.dtype)
    return (x - m) / s
