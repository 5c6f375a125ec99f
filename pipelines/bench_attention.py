"""Benchmark: what the stored attention maps cost on disk and how far they are from the teacher's.

    python pipelines/bench_attention.py --store runs/attention/seed-0/logits.zarr --data digits \\
        --teacher-weights runs/attention/seed-0/teacher/best.pth [--views 2048]

1. Bytes per map cell on disk: the ``attention`` array's shard files (its share of
   ``inspect``'s "on disk"), over the store's complete views.
2. Reconstruction error of a real teacher's maps: the first ``--views`` rows of epoch 0 are
   rendered and run through the store's teacher in the batches gen-logits ran them in; the
   float32 maps it gives are compared with what the store returns. Per view, the L1 distance
   ``sum |stored - teacher|`` in units of the map's mass (maps sum to 1): mean, p99, max.
   The same maps through a linear code (``round(255 * map / max)``) and a square-root code,
   for comparison with the store's cube-root code.
3. Forward cost: ``Teacher.targets`` on the same batches with top-K alone and with top-K and
   maps, in alternating rounds (median ratio over rounds, [min, max]).
4. The same three codes on synthetic maps, softmax of Gaussian logits at grids 7, 14 and 16 and
   four sharpness levels (largest cell from ~0.02 to ~0.7), 2,000 maps each: the worst case
   over map shapes a teacher might give.
"""

import argparse

import numpy as np
import torch

import tinydistill as td
from tinydistill.kinds import Attention
from tinydistill.sources import open_source
from tinydistill.teachers import load_teacher
from tinydistill.views import Views


def code(maps: np.ndarray, power: float) -> np.ndarray:
    """Maps through a uint8 code ``round(255 * (m / max) ** power)``, decoded and renormalised."""
    top = maps.reshape(len(maps), -1).max(1)[:, None, None]
    c = np.rint(255 * (maps / top) ** power) ** (1 / power)
    return c / c.sum((1, 2), keepdims=True)


def l1(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.float64) - b.astype(np.float64)).reshape(len(a), -1).sum(1)


def stats(err: np.ndarray) -> str:
    return f"{100 * err.mean():.3f} % / {100 * np.quantile(err, 0.99):.3f} % / {100 * err.max():.3f} %"


def forward_cost(teacher, kinds, images: list, rounds: int = 5) -> list[float]:
    """Per round, seconds of ``targets`` with the maps / seconds with top-K alone."""
    import time

    ratios = []
    for _ in range(rounds):
        secs = []
        for ks in (kinds[:1], kinds):
            t = time.perf_counter()
            for x in images:
                teacher.targets(x, ks)
            secs.append(time.perf_counter() - t)
        ratios.append(secs[1] / secs[0])
    return ratios


def teacher_maps(store_path: str, data: str, weights: str, views: int):
    """(the teacher's float32 maps, the store's, the forward-cost ratios) for the first rows of epoch 0."""
    st = td.open_store(store_path)
    t = st.teacher
    teacher = load_teacher(t["name"], weights, input_size=t.get("input_size"))
    torch.set_num_threads(int(t.get("cpu_threads", torch.get_num_threads())))
    teacher.place("cpu", t.get("amp", "none"), attention_grid=st.kind("attention").grid)
    core = Views(open_source(data), st.spec, st.base_seed, skip_bad=True)
    bs, got, ref, images = int(t.get("batch_size", 64)), [], [], []
    for lo in range(0, min(views, st.shard_rows, st.num_rows), bs):  # gen-logits' batches: shard-relative runs
        rows = range(lo, min(lo + bs, st.num_rows))
        images.append(core.render(0, rows).image)
        got.append(teacher.targets(images[-1], st.kinds)["attention"].numpy())
        ref.append(st.attention(0, np.array(list(rows))))
    return np.concatenate(got), np.concatenate(ref), forward_cost(teacher, st.kinds, images)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--teacher-weights", required=True)
    ap.add_argument("--views", type=int, default=2048)
    args = ap.parse_args()

    st = td.open_store(args.store)
    g = st.kind("attention").grid
    info = st.info
    cells = info["complete_views"] * g * g
    print(f"store {args.store}: {info['complete_views']} views, {g}x{g} maps")
    print(f"attention on disk: {info['bytes_by_array']['attention']:,} bytes = "
          f"{info['bytes_by_array']['attention'] / cells:.3f} bytes/cell, "
          f"{info['bytes_by_array']['attention'] / info['complete_views']:.1f} bytes/view "
          f"(whole store {info['bytes_per_view']:.1f} bytes/view)")

    maps, stored, cost = teacher_maps(args.store, args.data, args.teacher_weights, args.views)
    peak = maps.reshape(len(maps), -1).max(1)
    print(f"\nteacher {st.teacher['name']}: {len(maps)} maps, largest cell mean {peak.mean():.3f} "
          f"(max {peak.max():.3f}; uniform {1 / (g * g):.3f})")
    print("L1 error, % of the map's mass: mean / p99 / max")
    print(f"  stored (cube-root code)   {stats(l1(stored, maps))}")
    print(f"  square-root code          {stats(l1(code(maps, 0.5), maps))}")
    print(f"  linear code               {stats(l1(code(maps, 1.0), maps))}")
    print(f"teacher forward with maps / without: {np.median(cost):.3f} [{min(cost):.3f}, {max(cost):.3f}] "
          f"over {len(cost)} rounds of {len(maps)} views")

    print("\nsynthetic maps (softmax of Gaussian logits x s), L1 % mean / p99 / max")
    rng = np.random.default_rng(0)
    worst = {p: 0.0 for p in (1 / 3, 0.5, 1.0)}
    for grid in (7, 14, 16):
        for s in (0.5, 2, 4, 6):
            m = np.exp(rng.normal(size=(2000, grid, grid)) * s)
            m /= m.sum((1, 2), keepdims=True)
            errs = {p: l1(code(m, p), m) for p in worst}
            for p in worst:
                worst[p] = max(worst[p], float(errs[p].max()))
            print(f"  grid {grid:2d}, s {s}: largest cell {m.reshape(2000, -1).max(1).mean():.3f}; cube root "
                  f"{stats(errs[1 / 3])}; square root {stats(errs[0.5])}; linear {stats(errs[1.0])}")
    assert np.allclose(code(m, 1 / 3), Attention.from_codes(Attention.to_codes(m)), atol=1e-6)  # the store's code
    print("worst over all synthetic maps: " + ", ".join(
        f"{name} {100 * worst[p]:.2f} %" for name, p in (("cube root", 1 / 3), ("square root", 0.5), ("linear", 1.0))))


if __name__ == "__main__":
    main()
