"""The PIL renderer: parameter records -> pixels, one view at a time, on CPU workers.

Every op is timm's or torchvision's (``resized_crop``, flips, ``adjust_*``, timm's
auto-augment ops); the record says where and how much. Rendering is a pure function of the
decoded image and its record, so it is the same in any process, worker, batch or order.

Output: float32 [3, S, S] pixel values in [0, 1] (noise erasing may write outside that range),
not normalised: teacher and student each normalise with their own mean/std.
"""

from __future__ import annotations

import numpy as np
import torch

from .params import OpParams, ViewParams, blended_augmix_weights

NAME = "pil"


def _posterize(img, bits_to_keep, **__):
    """timm's posterize, with 0 bits meaning a black image as in TF and Pillow < 13.

    ``rand-m9-mstd0.5-inc1`` can ask for 0 bits; Pillow 13 raises on that (~0.14 % of calls).
    """
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def _pil_mode(name: str):
    from timm.data.transforms import str_to_pil_interp

    return str_to_pil_interp(name)


def apply_op(img, op: OpParams):
    """One auto-augment op with its drawn arguments (timm's op functions)."""
    from timm.data.auto_augment import NAME_TO_OP

    fn = _posterize if op.name.startswith("Posterize") else NAME_TO_OP[op.name]
    kwargs = {}
    if op.resample is not None:
        kwargs = {"resample": _pil_mode(op.resample), "fillcolor": tuple(op.fill)}
    return fn(img, *op.args, **kwargs)


def _augmix(img, mix: dict):
    """timm's AugMix (basic or blended) with the chains and weights of the record."""
    from PIL import Image

    if mix["blended"]:
        orig, out = img.copy(), img
        for w, chain in zip(blended_augmix_weights(mix), mix["chains"]):
            aug = orig
            for op in chain:
                aug = apply_op(aug, op)
            out = Image.blend(out, aug, w)
        return out
    mixed = np.zeros_like(np.asarray(img), dtype=np.float32)
    for w, chain in zip(mix["weights"], mix["chains"]):
        aug = img
        for op in chain:
            aug = apply_op(aug, op)
        mixed += np.float32(w) * np.asarray(aug, dtype=np.float32)
    np.clip(mixed, 0, 255.0, out=mixed)
    return Image.blend(img, Image.fromarray(mixed.astype(np.uint8)), float(mix["m"]))


def render_base(img, p: ViewParams, size: int) -> torch.Tensor:
    """The un-mixed view: crop + resize, flips, policy ops, jitter, to tensor, erasing."""
    import torchvision.transforms.functional as F
    from timm.data.transforms import str_to_interp_mode

    if img.mode != "RGB":
        img = img.convert("RGB")
    if tuple(img.size) != tuple(p.src_size):
        raise ValueError(f"view ({p.epoch},{p.row}): record is for a {p.src_size} image, got {img.size}")
    top, left, h, w = p.crop
    img = F.resized_crop(img, top, left, h, w, [size, size], interpolation=str_to_interp_mode(p.interpolation))
    if p.hflip:
        img = F.hflip(img)
    if p.vflip:
        img = F.vflip(img)
    for op in p.ops:
        img = apply_op(img, op)
    if p.augmix:
        img = _augmix(img, p.augmix)
    if p.jitter:
        adjust = {"brightness": F.adjust_brightness, "contrast": F.adjust_contrast, "saturation": F.adjust_saturation}
        for name in p.jitter["order"]:
            img = adjust[name](img, p.jitter[name])
    x = F.pil_to_tensor(img).float().div_(255)
    if p.erase:
        erase(x, p)
    return x


def erase(x: torch.Tensor, p: ViewParams) -> None:
    """Random erasing in place: zeros, one normal colour per box, or per-pixel normal noise."""
    g = torch.Generator().manual_seed(p.erase_seed)
    c = x.shape[0]
    for top, left, h, w in p.erase:
        if p.erase_mode == "pixel":
            fill = torch.empty((c, h, w)).normal_(generator=g)
        elif p.erase_mode == "rand":
            fill = torch.empty((c, 1, 1)).normal_(generator=g)
        else:
            fill = torch.zeros((c, 1, 1))
        x[:, top:top + h, left:left + w] = fill


def mix(x: torch.Tensor, partner: torch.Tensor, p: ViewParams) -> torch.Tensor:
    """Mix a base view with its partner's base view as the record says."""
    if p.mix == "cutmix":
        top, left, h, w = p.box
        out = x.clone()
        out[:, top:top + h, left:left + w] = partner[:, top:top + h, left:left + w]
        return out
    if p.mix == "mixup":
        return x * p.lam + partner * (1.0 - p.lam)
    return x
