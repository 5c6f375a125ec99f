"""Host -> device traffic of the device path, held on the CPU by render_torch's counter: every
table reaches the device through ``upload`` (one copy per step of the renderer, pinned on CUDA),
constants are made once per device, nothing in a render reads a device value back, and the
gen-logits / train-student loops upload nothing per step."""

import inspect

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import random_teacher
from tinydistill import render_torch as rt
from tinydistill.augment import AugSpec
from tinydistill.generate import GenConfig, gen_logits
from tinydistill.params import Policy
from tinydistill.render_torch.ops import _equalize
from tinydistill.train import TrainConfig, train_student
from tinydistill.views import prepare

S = 32
SPEC = AugSpec(img_size=16, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5, mixup=0.8, cutmix=1.0,
               mix_group=32, renderer="torch")


def _records(aa, n, size=S):
    from sklearn.datasets import load_sample_images

    china, flower = (Image.fromarray(a) for a in load_sample_images().images)
    small = [china.resize((40, 30)), flower.resize((36, 27))]
    imgs = [small[i % 2] for i in range(n)]
    pol = Policy(AugSpec(img_size=size, auto_augment=aa, re_prob=0.25, mixup=0.8, cutmix=1.0))
    return imgs, [pol.draw(5, 0, r, 11 + 7919 * r, imgs[r].size, partner=r ^ 1) for r in range(n)]


def _render(frames, recs, size=S):
    x = rt.render_base(frames, recs, size, erase=rt.erase_fills(recs, size))
    return rt.mix(x, x.flip(0), recs)


def test_equalize_histogram_equals_bincount():
    """The fixed 256-bin scatter_add_ histogram gives bincount's LUTs: random, flat, two-level images."""
    def old(x):
        n, c = x.shape[:2]
        v = x.to(torch.int64).view(n * c, -1)
        keys = (torch.arange(n * c)[:, None] * 256 + v).view(-1)
        h = torch.bincount(keys, minlength=n * c * 256).view(n * c, 256)
        nz = h > 0
        last = 255 - torch.flip(nz, dims=[1]).to(torch.int64).argmax(dim=1)
        step = (h.sum(1) - h.gather(1, last[:, None]).squeeze(1)) // 255
        ok = (nz.sum(1) > 1) & (step > 0)
        step1 = torch.where(ok, step, torch.ones_like(step))
        lut = torch.div(step1[:, None] // 2 + torch.cumsum(h, 1) - h, step1[:, None], rounding_mode="floor").clamp_(max=255)
        lut = torch.where(ok[:, None], lut, torch.arange(256).expand(n * c, 256))
        return lut.gather(1, v).view_as(x).to(x.dtype)

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 24, 24), generator=g).float()
    x[1] = 7.0  # one level: identity
    x[2] = torch.where(x[2] > 128, 200.0, 3.0)  # two levels
    x[3] = (x[3] / 64).floor() * 64  # few levels
    x[4, :, :, :12] = 255.0
    assert torch.equal(_equalize(x), old(x))


@pytest.mark.parametrize("aa", ["rand-m9-mstd0.5-inc1", "augmix-m5-w3", "original", "3a", None])
def test_a_render_reads_nothing_back_from_the_device(aa):
    """Every step of a render (crop, policy ops, AugMix, jitter, erasing, mixing) runs on the
    meta device, where any read of a device value (``.item()``, a data-dependent output size
    such as bincount's, a host-side ``if`` on a tensor) raises: so on CUDA no op inside a
    render unit makes the host wait for the stream."""
    imgs, recs = _records(aa, 8)
    frames = rt.Frames.from_numpy(*rt.pack_numpy([np.asarray(i) for i in imgs]), device="cpu")
    meta = rt.Frames(flat=torch.empty(frames.flat.shape, dtype=torch.uint8, device="meta"), offsets=frames.offsets,
                     heights=frames.heights, widths=frames.widths)
    out = _render(meta, recs)
    assert out.device.type == "meta" and out.shape == (8, 3, S, S)


def test_tables_go_through_upload_in_a_fixed_number_of_copies(monkeypatch):
    """A render's host tables reach the device only through ``upload`` (no other
    ``from_numpy`` / ``tensor`` / ``as_tensor`` in render_torch), in a number of copies that
    does not grow with the batch; constants are made once per device."""
    imgs, recs = _records("rand-m9-mstd0.5-inc1", 32)
    frames = {k: rt.Frames.from_numpy(*rt.pack_numpy([np.asarray(i) for i in imgs * k]), device="cpu") for k in (1, 2, 4)}
    callers = []
    for name in ("from_numpy", "tensor", "as_tensor"):
        real = getattr(torch, name)

        def spy(*a, _real=real, **kw):
            callers.append(inspect.stack()[1].filename)
            return _real(*a, **kw)

        monkeypatch.setattr(torch, name, spy)
    copies = []
    for k in (1, 1, 2, 4):  # the first render also makes the constants
        c0 = rt.UPLOADS["copies"]
        _render(frames[k], recs * k)
        copies.append(rt.UPLOADS["copies"] - c0)
    assert copies[0] > copies[1] == copies[2] == copies[3] and 0 < copies[1] < 64, copies
    inside = [f for f in callers if "render_torch" in f]
    assert inside and all(f.endswith("_device.py") for f in inside), set(inside)
    c0 = rt.UPLOADS["copies"]
    a = rt.constant([1.5, 2.5], "cpu")
    assert rt.constant([1.5, 2.5], "cpu") is a and rt.UPLOADS["copies"] - c0 <= 1


def test_prepare_normalises_with_constants_made_once():
    """views.prepare: the same values as building mean / std every call, with no copy after the first."""
    x = torch.rand(4, 3, 8, 8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    want = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    assert torch.equal(prepare(x, 8, mean, std), want)
    c0 = rt.UPLOADS["copies"]
    for _ in range(3):
        assert torch.equal(prepare(x, 8, mean, std), want)
    assert rt.UPLOADS["copies"] == c0


def test_upload_is_one_copy_of_many_arrays():
    a, b, c = np.arange(5, dtype=np.int64), np.ones((2, 3), np.float32), np.array([True, False])
    c0 = rt.UPLOADS["copies"]
    ta, tb, tc = rt.upload(a, b, torch.from_numpy(c), device="cpu")
    assert rt.UPLOADS["copies"] - c0 == 1
    assert ta.dtype == torch.int64 and tb.shape == (2, 3) and tc.dtype == torch.bool
    assert ta.tolist() == a.tolist() and tb.tolist() == b.tolist() and tc.tolist() == c.tolist()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(2)
    for i in range(128):
        d = root / f"c{i % 4}"
        d.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(d / f"{i:04d}.jpg", quality=90)
    return str(root)


def test_gen_logits_and_training_steps_upload_nothing(data, tmp_path):
    """Through the device path (the render thread), the loops' own thread copies nothing to
    the device between one step and the next (the constants are made at the first step); the
    render thread's copies are per unit, not per step."""
    weights = random_teacher(tmp_path / "t.pth", 4)
    seen = {"gen": [], "train": []}
    gen_logits(GenConfig(data=data, teacher="test_resnet", teacher_weights=weights, teacher_input_size=16,
                         out=str(tmp_path / "s.zarr"), k=3, epochs=(0, 2), workers=0, batch_size=32, spec=SPEC,
                         progress=False), on_step=lambda _: seen["gen"].append(rt.UPLOADS["copies@MainThread"]))
    train_student(TrainConfig(data=data, student="test_vit", logits=str(tmp_path / "s.zarr"), out=str(tmp_path / "t"),
                              epochs=2, batch_size=32, workers=0, progress=False,
                              model_kwargs={"img_size": 16, "patch_size": 4}),
                  on_step=lambda _: seen["train"].append(rt.UPLOADS["copies@MainThread"]))
    for loop, at in seen.items():
        assert len(at) == 8, (loop, at)  # 2 epochs of 4 batches
        assert np.diff(at).tolist() == [0] * 7, (loop, at)


def test_a_render_unit_copies_a_fixed_number_of_times(data):
    """The device renderer's unit: its copies (counted in the render thread) do not grow with
    the views in it: one unit of 4 batches costs about what one unit of 1 batch costs."""
    from tinydistill.render_device import DeviceRenderer
    from tinydistill.sources import open_source
    from tinydistill.stream import ViewStream, epoch_order, train_items
    from tinydistill.views import Views

    core = Views(open_source(data), SPEC, 5)
    items = train_items(epoch_order(128, 32, True, 5, 0, 1, 0), 0, 32)
    loader = torch.utils.data.DataLoader(ViewStream(core, items), batch_size=None, num_workers=0)
    list(DeviceRenderer(core, "cpu", unit=128)(loader))  # constants made
    per_unit = {}
    for unit in (32, 128):
        c0 = rt.UPLOADS["copies@tinydistill-render"]
        r = DeviceRenderer(core, "cpu", unit=unit)
        assert len(list(r(loader))) == 4
        per_unit[unit] = (rt.UPLOADS["copies@tinydistill-render"] - c0) / r.units
    assert r.units == 1 and per_unit[128] < 64 and per_unit[128] < 2 * per_unit[32], per_unit
