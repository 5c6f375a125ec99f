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
from tinydistill.params import _GEOMETRIC, OpParams, Policy, _level_args

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
    geometric = name in _GEOMETRIC
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
                for resample in (("bilinear", "bicubic") if name in _GEOMETRIC else (None,)):
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
    x = rt.crop_resize(t, recs, S) / 255  # PIL's separable filter in integers
    assert psnr(x, ref) >= 50 and float((x == ref).float().mean()) > 0.9
    assert float((x - ref).abs().max()) <= 2 / 255
    assert torch.equal(x[-2], ref[-2])  # nearest: exact


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
    whole = rt.crop_resize(t, recs, S)
    monkeypatch.setattr(rt.resample, "CANVAS_BUDGET", 1)  # one crop per chunk
    assert torch.equal(rt.crop_resize(t, recs, S), whole)


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


def _jpeg(img, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def _bad_huffman(data: bytes) -> bytes:
    """A JPEG whose header reads (size, mode) but whose Huffman table does not: fails to decode."""
    b = bytearray(data)
    i = b.find(b"\xff\xc4")
    b[i + 5:i + 21] = b"\xff" * 16
    return bytes(b)


@pytest.fixture
def decoder_calls(monkeypatch):
    """How many times each file reaches a decoder (torchvision's JPEG and generic ones, PIL)."""
    import torchvision.io as tio

    calls: dict[bytes, int] = {}
    seen = lambda t: calls.__setitem__(bytes(t.numpy()), calls.get(bytes(t.numpy()), 0) + 1)  # noqa: E731
    jpeg, image, pil_open = tio.decode_jpeg, tio.decode_image, Image.open

    def decode_jpeg(x, *a, **k):
        for t in (x if isinstance(x, list) else [x]):
            seen(t)
        return jpeg(x, *a, **k)

    def decode_image(x, *a, **k):
        seen(x)
        return image(x, *a, **k)

    def open_(f, *a, **k):
        if isinstance(f, io.BytesIO):
            calls[f.getvalue()] = calls.get(f.getvalue(), 0) + 1
        return pil_open(f, *a, **k)

    monkeypatch.setattr(tio, "decode_jpeg", decode_jpeg)
    monkeypatch.setattr(tio, "decode_image", decode_image)
    monkeypatch.setattr(Image, "open", open_)
    return calls


def test_one_bad_file_costs_only_its_own_retry(photos, decoder_calls):
    """ImageNet-1k's odd files (CMYK JPEGs, a PNG named .JPEG) and unreadable ones (a cut
    body, a broken Huffman table) among good JPEGs: each good file is decoded once, in the one
    batched call; CMYK and PNG decode as PIL makes them; each failure is its own error."""
    good = [_jpeg(p) for p in photos]
    cmyk = _jpeg(photos[1].convert("CMYK"))
    png = _png(photos[2])
    cut = good[0][:len(good[0]) // 2]
    huff = _bad_huffman(good[3])
    items = good[:2] + [cmyk, cut] + good[2:] + [png, huff]
    assert rt.batchable(good[0]) and not rt.batchable(cmyk) and not rt.batchable(cut) and not rt.batchable(png)
    assert rt.batchable(huff)  # its header is fine: it enters the batch, which then fails
    out = rt.decode_each(items, "cpu")
    for d, t in zip(items, out):
        if d in (cut, huff):
            assert isinstance(t, Exception), "unreadable file decoded"
            continue
        ref = torch.from_numpy(np.array(Image.open(io.BytesIO(d)).convert("RGB"))).permute(2, 0, 1)
        assert t.dtype == torch.uint8 and t.shape == ref.shape
        if d in (cmyk, png):
            assert torch.equal(t, ref)  # CMYK: the CPU decoder's Adobe conversion, as PIL's
    decoder_calls.clear()
    rt.decode_each(good + [cmyk, png, cut], "cpu")  # no failure inside the batch
    assert all(decoder_calls[g] == 1 for g in good), "a good JPEG was decoded twice"
    assert decoder_calls[cmyk] == 1 and decoder_calls[png] == 1  # straight to the CPU decoders
    with pytest.raises(OSError, match="truncated"):  # decode: the first failure raises
        rt.decode([good[1], cut], "cpu")


def test_a_failing_batch_is_halved_down_to_the_bad_file(photos, decoder_calls, monkeypatch):
    """A batched decoder that fails whole (as nvjpeg's does) on a file it rejects: the batch is
    redone by halves, so the good files come back from batched calls and only the rejected
    one goes to the CPU decoders, in log2(n) rounds, not n calls one by one."""
    import torchvision.io as tio

    good = [_jpeg(photos[i % len(photos)].rotate(7 * i)) for i in range(16)]
    rejected = good[11]
    batch_calls = []
    jpeg = tio.decode_jpeg

    def picky(x, *a, **k):  # rejects the whole list when it holds `rejected`
        batch_calls.append(len(x))
        if any(bytes(t.numpy()) == rejected for t in x):
            raise RuntimeError("Error while decoding JPEG images: unsupported")
        return jpeg(x, *a, **k)

    monkeypatch.setattr(tio, "decode_jpeg", picky)
    out = rt.decode_each(good, "cpu")
    for d, t in zip(good, out):
        ref = jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8), mode=tio.ImageReadMode.RGB)
        assert torch.equal(t, ref)
    assert batch_calls == [16, 8, 8, 4, 2, 2, 1, 1, 4]  # halves, depth first; never one call per file
    assert batch_calls.count(1) == 2


# ---- host dispatch: packed inputs, erase data, op counts ------------------------------------------

def test_count_aten_ops_counts_top_level_ops_only():
    from tinydistill.opcount import count_aten_ops, profile_aten_ops, time_outside_aten_ops

    def f(x):
        y = x + 1  # aten::add
        y.add_(2)  # aten::add_
        z = torch.cat([x, y])  # aten::cat (its internal copies are children)
        w = z.to(torch.float64)  # aten::to (with _to_copy / copy_ inside)
        return w[3:5].sum()  # aten::slice, aten::sum: 0 + 3

    n, out = count_aten_ops(f, torch.zeros(4))
    assert n == 6 and float(out) == 3.0
    names, _ = profile_aten_ops(f, torch.zeros(4))
    assert names == {"aten::add": 1, "aten::add_": 1, "aten::cat": 1, "aten::to": 1, "aten::slice": 1, "aten::sum": 1}
    assert count_aten_ops(lambda: 3)[0] == 0
    t, n, out = time_outside_aten_ops(f, torch.zeros(4))
    assert n == 6 and t >= 0 and float(out) == 3.0


def test_pack_numpy_frames_and_lists_render_the_same(photos):
    """Frames from a worker's buffer (pack_numpy + from_numpy), from pack(tensors) and a plain
    list of tensors give the same pixels; pack_numpy makes RGB as convert("RGB") does."""
    imgs, recs = _draw(AugSpec(img_size=S, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5, re_count=2), photos, 12)
    t = rt.decode(imgs, "cpu")
    frames = rt.Frames.from_numpy(*rt.pack_numpy([np.asarray(im) for im in imgs]), device="cpu")
    assert len(frames) == len(imgs) and torch.equal(frames.image(3), t[3])
    assert frames.flat.numel() > sum(x.numel() for x in t)  # tail padding for the crop's window
    ref = rt.render_base(t, recs, S)
    assert torch.equal(rt.render_base(frames, recs, S), ref)
    assert torch.equal(rt.render_base(rt.pack(t), recs, S), ref)
    chw = rt.pack_numpy([x.numpy() for x in t], layout="chw", pad=False)
    assert torch.equal(torch.from_numpy(chw[0]), rt.pack(t).flat)
    grey, rgba = photos[3].convert("L"), photos[3].convert("RGBA")
    flat, off, h, w = rt.pack_numpy([np.asarray(grey), np.asarray(grey)[:, :, None], np.asarray(rgba)])
    f = rt.Frames.from_numpy(flat, off, h, w)
    for i, im in enumerate((grey, grey, rgba)):
        assert torch.equal(f.image(i), torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1))
    with pytest.raises(ValueError, match="record is for"):
        rt.render_base(frames.select(list(range(1, 12)) + [0]), recs, S)


def test_erase_fill_is_render_pils_erasing(photos):
    """erase_fill gives render_pil.erase's pixels as (unique indices, values), later boxes
    winning where they overlap; render_base with erase= equals render_base drawing it itself."""
    imgs, recs = _draw(AugSpec(img_size=S, re_prob=1.0, re_count=3, color_jitter=None), photos, 12)
    recs = [dataclasses.replace(p, erase_mode=("pixel", "rand", "const")[i % 3]) for i, p in enumerate(recs)]
    recs[0] = dataclasses.replace(recs[0], erase=[(2, 3, 20, 30), (10, 10, 20, 20), (0, 0, 5, 5)], erase_mode="pixel")
    for p in recs:
        x = torch.full((3, S, S), 7.0)
        render_pil.erase(x, p)
        idx, val = rt.erase_fill(p, S)
        assert len(np.unique(idx)) == len(idx) and val.dtype == np.float32
        y = torch.full((3, S, S), 7.0)
        y.view(-1)[torch.from_numpy(idx)] = torch.from_numpy(val)
        assert torch.equal(x, y), p.summary()
    t = rt.decode(imgs, "cpu")
    assert torch.equal(rt.render_base(t, recs, S, erase=rt.erase_fills(recs, S)), rt.render_base(t, recs, S))


def test_device_ops_do_not_grow_with_the_batch(photos):
    """The same records twice over cost exactly the same number of top-level aten ops as once:
    nothing is dispatched per view (erasing and images come packed, as from a worker)."""
    from tinydistill.opcount import count_aten_ops

    spec = AugSpec(img_size=S, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, mixup=0.8, cutmix=1.0)
    pol = Policy(spec)
    small = [im.resize((40, 30)) for im in photos]
    imgs = [small[i % len(small)] for i in range(32)]
    recs = [pol.draw(5, 0, r, 11 + 7919 * r, imgs[r].size, partner=r ^ 1) for r in range(32)]
    counts = []
    for k in (1, 2, 4):
        im, rc = imgs * k, recs * k
        frames = rt.Frames.from_numpy(*rt.pack_numpy([np.asarray(i) for i in im]), device="cpu")
        erase = rt.erase_fills(rc, S)

        def run():
            x = rt.render_base(frames, rc, S, erase=erase)
            return rt.mix(x, x.flip(0), rc)

        counts.append(count_aten_ops(run)[0])
    assert counts[0] == counts[1] == counts[2], counts
    assert counts[0] < 1000, counts
