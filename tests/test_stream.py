"""Work split and order: small items for every worker, fresh epoch orders, chunk reads."""

import numpy as np
import pytest
import torch
from PIL import Image

import tinydistill as td
from helpers import random_teacher
import tinydistill.train as train_mod
from tinydistill.augment import AugSpec
from tinydistill.generate import GenConfig, gen_logits
from tinydistill.params import mix_pairs
from tinydistill.store import create_store
from tinydistill.stream import ChunkTargets, epoch_order, epoch_steps, gen_plan, item_rows, train_items
from tinydistill.train import TrainConfig, train_student


# ---- training order -------------------------------------------------------------------------------

def test_epoch_order_is_fresh_each_epoch_and_keeps_pairs_together():
    n, g = 1000, 32
    a, b = epoch_order(n, g, True, 7, 0, 3, 0), epoch_order(n, g, True, 7, 0, 3, 1)
    assert sorted(a) == sorted(b) == list(range(n)) and not np.array_equal(a, b)
    assert np.array_equal(a, epoch_order(n, g, True, 7, 0, 3, 0))  # seeded
    assert not np.array_equal(a, epoch_order(n, g, True, 7, 0, 4, 0))  # another seed, another order
    # fine-grained: consecutive rows are rarely consecutive in the order (not chunk runs)
    assert np.mean(np.abs(np.diff(a)) == 1) < 0.1
    # groups are contiguous runs; inside them, each row sits next to its mix partner
    pos = 0
    while pos < n:
        grp = a[pos] // g
        members = np.arange(grp * g, min((grp + 1) * g, n))
        run = a[pos:pos + len(members)]
        assert sorted(run) == list(members)
        partner = mix_pairs(7, 0, int(grp), members)
        for i in range(0, len(run) - 1, 2):
            assert partner[int(run[i])] == int(run[i + 1])
        pos += len(members)
    # without mixing, rows inside a group are shuffled too
    c = epoch_order(n, g, False, 7, 0, 3, 0)
    assert sorted(c) == list(range(n)) and np.mean(np.abs(np.diff(c)) == 1) < 0.1


def _shares(n, g, cr, world, epoch, mixing=True, seed=3):
    return [epoch_order(n, g, mixing, 7, 0, seed, epoch, cr, world, r) for r in range(world)]


def test_ranks_share_every_row_once_in_equal_steps_and_keep_pairs():
    n, g, cr, world, b = 2100, 16, 32, 8, 16  # 66 chunks, the last one partial
    shares = _shares(n, g, cr, world, 0)
    assert sorted(np.concatenate(shares).tolist()) == list(range(n))  # every row once per epoch
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    steps = epoch_steps(n, b, world)
    items = [train_items(s, 0, b, steps) for s in shares]
    assert {len(it) for it in items} == {steps}  # DDP: every rank the same number of steps
    assert all(0 < len(it.rows) <= b for rank in items for it in rank)
    for rank, share in zip(items, shares):
        assert np.array_equal(np.concatenate([it.rows for it in rank]), share)
    # pairs stay side by side: only a pair cut by two shares' ends is split (at most 2 per rank)
    for share in shares:
        partner = {}
        for grp in np.unique(share // g):
            partner.update(mix_pairs(7, 0, int(grp), np.arange(grp * g, min((grp + 1) * g, n))))
        pos = {int(r): i for i, r in enumerate(share)}
        apart = [r for r in pos if partner[r] != r and abs(pos.get(partner[r], -9) - pos[r]) != 1]
        assert len(apart) <= 2
    # one rank and one batch size: the order the old global order gave (the digits results)
    assert np.array_equal(epoch_order(n, g, True, 7, 0, 3, 0, cr, 1, 0), epoch_order(n, g, True, 7, 0, 3, 0))


def test_a_rank_of_8_reads_at_most_1_5_of_8_of_an_epochs_chunks(tmp_path):
    """Chunks dealt to ranks: through the real joiner (RankTargets), each of 8 ranks reads at most
    1.5/8 of an epoch's chunks (a global order of mix groups made each read most of them)."""
    from tinydistill.ranktargets import RankTargets

    st = _store(tmp_path / "s.zarr", n=2100, chunk=32)
    chunks = -(-st.num_rows // st.chunk_rows)
    for epoch in (0, 1):
        steps = epoch_steps(st.num_rows, 16, 8)
        for r, share in enumerate(_shares(st.num_rows, 16, st.chunk_rows, 8, epoch, mixing=False)):
            items = train_items(share, 1, 16, steps)
            rt = RankTargets(st, items, threads=1)
            for it in items:
                rt.get(it.epoch, it.rows)
            rt.close()
            assert 0 < rt.reads <= 1.5 * chunks / 8, (epoch, r, rt.reads, chunks)


def test_order_is_fresh_every_epoch_for_every_rank_and_worker_free():
    n, g, cr, world = 4096, 16, 64, 8
    epochs = [_shares(n, g, cr, world, e) for e in range(4)]
    for r in range(world):
        chunk_sets = [frozenset((ep[r] // cr).tolist()) for ep in epochs]
        assert len(set(chunk_sets)) == 4  # a rank's chunks are dealt afresh every epoch
        assert len({ep[r].tobytes() for ep in epochs}) == 4
    assert all(np.array_equal(a, b) for a, b in zip(epochs[0], _shares(n, g, cr, world, 0)))  # seeded


def test_batches_a_rank_sees_do_not_depend_on_its_worker_count():
    from tinydistill.sources import open_source
    from tinydistill.stream import ViewStream
    from tinydistill.views import Views

    spec = AugSpec(img_size=8, mixup=0.8, cutmix=1.0, mix_group=16)
    src = open_source("digits")
    share = epoch_order(len(src), 16, True, 7, 0, 3, 1, 64, 4, 2)  # rank 2 of 4
    items = train_items(share, 0, 24, epoch_steps(len(src), 24, 4))[:5]
    seen = {}
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ViewStream(Views(src, spec, 7), items, encoded=False),
                                             batch_size=None, num_workers=workers)
        seen[workers] = [(b.row.tolist(), b.image) for b in loader]
    assert [r for r, _ in seen[0]] == [r for r, _ in seen[2]] == [it.rows.tolist() for it in items]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(seen[0], seen[2]))


# ---- targets: each chunk read once per worker per epoch ------------------------------------------

def _store(path, n=1000, k=4, chunk=64):
    st = create_store(path, num_classes=20, k=k, epochs=2, keys=[f"k{i}" for i in range(n)], chunk_rows=chunk,
                      shard_rows=2 * chunk)
    rng = np.random.default_rng(0)
    for e in range(2):
        for s in range(st.num_shards):
            a, b = st.shard_bounds(s)
            lp = np.log(rng.dirichlet(np.ones(20), size=b - a)).astype(np.float32)
            idx = np.argsort(-lp, 1)[:, :k]
            st.write_shard(e, s, np.take_along_axis(lp, idx, 1), idx, np.arange(a, b, dtype=np.uint64))
    return td.open_store(st.path)


def test_chunk_targets_read_each_chunk_once(tmp_path, monkeypatch):
    st = _store(tmp_path / "s.zarr")
    order = epoch_order(st.num_rows, 32, False, 0, 1, 5, 0)
    items = train_items(order, 1, 16)[1::3]  # what worker 1 of 3 gets
    reads = []
    orig = type(st).targets
    monkeypatch.setattr(type(st), "targets", lambda self, e, rows, kinds=None: reads.append((e, rows.start)) or
                        orig(self, e, rows, kinds))
    tg = ChunkTargets(st, items)
    for it in items:
        got = tg.get(it.epoch, it.rows)
        lp, ix = got["logp"], got["index"]
        ref = orig(st, 1, it.rows)
        ref_lp, ref_ix = ref["logp"], ref["index"]
        assert np.array_equal(lp, ref_lp) and np.array_equal(ix, ref_ix)
    touched = {int(r) // 64 for it in items for r in it.rows}
    assert len(reads) == len(set(reads)) == len(touched) == tg.reads  # once each, only those needed
    assert all(rows % 64 == 0 for _, rows in reads) and not tg.cache  # whole chunks; nothing left over


# ---- gen-logits plan ------------------------------------------------------------------------------

def test_gen_plan_items_cover_shards_aligned_with_batches():
    shard = 4096 * 16
    bounds = lambda s: (s * shard, min((s + 1) * shard, 70_000))  # noqa: E731
    todo = [(0, 0), (0, 1), (1, 0), (1, 1)]
    plans = [gen_plan(todo, bounds, 70_000, 256, 96, workers=5, world=3, rank=r) for r in range(3)]
    size = plans[0].item_rows
    assert size % 768 == 0 and 70_000 / size >= 4 * 5 * 3  # lcm(256, 96); >= 4 items per worker and epoch
    seen = {}
    for r, plan in enumerate(plans):
        assert plan.rounds == [[(0, 0), (0, 1), (1, 0)], [(1, 1)]]
        for it, rnd in zip(plan.items, plan.item_round):
            assert (it.epoch, int(it.rows[0]) // shard) in plan.rounds[rnd]
            a = bounds(int(it.rows[0]) // shard)[0]
            assert (it.rows[0] - a) % 96 == 0 and it.batch == 96 and it.render == 768  # shard-relative runs of 96
            assert int(it.rows[-1]) // shard == int(it.rows[0]) // shard  # never across shards
            for row in it.rows:
                seen[it.epoch, int(row)] = seen.get((it.epoch, int(row)), 0) + 1
        assert sum(plan.round_rows) == sum(len(it.rows) for it in plan.items)
    assert len(seen) == 2 * 70_000 and set(seen.values()) == {1}
    # small data still gives every worker something; big data keeps items small
    assert item_rows(2000, 256, 64, 3, 1) == 256 and item_rows(10**7, 256, 256, 15, 8) == 4096


# ---- both stages keep every worker busy, and the store does not depend on workers -----------------

@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """2,304 small RGB images in 12 class folders."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(2304):
        d = root / f"c{i % 12:02d}"
        d.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(d / f"{i:05d}.png")
    return str(root)


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory):
    return random_teacher(tmp_path_factory.mktemp("w") / "t.pth", 12)


SPEC = AugSpec(img_size=16, mixup=0.8, cutmix=1.0)  # default mix_group (256)


@pytest.mark.slow
def test_three_workers_busy_in_both_stages_and_store_identical_to_one(photos, teacher_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the same teacher arithmetic in both runs
    torch.set_num_threads(1)
    runs = {}
    for workers in (3, 1):
        out = tmp_path / f"w{workers}.zarr"
        runs[workers] = gen_logits(GenConfig(data=photos, teacher="test_resnet", teacher_weights=teacher_weights,
                                             teacher_input_size=16, out=str(out), k=5, epochs=(0, 2), workers=workers,
                                             spec=SPEC, progress=False))  # default chunk, shard and batch sizes
    load = runs[3]["load"]
    assert len(load["worker_views"]) == 3 and min(load["worker_views"]) >= 256, load
    assert sum(load["worker_views"]) == 2 * 2304 and min(load["worker_busy_share"]) > 0
    for name in ("logp", "index_gap", "seed", "complete"):  # every stored byte is the same
        files = sorted(p.relative_to(tmp_path / "w1.zarr") for p in (tmp_path / "w1.zarr" / name).rglob("*")
                       if p.is_file() and p.name != "zarr.json")
        assert files
        for f in files:
            assert (tmp_path / "w3.zarr" / f).read_bytes() == (tmp_path / "w1.zarr" / f).read_bytes(), f
    res = train_student(TrainConfig(data=photos, student="test_vit", out=str(tmp_path / "student"),
                                    logits=str(tmp_path / "w3.zarr"), epochs=1, batch_size=64, workers=3,
                                    model_kwargs={"img_size": 16, "patch_size": 4}, progress=False))
    assert len(res["load"]["worker_views"]) == 3 and min(res["load"]["worker_views"]) >= 64 * 10, res["load"]


@pytest.mark.slow
def test_offline_no_kd_and_online_draw_the_same_batches(photos, teacher_weights, tmp_path, monkeypatch):
    from tinydistill.teachers import Teacher
    from tinydistill.verify import verify_store

    forwards = []
    targets = Teacher.targets
    monkeypatch.setattr(Teacher, "targets", lambda self, x, kinds, **kw: forwards.append(len(x))
                        or targets(self, x, kinds, **kw))
    store = tmp_path / "s.zarr"
    gen_logits(GenConfig(data=photos, teacher="test_resnet", teacher_weights=teacher_weights, teacher_input_size=16,
                         out=str(store), k=12, epochs=(0, 2), workers=0, spec=SPEC, progress=False))
    seen = []

    class Recorder(train_mod.ViewStream):
        def __init__(self, views, items, **kw):
            seen[-1].append([(it.epoch, it.rows.tolist()) for it in items])
            super().__init__(views, items, **kw)

    assert sum(forwards) == 2 * 2304  # gen-logits ran every view through Teacher.targets
    v = verify_store(str(store), photos, "test_resnet", teacher_weights, samples=16)
    assert v["max_abs_logp_diff"] == 0.0 and v["topk_id_agreement"] == 1.0 and sum(forwards) > 2 * 2304
    monkeypatch.setattr(train_mod, "ViewStream", Recorder)
    common = dict(data=photos, student="test_vit", epochs=2, batch_size=128, workers=0, seed=3, progress=False,
                  model_kwargs={"img_size": 16, "patch_size": 4})
    for mode in (dict(logits=str(store)), dict(no_kd=True, like=str(store)),
                 dict(online_teacher="test_resnet", teacher_weights=teacher_weights, teacher_input_size=16,
                      like=str(store))):
        seen.append([])
        train_student(TrainConfig(out=str(tmp_path / f"m{len(seen)}"), **common, **mode))
    assert seen[0] == seen[1] == seen[2]
    assert forwards[-36:] == [128] * 36  # online KD: its 2 x 18 batches through the same forward
    epochs = seen[0]
    assert [e for e, _ in epochs[0]] == [0] * 18 and [e for e, _ in epochs[1]] == [1] * 18
    assert [r for _, r in epochs[0]] != [r for _, r in epochs[1]]


@pytest.mark.slow
def test_torch_renderer_store_replays_and_other_renderer_needs_the_flag(photos, teacher_weights, tmp_path, caplog):
    import dataclasses

    from tinydistill.replay import check_replay
    from tinydistill.sources import open_source
    from tinydistill.verify import verify_store
    from tinydistill.views import ReplayError

    spec = dataclasses.replace(SPEC, renderer="torch", auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5)
    store = tmp_path / "t.zarr"
    gen_logits(GenConfig(data=photos, teacher="test_resnet", teacher_weights=teacher_weights, teacher_input_size=16,
                         out=str(store), k=5, epochs=(0, 1), workers=2, spec=spec, progress=False))
    st = td.open_store(store)
    assert st.attrs["renderer"] == "torch" and st.attrs["render_device"] == "cpu" and st.spec.renderer == "torch"
    assert st.canary_pixels().shape == (len(st.attrs["canary"]["views"]), 3, 16, 16)
    v = verify_store(str(store), photos, "test_resnet", teacher_weights, samples=8)
    assert v["renderer"] == "torch" and v["max_abs_logp_diff"] == 0.0  # torch-rendered views replay exactly
    src = open_source(photos)
    with pytest.raises(ReplayError, match="rendered by the torch renderer.*--allow-renderer-change"):
        check_replay(st, src, renderer="pil")
    with caplog.at_level("WARNING", logger="tinydistill"):
        got = check_replay(st, src, renderer="pil", allow_renderer_change=True)
    assert got.renderer == "pil" and "PSNR" in caplog.text
    common = dict(data=photos, student="test_vit", epochs=1, batch_size=64, workers=1, progress=False,
                  model_kwargs={"img_size": 16, "patch_size": 4}, logits=str(store))
    with pytest.raises(ReplayError, match="--allow-renderer-change"):
        train_student(TrainConfig(out=str(tmp_path / "a"), render="pil", **common))
    assert train_student(TrainConfig(out=str(tmp_path / "b"), **common))["views"] == 2304
    assert train_student(TrainConfig(out=str(tmp_path / "c"), render="pil", allow_renderer_change=True,
                                     **common))["views"] == 2304


def test_main_process_leaves_the_cores_to_its_workers(monkeypatch):
    from tinydistill import dist

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(dist.os, "cpu_count", lambda: 16)
    try:
        dist.setup("cpu", 15)
        assert torch.get_num_threads() == 1  # 16 cores, 15 rendering workers
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        dist.setup("cpu", 3)
        assert torch.get_num_threads() == 5  # 8 cores per local rank, 3 of them for its workers
    finally:
        torch.set_num_threads(before)
