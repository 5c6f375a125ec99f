"""The torch renderer against the PIL renderer, on records drawn by the real drawer."""

import dataclasses
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from tinydistill import render_pil
from tinydistill import render_torch as rt
from tinydistill.augment import AugSpec
from tinydistill.params import OpParams, Policy, _level_args

S = 64  # output size: small keeps the suite fast; ops behave the same at any size
POLICIES = ["rand-m9-mstd0.5-inc1", "augmix-m5-w3", "original"]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.fixture(scope="module")
def photos():
    """sklearn's two photos at a few sizes (natural images, several aspect ratios)."""
    from sklearn.datasets import load_sample_images

    china, flower = (Image.fromarray(a) for a in load_sample_images().images)
    # small sizes keep the suite fast (a renderer's cost grows with the crop); several aspects
    return [china.resize((200, 150), Image.BICUBIC), flower.resize((160, 107), Image.BICUBIC),
            flower.crop((100, 50, 230, 200)), china.crop((300, 100, 420, 190)), china.resize((96, 128), Image.BICUBIC)]


def _draw(spec, photos, n, epoch=0, seed0=11):
    pol = Policy(spec)
    imgs = [photos[i % len(photos)] for i in range(n)]
    recs = [pol.draw(5, epoch, r, seed0 + 7919 * r, imgs[r].size) for r in range(n)]
    return imgs, recs


def _pil(imgs, recs, size=S):
    return torch.stack([render_pil.render_base(im, p, size) for im, p in zip(imgs, recs)])


class _Coin:
    """Stands in for the level functions' sign coin: negate or not, on demand."""

    def __init__(self, negate: bool):
        self.v = 0.9 if negate else 0.1

    def random(self):
        return self.v


def _policy_ops():
    """Every AugmentOp the three policies (plus 3-Augment's Desaturate / GaussianBlur) use."""
    seen = {}
    for aa in POLICIES + ["3a"]:
        tf = Policy(AugSpec(img_size=S, auto_augment=aa)).tf
        ops = tf.ops if hasattr(tf, "ops") else [o for sub in tf.policy for o in sub]
        for o in ops:
            seen.setdefault(o.name, o)
    return seen


def _forced(name, op, magnitude, negate, resample):
    args = _level_args(op, magnitude, _Coin(negate))
    if name == "GaussianBlurRand":
        name, args = "GaussianBlur", (0.1 + args[0],)
    geometric = name in rt._GEOMETRIC
    return OpParams(name=name, magnitude=magnitude, args=tuple(args), resample=resample if geometric else None,
                    fill=tuple(op.kwargs["fillcolor"]) if geometric else None)


def _op_records(photos, crop):
    """One record per (op, magnitude, sign, resample), from real drawn records with the ops forced."""
    base_imgs, base = _draw(AugSpec(img_size=S, color_jitter=None, hflip=0.5), photos, 8)
    ops = _policy_ops()
    imgs, recs = [], []
    for name, op in sorted(ops.items()):
        for mag in (0.0, 4.0, 10.0):
            for negate in (False, True):
                for resample in (("bilinear", "bicubic") if name in rt._GEOMETRIC else (None,)):
                    i = len(recs) % len(base)
                    p = dataclasses.replace(base[i], ops=[_forced(name, op, mag, negate, resample)])
                    if crop == "exact":  # crop size == output size: no resampling at all
                        w, h = p.src_size
                        p = dataclasses.replace(p, crop=((h - S) // 3, (w - S) // 2, S, S))
                    imgs.append(base_imgs[i])
                    recs.append(p)
    return imgs, recs


def test_every_policy_op_is_exact_on_unresampled_crops(photos):
    """With a crop the size of the output, each op (every policy op, magnitudes 0, 4, 10, both
    signs, both resamples) gives exactly PIL's pixels, all rendered in one batch."""
    imgs, recs = _op_records(photos, crop="exact")
    names = {p.ops[0].name for p in recs}
    assert {"Rotate", "ShearX", "TranslateXRel", "PosterizeIncreasing", "PosterizeOriginal", "SolarizeIncreasing",
            "SolarizeAdd", "Equalize", "AutoContrast", "Invert", "SharpnessIncreasing", "Sharpness", "Color",
            "ContrastIncreasing", "BrightnessIncreasing", "Desaturate", "GaussianBlur"} <= names
    ref = _pil(imgs, recs)
    got = rt.render_base(rt.decode(imgs, "cpu"), recs, S)
    bad = [recs[i].ops[0] for i in range(len(recs)) if not torch.equal(got[i], ref[i])]
    assert not bad, bad[:5]


def test_every_policy_op_within_tolerance_after_resampling(photos):
    """Crops resized as drawn: each op within 30 dB of PIL (the crop is the only source of
    difference, and threshold ops may amplify a one-level difference)."""
    imgs, recs = _op_records(photos, crop="drawn")
    ref = _pil(imgs, recs)
    got = rt.render_base(rt.decode(imgs, "cpu"), recs, S)
    worst = min((psnr(got[i], ref[i]), recs[i].ops[0].name) for i in range(len(recs)))
    assert worst[0] >= 30, worst


def test_crop_resize_matches_pil(photos):
    spec = AugSpec(img_size=S, color_jitter=None, hflip=0, interpolation="random")
    imgs, recs = _draw(spec, photos, 24)
    recs += [dataclasses.replace(recs[0], interpolation="nearest"), dataclasses.replace(recs[1], interpolation="bilinear")]
    imgs += imgs[:2]
    ref = _pil(imgs, recs)
    t = rt.decode(imgs, "cpu")
    x = rt.crop_resize(t, recs, S) / 255  # default: PIL's separable filter in integers
    assert psnr(x, ref) >= 50 and float((x == ref).float().mean()) > 0.9
    assert float((x - ref).abs().max()) <= 2 / 255
    assert torch.equal(x[-2], ref[-2])  # nearest: exact
    assert psnr(rt.crop_resize(t, recs, S, "roi_align") / 255, ref) >= 35
    assert psnr(rt.crop_resize(t, recs, S, "interpolate") / 255, ref) >= 45


@pytest.mark.parametrize("aa", POLICIES + [None])
def test_whole_records_match_pil(photos, aa):
    """Records drawn from each policy (or plain colour jitter), with erasing of every mode."""
    spec = AugSpec(img_size=S, auto_augment=aa, re_prob=0.7, re_count=2, re_mode="pixel", interpolation="random",
                   color_jitter=0.4)
    imgs, recs = _draw(spec, photos, 24, epoch=1)
    modes = ("pixel", "rand", "const")
    recs = [dataclasses.replace(p, erase_mode=modes[i % 3]) for i, p in enumerate(recs)]
    assert any(p.erase for p in recs)
    assert any(p.jitter for p in recs) if aa is None else any(p.ops or p.augmix for p in recs)
    ref = _pil(imgs, recs)
    got = rt.render_base(rt.decode(imgs, "cpu"), recs, S)
    for i, p in enumerate(recs):
        assert psnr(got[i], ref[i]) >= 30, p.summary()
        for top, left, h, w in p.erase:  # erased pixels are render_pil's exactly (same CPU noise)
            if not any(q != (top, left, h, w) for q in p.erase[p.erase.index((top, left, h, w)) + 1:]):
                assert torch.equal(got[i, :, top:top + h, left:left + w], ref[i, :, top:top + h, left:left + w])
    # the same records on crops the size of the output: every pixel is PIL's
    exact = [dataclasses.replace(p, crop=(0, 0, S, S)) for p in recs]
    assert torch.equal(rt.render_base(rt.decode(imgs, "cpu"), exact, S), _pil(imgs, exact))


def test_flips_are_exact(photos):
    imgs, recs = _draw(AugSpec(img_size=S, color_jitter=None, hflip=0.5, vflip=0.5), photos, 12)
    assert {(p.hflip, p.vflip) for p in recs} == {(a, b) for a in (False, True) for b in (False, True)}
    recs = [dataclasses.replace(p, crop=(3, 4, S, S)) for p in recs]
    assert torch.equal(rt.render_base(rt.decode(imgs, "cpu"), recs, S), _pil(imgs, recs))


def test_same_pixels_alone_or_in_any_batch(photos):
    """A record renders to the same bits alone, in a batch of 37 others, and in another order."""
    imgs, recs = [], []
    for k, aa in enumerate(POLICIES + [None]):
        spec = AugSpec(img_size=S, auto_augment=aa, re_prob=0.5, re_count=2, interpolation="random")
        i, r = _draw(spec, photos, 10, epoch=k)
        imgs += i
        recs += r
    t = rt.decode(imgs, "cpu")
    full = rt.render_base(t, recs, S)
    for i in (0, 13, 27, 38):
        assert torch.equal(rt.render_base([t[i]], [recs[i]], S)[0], full[i])
    order = random.Random(3).sample(range(len(recs)), 37)
    part = rt.render_base([t[i] for i in order], [recs[i] for i in order], S)
    for j, i in enumerate(order):
        assert torch.equal(part[j], full[i]), recs[i].summary()


def test_chunked_crops_give_the_same_pixels(photos, monkeypatch):
    imgs, recs = _draw(AugSpec(img_size=S, interpolation="random"), photos, 10)
    t = rt.decode(imgs, "cpu")
    for method in ("pil", "roi_align"):
        whole = rt.crop_resize(t, recs, S, method)
        monkeypatch.setattr(rt, "CANVAS_BUDGET", 1)  # one crop per chunk
        assert torch.equal(rt.crop_resize(t, recs, S, method), whole)
        monkeypatch.undo()


def test_record_for_another_image_size_is_refused(photos):
    imgs, recs = _draw(AugSpec(img_size=S), photos, 2)
    assert imgs[0].size != imgs[1].size
    with pytest.raises(ValueError, match="record is for"):
        rt.render_base(rt.decode(imgs[::-1], "cpu"), recs, S)


def test_mix_equals_render_pil_mix(photos):
    spec = AugSpec(img_size=S, mixup=0.8, cutmix=1.0, mix_group=4)
    pol = Policy(spec)
    recs = [pol.draw(1, 0, r, 100 + r, (90, 120), partner=r ^ 1) for r in range(16)]
    recs.append(dataclasses.replace(recs[0], mix="none", partner=0, lam=1.0, box=None))
    assert {p.mix for p in recs} == {"mixup", "cutmix", "none"}
    g = torch.Generator().manual_seed(0)
    x = torch.rand((len(recs), 3, S, S), generator=g)
    partner = torch.rand((len(recs), 3, S, S), generator=g)
    got = rt.mix(x, partner, recs)
    for i, p in enumerate(recs):
        assert torch.equal(got[i], render_pil.mix(x[i], partner[i], p)), p.summary()
    assert torch.equal(got[-1], x[-1])


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_decode_inputs(photos):
    rgb = photos[3]
    grey = rgb.convert("L")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(77)
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    la = grey.convert("LA")
    items = [_png(rgb), _png(grey), _png(rgba), _png(pal), _png(la), rgb, grey, pal, np.asarray(rgb),
             np.asarray(grey), np.asarray(rgba)]
    want = [rgb, grey, rgba, pal, la, rgb, grey, pal, rgb, grey, rgba]
    out = rt.decode(items, "cpu")
    for t, w in zip(out, want):
        assert t.dtype == torch.uint8 and t.shape == (3, rgb.height, rgb.width)
        assert torch.equal(t, torch.from_numpy(np.array(w.convert("RGB"))).permute(2, 0, 1))
    # JPEG: libjpeg on both sides; the CPU decoders may differ in the last bit on a few pixels
    buf = io.BytesIO()
    photos[0].save(buf, format="JPEG", quality=90)
    jpg = rt.decode([buf.getvalue()], "cpu")[0]
    ref = torch.from_numpy(np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))).permute(2, 0, 1)
    assert jpg.shape == ref.shape == (3, 150, 200)
    assert (jpg.int() - ref.int()).abs().max() <= 2 and psnr(jpg / 255, ref / 255) >= 45
    with pytest.raises(TypeError):
        rt.decode([3.0], "cpu")
