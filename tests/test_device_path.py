"""The torch renderer's path, as a GPU runs it, on the CPU: workers ship JPEG bytes + records
(``--decode device``, forced here: auto is worker on the CPU), the main process decodes and
renders several batches at once in its render thread (tinydistill.render_device). Every test
compares it with the workers decoding or rendering the pixels themselves, or checks how it fails."""

import io
import json
import logging
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import tinydistill as td
import tinydistill.render_torch as rt_mod
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
               k=4, epochs=(0, 2), workers=2, batch_size=32, spec=SPEC, progress=False, decode="device")
    return gen_logits(GenConfig(**{**cfg, **kw}))


@pytest.fixture(scope="module")
def stores(data, weights, tmp_path_factory):
    """The same store made through the encoded path with JPEGs decoded in the main process
    (--decode device, what a GPU runs) and with the workers rendering (what the library did on
    the CPU before). ``main_decodes``: JPEGs the main process decoded for the first."""
    root = tmp_path_factory.mktemp("stores")
    mp = pytest.MonkeyPatch()
    torch.set_num_threads(1)
    decoded = []
    each = rt_mod.decode_each
    mp.setattr(rt_mod, "decode_each", lambda datas, device: decoded.append(len(datas)) or each(datas, device))
    enc = _gen(data, weights, root / "enc.zarr")
    mp.undo()
    mp.setattr(stream_mod, "ENCODED_RENDERERS", set())
    work = _gen(data, weights, root / "work.zarr")
    mp.undo()
    return {"enc": (root / "enc.zarr", enc), "work": (root / "work.zarr", work), "main_decodes": sum(decoded)}


@pytest.mark.slow
def test_gen_logits_takes_the_encoded_path_and_equals_worker_rendering(stores):
    (enc, s_enc), (work, s_work) = stores["enc"], stores["work"]
    assert "render_busy_share" in s_enc["load"] and s_enc["load"]["render_units"] >= 1
    assert stores["main_decodes"] >= 2 * N * 0.8 * 0.9  # the JPEGs (4 in 5), nearly all views' own or partner's
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
                  model_kwargs={"img_size": 16, "patch_size": 4}, decode="device")
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
    v = verify_store(str(path), data, "test_resnet", weights, samples=8, decode="device")
    assert v["renderer"] == "torch" and v["max_abs_logp_diff"] == 0.0 and v["topk_id_agreement"] == 1.0
    st = td.open_store(path)
    core = Views(open_source(data), st.spec, st.base_seed)
    items = train_items(np.arange(64, 96), 1, 32)
    batch = next(iter(torch.utils.data.DataLoader(ViewStream(core, items, encoded=False), batch_size=None)))
    for j in (0, 7, 31):
        view = st.view(1, int(batch.row[j]), data)
        assert torch.equal(view.image, batch.image[j]) and view.partner == int(batch.partner[j])


def _encoded_loader(data, workers=2, batches=6):
    core = Views(open_source(data), SPEC, 5, decode="device")
    items = train_items(epoch_order(N, 32, True, 5, 0, 1, 0), 0, 48)[:batches]
    return core, items, torch.utils.data.DataLoader(ViewStream(core, items), batch_size=None, num_workers=workers)


def test_units_of_several_batches_give_each_batch_its_own_pixels(data):
    core, items, loader = _encoded_loader(data)
    first = next(iter(loader))
    assert isinstance(first, Encoded) and first.pixels.dtype == torch.uint8  # not rendered
    assert len(first.jpeg) > 0  # JPEGs as bytes: decoded by the render thread
    ref = list(torch.utils.data.DataLoader(ViewStream(core, items, encoded=False), batch_size=None))
    for unit in (1, 100, 10_000):  # one batch, two batches, all six per unit
        r = DeviceRenderer(core, "cpu", unit=unit)
        got = list(r(loader))
        assert len(got) == len(ref) == 6 and r.units == {1: 6, 100: 2, 10_000: 1}[unit]
        for a, b in zip(ref, got):
            for k in ("row", "partner", "label", "partner_label", "valid", "seed", "epoch", "lam", "image"):
                assert torch.equal(getattr(a, k), getattr(b, k)), k


def test_merge_keeps_slots_pixels_and_erasing_apart(data):
    core = Views(open_source(data), SPEC, 5, decode="device")
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
    r = DeviceRenderer(core, "cpu", unit=48, depth=1)
    gen = r(loader)
    next(gen)
    assert r.thread.is_alive()  # more units to render: it is still at work
    gen.close()  # what an exception or Ctrl-C in the consuming loop does
    assert not r.thread.is_alive()  # this loop's own thread (other tests' are theirs), joined by close()


class _Clock:
    """A clock that moves only when told (``tick``): what a meter measures is then decided by
    where the ticks fall, not by how fast or loaded the machine is."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def tick(self, s):
        self.now += s


def test_meter_counts_waiting_for_the_renderer(data, monkeypatch):
    """The model's loop waits while the render thread works: main_busy_share must show it.
    Rendering a unit takes 1 s of a fake clock, and a unit's views reach the render thread only
    once the loop has used every view before them and asks for more (a semaphore), so all
    6 s of rendering are waiting; the loop's own work takes 0.5 s a batch. Nothing is timed."""
    import tinydistill.render_device as render_mod
    from tinydistill.stream import Meter

    clock = _Clock()
    monkeypatch.setattr(stream_mod, "time", clock)  # Meter's clock
    monkeypatch.setattr(render_mod, "time", clock)  # the renderer's busy seconds
    core, _, loader = _encoded_loader(data, workers=0)
    real = core.render_encoded
    permits, rendered, used = threading.Semaphore(0), [0], [0]

    def render(raw, device):
        clock.tick(1.0)
        return real(raw, device)

    def source():  # what the render thread reads: a unit (one batch of 48) once the loop asks
        for raw in loader:
            permits.acquire()
            rendered[0] += len(raw)
            yield raw

    def asking(batches):  # the loop's side: ask for a unit when every view rendered is used
        while True:
            if used[0] == rendered[0]:
                permits.release()
            try:
                b = next(batches)
            except StopIteration:
                return
            used[0] += len(b)
            yield b

    monkeypatch.setattr(core, "render_encoded", render)
    r = DeviceRenderer(core, "cpu", unit=48)
    meter = Meter(0, r)
    for _ in meter(asking(r(source()))):
        clock.tick(0.5)
    rep = meter.report()
    assert rep["render_units"] == 6 and used[0] == 6 * 48
    assert (rep["wall_s"], rep["wait_s"]) == (9.0, 6.0)
    assert rep["main_busy_share"] == round(1 - 6 / 9, 3) and rep["render_busy_share"] == round(6 / 9, 3), rep


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


def test_decode_device_ships_jpegs_and_gives_the_workers_pixels(data):
    """--decode worker decodes everything in the worker; --decode device ships the JPEGs as
    bytes (PNGs are still decoded in the worker) and the main process decodes them: the same
    pixels, records and store checks (on the CPU both are the same decoder)."""
    from tinydistill.replay import check_replay, decoded_on

    src = open_source(data)
    cpu = Views(src, SPEC, 5, decode="worker").encode(0, range(10))
    assert cpu.jpeg == [] and (cpu.pix_off >= 0).all()
    assert Views(src, SPEC, 5).decode == "worker" and Views(src, SPEC, 5, device="cuda").decode == "device"  # auto
    core = Views(src, SPEC, 5, decode="device")
    dev = core.encode(0, range(10))
    is_png = np.array([k.endswith(".png") for k in dev.keys])
    assert ((dev.pix_off >= 0) == is_png).all() and len(dev.jpeg) == (~is_png).sum() > 0
    assert all(Image.open(io.BytesIO(b)).format == "JPEG" for b in dev.jpeg)
    assert torch.equal(core.render_encoded(dev, "cpu").image, core.render_encoded(cpu, "cpu").image)
    rows = list(range(0, N, 7))
    a = Views(src, SPEC, 5, decode="device").render(1, rows, with_params=True)
    b = Views(src, SPEC, 5, decode="worker").render(1, rows, with_params=True)
    assert torch.equal(a.image, b.image) and a.params == b.params and torch.equal(a.partner, b.partner)
    assert decoded_on(SPEC, "cpu", "device") == decoded_on(SPEC, "cpu", "worker") == "cpu"
    with pytest.raises(TinydistillError, match="`decode` gpu: expected auto, device or worker"):
        Views(src, SPEC, 5, decode="gpu")


def test_store_records_where_its_jpegs_were_decoded(data, tmp_path, caplog, monkeypatch):
    """The canary is rendered with the run's --decode and the store records where its JPEGs
    were decoded. The same decoder must reproduce the canary exactly; another one (nvjpeg
    against the CPU's, on a GPU) is checked as a replay on another device: PSNR, not bits."""
    import zarr

    from tinydistill.generate import create_view_store
    from tinydistill.replay import check_replay
    from tinydistill.views import ReplayError

    src = open_source(data)
    st = create_view_store(tmp_path / "v.zarr", src, SPEC, base_seed=5, epochs=2, k=3, chunk_rows=96, decode="device")
    assert st.attrs["decode_device"] == "cpu" and st.attrs["render_device"] == "cpu"
    assert check_replay(td.open_store(st.path), src, decode="worker") == SPEC  # the same decoder on the CPU
    g = zarr.open_group(str(st.path), mode="r+")
    g.attrs["canary"] = {**g.attrs["canary"], "digest": "0" * 64}  # pixels as another decoder made them
    with pytest.raises(ReplayError, match="canary views differ"):
        check_replay(td.open_store(st.path), src, decode="device")
    g.attrs["decode_device"] = "cuda:NVIDIA H200"  # a store whose JPEGs nvjpeg decoded
    monkeypatch.setattr(logging.getLogger("tinydistill"), "propagate", True)  # the CLI's handler may be on
    with caplog.at_level("WARNING", logger="tinydistill"):
        assert check_replay(td.open_store(st.path), src, decode="device") == SPEC
    assert "JPEGs decoded on cpu (the store was rendered on cpu, its JPEGs decoded on cuda:NVIDIA H200)" in caplog.text


def test_decode_option_on_every_command():
    from click.testing import CliRunner

    from tinydistill.cli import main
    from tinydistill.config import GenConfig as G, TrainConfig as T, VerifyConfig as V

    assert {c.__dataclass_fields__["decode"].default for c in (G, T, V)} == {"auto"}
    for cmd in ("gen-logits", "train-student", "verify"):
        out = CliRunner().invoke(main, [cmd, "--help"]).output
        assert "--decode [auto|device|worker]" in out, cmd
    bad = CliRunner().invoke(main, ["gen-logits", "--data", "digits", "--teacher", "x", "--out", "o",
                                    "--decode", "gpu"])
    assert bad.exit_code != 0 and "'gpu' is not one of 'auto', 'device', 'worker'" in bad.output


# ---- unreadable JPEGs on the device path (--skip-bad) ---------------------------------------------

@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    """96 JPEGs in 4 classes, of which one is cut after its header (fails in any decoder) and
    one has a broken Huffman table (its header reads, the batched decoder fails on it), plus a
    CMYK JPEG and a PNG named .JPEG (ImageNet-1k holds both: they must decode)."""
    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(3)
    for i in range(96):
        d = root / f"c{i % 4}"
        d.mkdir(exist_ok=True)
        img = Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
        buf = io.BytesIO()
        if i == 30:
            img.save(buf, format="PNG")
        else:
            (img.convert("CMYK") if i == 50 else img).save(buf, format="JPEG", quality=90)
        b = buf.getvalue()
        if i == 10:
            b = b[:len(b) // 2]
        if i == 70:
            b = bytearray(b)
            j = b.find(b"\xff\xc4")
            b[j + 5:j + 21] = b"\xff" * 16
            b = bytes(b)
        (d / f"{i:04d}.JPEG").write_bytes(b)
    return str(root)


BAD_SPEC = AugSpec(img_size=16, mixup=0.8, cutmix=1.0, mix_group=32, renderer="torch")


def test_skip_bad_skips_and_counts_unreadable_jpegs_on_both_decode_paths(bad_data, weights, tmp_path):
    """gen-logits --skip-bad: the cut JPEG (decoded in the worker: it does not end in EOI) and
    the broken one (decoded in the render thread under --decode device) are skipped and
    counted alike, the other views stored the same; train-student replays both stores with
    the same losses and drops. Without --skip-bad either stops with one line naming the file."""
    cfg = dict(data=bad_data, teacher="test_resnet", teacher_weights=weights, teacher_input_size=16, k=3,
               epochs=(0, 1), workers=0, batch_size=32, spec=BAD_SPEC, progress=False, skip_bad=True)
    src = open_source(bad_data)
    rows = {i: next(r for r, k in enumerate(src.keys) if f"{i:04d}" in k) for i in (10, 70)}
    stores, losses, drops = {}, {}, {}
    for decode in ("device", "worker"):
        res = gen_logits(GenConfig(out=str(tmp_path / f"{decode}.zarr"), decode=decode, **cfg))
        assert res["skipped_views"] == 2, decode
        stores[decode] = td.open_store(tmp_path / f"{decode}.zarr")
        assert np.flatnonzero(stores[decode].skipped(0, slice(None))).tolist() == sorted(rows.values())
        out = tmp_path / f"student-{decode}"
        train_student(TrainConfig(data=bad_data, logits=str(tmp_path / f"{decode}.zarr"), student="test_vit",
                                  out=str(out), epochs=1, batch_size=48, workers=0, progress=False, decode=decode,
                                  model_kwargs={"img_size": 16, "patch_size": 4}))
        losses[decode] = [json.loads(x)["loss"] for x in (out / "steps.jsonl").read_text().splitlines()]
        drops[decode] = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["dropped_views"]
    (la, ia), (lb, ib) = stores["device"].topk(0, slice(None)), stores["worker"].topk(0, slice(None))
    assert np.array_equal(ia, ib) and np.array_equal(la, lb, equal_nan=True)
    assert losses["device"] == losses["worker"] and len(losses["device"]) == 2 and drops == {"device": 2, "worker": 2}
    for decode in ("device", "worker"):
        for bad, row in rows.items():
            with pytest.raises(TinydistillError) as e:
                Views(src, BAD_SPEC, 0, decode=decode).render(0, [row])
            assert "\n" not in str(e.value) and f"{bad:04d}.JPEG: cannot read image" in str(e.value)
        with pytest.raises(TinydistillError) as e:
            gen_logits(GenConfig(out=str(tmp_path / f"x-{decode}.zarr"), decode=decode, **{**cfg, "skip_bad": False}))
        assert "\n" not in str(e.value) and ".JPEG: cannot read image" in str(e.value)


def test_render_thread_skips_only_the_images_that_fail(bad_data):
    """A unit holding the broken JPEG renders every other view as the workers do: the views
    of unreadable images invalid (zeros), those mixed with them unmixed, none else touched."""
    src = open_source(bad_data)
    at = {i: next(r for r, k in enumerate(src.keys) if f"{i:04d}" in k) for i in (10, 30, 50, 70)}
    rows = list(range(32 * (at[70] // 32), 32 * (at[70] // 32) + 32))
    dev = Views(src, BAD_SPEC, 0, skip_bad=True, decode="device")
    raw = dev.encode(0, rows)
    shipped = [raw.keys[i] for i in np.flatnonzero(raw.pix_off < 0)]
    assert any("0070" in k for k in shipped) and not any(f"{i:04d}" in k for k in shipped for i in (10, 30, 50))
    assert ((raw.views.partner == at[70]) & (raw.views.row != at[70])).any()  # a view to unmix
    got = next(iter(DeviceRenderer(dev, "cpu", unit=1)([raw])))
    want = Views(src, BAD_SPEC, 0, skip_bad=True, decode="worker").render(0, rows)
    bad = sorted(r for i, r in at.items() if i in (10, 70) and r in rows)
    assert at[70] in bad and np.flatnonzero(~got.valid.numpy()).tolist() == [rows.index(r) for r in bad]
    for k in ("row", "partner", "partner_label", "lam", "valid", "label", "seed", "image"):
        assert torch.equal(getattr(got, k), getattr(want, k)), k
    assert not set(got.partner[got.valid].tolist()) & set(bad)  # nobody mixes with an unreadable image


# ---- devices and streams ----------------------------------------------------------------------------

def test_a_given_cuda_device_becomes_the_current_device(monkeypatch):
    """--device cuda:N in one process: cuda:N is set (events, nvjpeg and torch.cuda.* calls
    without a device go there), as under torchrun; the CPU is left alone."""
    import tinydistill.dist as dist_mod

    made_current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: made_current.append(torch.device(d)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist_mod.setup("cuda:1") == (0, 1, torch.device("cuda:1")) and made_current == [torch.device("cuda:1")]
    assert dist_mod.setup("cuda")[2] == torch.device("cuda:0") and made_current[-1] == torch.device("cuda:0")
    made_current.clear()
    assert dist_mod.setup("cpu")[2] == torch.device("cpu") and made_current == []
    monkeypatch.setattr(dist_mod.dist, "init_process_group", lambda **kw: None)
    monkeypatch.setattr(dist_mod, "active", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist_mod.setup("cuda")[2] == torch.device("cuda:1") and made_current == [torch.device("cuda:1")]


def test_one_side_stream_per_device_across_epochs(data):
    """train-student makes a DeviceRenderer per epoch: they all render on the one side stream
    of their device (a stream per epoch would keep growing the allocator's reserved memory)."""
    from tinydistill.cuda import SideStream

    used = []
    core, _, loader = _encoded_loader(data, workers=0, batches=2)
    for epoch in range(2):
        r = DeviceRenderer(core, "cpu", unit=48)
        render = r._render_unit
        r._render_unit = lambda parts, streams: used.append(streams) or render(parts, streams)
        assert len(list(r(loader))) == 2
    assert len(used) == 4 and all(s is used[0] for s in used) and used[0] is SideStream.of("cpu")


@pytest.mark.slow
def test_verify_samples_distinct_views(stores, data, weights):
    from tinydistill.verify import verify_store

    v = verify_store(str(stores["enc"][0]), data, "test_resnet", weights, samples=10_000, decode="device")
    assert v["views_checked"] == 2 * N and v["max_abs_logp_diff"] == 0.0  # every view once, none twice
