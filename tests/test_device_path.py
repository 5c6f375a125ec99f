"""The torch renderer's path, as a GPU runs it, on the CPU: workers ship bytes + records, the
main process renders several batches at once in its render thread (tinydistill.render_device).
Every test compares it with the workers rendering the pixels themselves, or checks how it fails."""

import io
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import tinydistill as td
import tinydistill.stream as stream_mod
from helpers import random_teacher
from tinydistill.augment import AugSpec
from tinydistill.errors import TinydistillError
from tinydistill.generate import GenConfig, gen_logits
from tinydistill.batch import Encoded
from tinydistill.render_device import DeviceRenderer, RenderError
from tinydistill.sources import open_source
from tinydistill.stream import ViewStream, epoch_order, train_items
from tinydistill.train import TrainConfig, train_student
from tinydistill.views import Views

SPEC = AugSpec(img_size=16, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5, mixup=0.8, cutmix=1.0,
               mix_group=32, renderer="torch")
N = 384


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """384 small images in 6 class folders: JPEGs (the GPU decoder's format) and some PNGs."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(1)
    for i in range(N):
        d = root / f"c{i % 6}"
        d.mkdir(exist_ok=True)
        img = Image.fromarray(rng.integers(0, 255, (20 + i % 3, 24, 3), dtype=np.uint8))
        img.save(d / f"{i:04d}.png") if i % 5 == 0 else img.save(d / f"{i:04d}.jpg", quality=90)
    return str(root)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return random_teacher(tmp_path_factory.mktemp("w") / "t.pth", 6)


def _gen(data, weights, out, **kw):
    cfg = dict(data=data, teacher="test_resnet", teacher_weights=weights, teacher_input_size=16, out=str(out),
               k=4, epochs=(0, 2), workers=2, batch_size=32, spec=SPEC, progress=False)
    return gen_logits(GenConfig(**{**cfg, **kw}))


@pytest.fixture(scope="module")
def stores(data, weights, tmp_path_factory):
    """The same store made through the encoded path (the default for the torch renderer) and
    with the workers rendering (what the library did on the CPU before)."""
    root = tmp_path_factory.mktemp("stores")
    mp = pytest.MonkeyPatch()
    torch.set_num_threads(1)
    enc = _gen(data, weights, root / "enc.zarr")
    mp.setattr(stream_mod, "ENCODED_RENDERERS", set())
    work = _gen(data, weights, root / "work.zarr")
    mp.undo()
    return {"enc": (root / "enc.zarr", enc), "work": (root / "work.zarr", work)}


@pytest.mark.slow
def test_gen_logits_takes_the_encoded_path_and_equals_worker_rendering(stores):
    (enc, s_enc), (work, s_work) = stores["enc"], stores["work"]
    assert "render_busy_share" in s_enc["load"] and s_enc["load"]["render_units"] >= 1
    assert "render_busy_share" not in s_work["load"]
    a, b = td.open_store(enc), td.open_store(work)
    for e in range(2):
        la, ia = a.topk(e, slice(None))
        lb, ib = b.topk(e, slice(None))
        assert np.array_equal(ia, ib) and np.array_equal(la, lb)
        assert np.array_equal(a.seeds(e, slice(None)), b.seeds(e, slice(None)))


@pytest.mark.slow
def test_training_modes_equal_through_both_paths(stores, data, weights, tmp_path, monkeypatch):
    """Offline KD, --no-kd --like and --online-teacher: the same per-step losses whether the
    workers or the render thread make the pixels."""
    store = str(stores["enc"][0])
    common = dict(data=data, student="test_vit", epochs=1, batch_size=64, workers=2, seed=3, progress=False,
                  model_kwargs={"img_size": 16, "patch_size": 4})
    modes = {"offline": dict(logits=store), "no_kd": dict(no_kd=True, like=store),
             "online": dict(online_teacher="test_resnet", teacher_weights=weights, teacher_input_size=16, like=store)}
    losses = {}
    for path in ("enc", "work"):
        if path == "work":
            monkeypatch.setattr(stream_mod, "ENCODED_RENDERERS", set())
        for name, mode in modes.items():
            out = tmp_path / f"{path}-{name}"
            res = train_student(TrainConfig(out=str(out), **common, **mode))
            assert ("render_busy_share" in res["load"]) == (path == "enc")
            losses[path, name] = [json.loads(x)["loss"] for x in (out / "steps.jsonl").read_text().splitlines()]
    for name in modes:
        assert len(losses["enc", name]) == N // 64
        assert losses["enc", name] == losses["work", name], name


@pytest.mark.slow
def test_verify_and_store_view_replay_the_encoded_store(stores, data, weights):
    from tinydistill.verify import verify_store

    path = stores["enc"][0]
    v = verify_store(str(path), data, "test_resnet", weights, samples=8)
    assert v["renderer"] == "torch" and v["max_abs_logp_diff"] == 0.0 and v["topk_id_agreement"] == 1.0
    st = td.open_store(path)
    core = Views(open_source(data), st.spec, st.base_seed)
    items = train_items(np.arange(64, 96), 1, 32)
    batch = next(iter(torch.utils.data.DataLoader(ViewStream(core, items, encoded=False), batch_size=None)))
    for j in (0, 7, 31):
        view = st.view(1, int(batch.row[j]), data)
        assert torch.equal(view.image, batch.image[j]) and view.partner == int(batch.partner[j])


def _encoded_loader(data, workers=2, batches=6):
    core = Views(open_source(data), SPEC, 5)
    items = train_items(epoch_order(N, 32, True, 5, 0, 1, 0), 0, 48)[:batches]
    return core, items, torch.utils.data.DataLoader(ViewStream(core, items), batch_size=None, num_workers=workers)


def test_units_of_several_batches_give_each_batch_its_own_pixels(data):
    core, items, loader = _encoded_loader(data)
    first = next(iter(loader))
    assert isinstance(first, Encoded) and first.pixels.dtype == torch.uint8  # decoded, not rendered
    ref = list(torch.utils.data.DataLoader(ViewStream(core, items, encoded=False), batch_size=None))
    for unit in (1, 100, 10_000):  # one batch, two batches, all six per unit
        r = DeviceRenderer(core, "cpu", unit=unit)
        got = list(r(loader))
        assert len(got) == len(ref) == 6 and r.units == {1: 6, 100: 2, 10_000: 1}[unit]
        for a, b in zip(ref, got):
            for k in ("row", "partner", "label", "partner_label", "valid", "seed", "epoch", "lam", "image"):
                assert torch.equal(getattr(a, k), getattr(b, k)), k


def test_merge_keeps_slots_pixels_and_erasing_apart(data):
    core = Views(open_source(data), SPEC, 5)
    a, b = core.encode(0, range(0, 40)), core.encode(1, range(100, 130))
    m = Encoded.merge([a, b])
    assert len(m) == 70 and len(m.params) == len(a.params) + len(b.params)
    assert m.views.epoch.tolist() == [0] * 40 + [1] * 30
    tail = max(p.src_size[0] for p in m.params)  # zero bytes the crop windows may read past the end
    assert (m.slot[40:] >= len(a.params)).all() and len(m.pixels) == len(a.pixels) + len(b.pixels) + tail
    assert m.erase_slot.max() < len(m.params) and len(m.erase_idx) == len(m.erase_val)
    both = core.render_encoded(m, "cpu")
    assert torch.equal(both.image[:40], core.render_encoded(a, "cpu").image)
    assert torch.equal(both.image[40:], core.render_encoded(b, "cpu").image)
    assert torch.equal(both.epoch, m.views.epoch) and torch.equal(both.row, m.views.row) and m.views.image is None


def test_render_thread_error_is_one_line_naming_the_views(data, monkeypatch):
    core, _, loader = _encoded_loader(data)

    def broken(raw, device):
        raise ValueError("boom\nsecond line")

    monkeypatch.setattr(core, "render_encoded", broken)
    with pytest.raises(RenderError) as e:
        list(DeviceRenderer(core, "cpu", unit=48)(loader))
    msg = str(e.value)
    assert "\n" not in msg and data in msg and "epoch(s) [0]" in msg and "ValueError: boom" in msg
    assert not any(t.name == "tinydistill-render" and t.is_alive() for t in threading.enumerate())


def test_closing_the_loop_early_stops_the_render_thread_and_workers(data):
    core, _, loader = _encoded_loader(data, batches=12)
    gen = DeviceRenderer(core, "cpu", unit=48, depth=1)(loader)
    next(gen)
    gen.close()  # what an exception or Ctrl-C in the consuming loop does
    assert not any(t.name == "tinydistill-render" and t.is_alive() for t in threading.enumerate())


def test_meter_counts_waiting_for_the_renderer(data, monkeypatch):
    """The model's loop waits while the render thread works: main_busy_share must show it."""
    import time

    from tinydistill.stream import Meter

    core, _, loader = _encoded_loader(data, workers=0)
    slow = core.render_encoded

    def render(raw, device):
        time.sleep(0.4)  # rendering dominates the thread's time, even on a loaded machine
        return slow(raw, device)

    monkeypatch.setattr(core, "render_encoded", render)
    r = DeviceRenderer(core, "cpu", unit=48)
    meter = Meter(0, r)
    for _ in meter(r(loader)):
        pass
    rep = meter.report()
    assert rep["main_busy_share"] < 0.5 and rep["render_busy_share"] > 0.5 and rep["render_units"] == 6, rep


@pytest.mark.slow
def test_nonfinite_teacher_outputs_refused_or_stored_as_skipped(data, weights, tmp_path, monkeypatch):
    from tinydistill.teachers import Teacher

    targets = Teacher.targets

    def overflowing(self, x, kinds, pad_to=None):
        out = targets(self, x, kinds, pad_to=pad_to)
        out["logp"] = out["logp"].clone()
        out["logp"][::16] = float("nan")  # rows 0, 16, ... of every batch
        return out

    monkeypatch.setattr(Teacher, "targets", overflowing)
    with pytest.raises(TinydistillError, match="non-finite outputs for 2 view.*skip_bad") as e:
        _gen(data, weights, tmp_path / "a.zarr", epochs=(0, 1), workers=0)
    assert "\n" not in str(e.value)
    res = _gen(data, weights, tmp_path / "b.zarr", epochs=(0, 1), workers=0, skip_bad=True)
    assert res["nonfinite_views"] == N // 16 and res["skipped_views"] == N // 16
    st = td.open_store(tmp_path / "b.zarr")
    assert st.skipped(0, slice(None)).sum() == N // 16 and st.skipped(0, np.arange(0, N, 16)).all()


@pytest.mark.slow
def test_compiled_teacher_is_recorded_padded_and_verified_compiled(data, weights, tmp_path, monkeypatch):
    from tinydistill.verify import verify_store

    shapes = []

    def fake_compile(model):  # torch.compile's graph, recorded: the shapes it would see
        def run(x):
            shapes.append(x.shape[0])
            return model(x)
        run.to = lambda *a, **k: run
        run.eval = lambda: run
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    out = tmp_path / "c.zarr"
    _gen(data, weights, out, epochs=(0, 1), workers=0, batch_size=80, compile=True)  # 384 = 4 x 80 + 64
    assert set(shapes) == {80} and len(shapes) == 5  # the tail batch padded to the compiled shape
    st = td.open_store(out)
    assert st.attrs["teacher"]["compile"] is True
    shapes.clear()
    v = verify_store(str(out), data, "test_resnet", weights, samples=4)
    assert v["compile"] is True and v["max_abs_logp_diff"] == 0.0 and set(shapes) == {80}
    with pytest.raises(TinydistillError, match="teacher compile True.*False"):
        _gen(data, weights, out, epochs=(0, 1), workers=0, batch_size=80)  # resume without --compile


def test_collectives_wait_longer_than_a_store_takes_to_create(monkeypatch):
    import tinydistill.dist as dist_mod

    seen = {}
    monkeypatch.setattr(dist_mod.dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(dist_mod, "active", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("TINYDISTILL_DIST_TIMEOUT_S", raising=False)
    dist_mod.setup("cpu")
    assert seen["backend"] == "gloo" and seen["timeout"].total_seconds() == dist_mod.TIMEOUT_S >= 3600
    monkeypatch.setenv("TINYDISTILL_DIST_TIMEOUT_S", "90")
    dist_mod.setup("cpu")
    assert seen["timeout"].total_seconds() == 90


def test_worker_decodes_non_gpu_formats_and_ships_jpegs_for_a_gpu(data):
    src = open_source(data)
    cpu = Views(src, SPEC, 5).encode(0, range(10))
    assert cpu.jpeg == [] and (cpu.pix_off >= 0).all()  # on the CPU everything is decoded in the worker
    gpu = Views(src, SPEC, 5, device="cuda").encode(0, range(10))  # encoding needs no GPU
    is_png = np.array([k.endswith(".png") for k in gpu.keys])
    assert ((gpu.pix_off >= 0) == is_png).all() and len(gpu.jpeg) == (~is_png).sum() > 0
    assert all(Image.open(io.BytesIO(b)).format == "JPEG" for b in gpu.jpeg)
    # the device side of JPEG bytes (decode, size check, packing after the worker's pixels)
    # runs here too: the same pixels as when the worker decodes them
    core = Views(src, SPEC, 5)
    assert torch.equal(core.render_encoded(gpu, "cpu").image, core.render_encoded(cpu, "cpu").image)


@pytest.mark.slow
def test_verify_samples_distinct_views(stores, data, weights):
    from tinydistill.verify import verify_store

    v = verify_store(str(stores["enc"][0]), data, "test_resnet", weights, samples=10_000)
    assert v["views_checked"] == 2 * N and v["max_abs_logp_diff"] == 0.0  # every view once, none twice
