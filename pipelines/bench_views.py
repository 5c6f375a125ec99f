"""Benchmark: what a view costs to describe and to render, and how rendering scales with workers.

Views are explicit parameter records (:mod:`tinydistill.params`) rendered by the PIL renderer
(:mod:`tinydistill.render_pil`). Measured side by side in one run on ImageNet-like 500x375
JPEGs (``benchlib.make_photo_folder``) with TinyViT's recipe at 224 px (RandAugment
``rand-m9-mstd0.5-inc1``, mixup 0.8 / cutmix 1.0, mix groups of 256):

  A. Per view, in this process with one torch thread (as a DataLoader worker runs), on the same
     images in blocks of 64 rows with the parts taking turns block by block (the order rotating),
     every round a fresh epoch of views:
       decode   ``source.read(rows)`` (JPEG decode to a PIL image)
       draw     ``Views.params(epoch, row, size)``: the mix partner lookup and ``Policy.draw``
       render   ``render_pil.render_base(img, record, 224)``: crop, flip, RandAugment ops, to tensor
       mix      ``render_pil.mix(x, partner_x, record)`` for the mixed views
     The record is what replay costs beyond plain augmentation; it should be small against the
     render.
  B. ``DataLoader(ViewStream(Views(...), items), num_workers=W)`` for W = 1 and 2, whole passes
     over one training epoch's batches of 64 (``epoch_order`` + ``train_items``) alternating,
     wall time from creating the loader to the last batch (worker start-up included), and each
     worker's busy share from the batches' ``busy_s``.

Medians over rounds, ratios per round with [min, max]. No timing is asserted.

    .venv/bin/python pipelines/bench_views.py [--rounds R] [--images N] [--data-dir DIR] [--out FILE.json]
"""

from __future__ import annotations

import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchlib import (aug_spec, bench_parser, environment, fmt_ratio, make_photo_folder, ratio_stats,
                      recipe, shares, write_json)

RECIPE = recipe(erasing=False, img_size=224)  # TinyViT's, without random erasing
BLOCK = 64


def per_view_parts(views, rows: list[int], rounds: int) -> dict:
    """Microseconds per view of decode, draw, render and mix, rounds x blocks, parts taking turns."""
    from tinydistill import render_pil

    src, size = views.source, views.spec.img_size
    imgs = dict(src.read(rows))  # decoded once for draw/render/mix; decode is timed on its own
    parts = ["decode", "draw", "render", "mix"]
    out = {p: [] for p in parts}
    turn = 0
    for r in range(rounds):
        acc = {p: [0.0, 0] for p in parts}
        gc.collect()
        gc.disable()
        try:
            for lo in range(0, len(rows), BLOCK):
                block = rows[lo:lo + BLOCK]
                recs, base = {}, {}
                for part in parts[turn % 4:] + parts[:turn % 4]:
                    t0 = time.perf_counter()
                    if part == "decode":
                        n = sum(1 for _ in src.read(block))
                    elif part == "draw":
                        recs = {q: views.params(r, q, imgs[q].size) for q in block}
                        n = len(block)
                    elif part == "render":
                        recs = recs or {q: views.params(r, q, imgs[q].size) for q in block}
                        t0 = time.perf_counter()
                        base = {q: render_pil.render_base(imgs[q], recs[q], size) for q in block}
                        n = len(block)
                    else:
                        recs = recs or {q: views.params(r, q, imgs[q].size) for q in block}
                        base = base or {q: render_pil.render_base(imgs[q], recs[q], size) for q in block}
                        t0 = time.perf_counter()
                        mixed = [q for q in block if recs[q].mix != "none" and recs[q].partner in base]
                        for q in mixed:
                            render_pil.mix(base[q], base[recs[q].partner], recs[q])
                        n = len(mixed)
                    acc[part][0] += time.perf_counter() - t0
                    acc[part][1] += n
                turn += 1
        finally:
            gc.enable()
        for p in parts:
            out[p].append(1e6 * acc[p][0] / max(acc[p][1], 1))
        print(f"  A round {r + 1}/{rounds}: " + ", ".join(f"{p} {out[p][-1]:.0f} us" for p in parts), flush=True)
    return out


def loader_pass(views, items, workers: int) -> dict:
    from tinydistill.stream import ViewStream

    t0 = time.perf_counter()
    loader = torch.utils.data.DataLoader(ViewStream(views, items), batch_size=None, num_workers=workers,
                                         prefetch_factor=4)
    n, busy = 0, [0.0] * workers
    for b in loader:
        n += len(b)
        busy[b.worker] += b.busy_s
    wall = time.perf_counter() - t0
    return {"views": n, "wall_s": wall, "views_per_s": n / wall, "worker_busy": [x / wall for x in busy]}


def part_a(views, n: int, rounds: int) -> dict:
    """A, in this process with one torch thread (as a DataLoader worker runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return per_view_parts(views, list(range(n)), rounds)
    finally:
        torch.set_num_threads(threads)


def part_b(views, items, rounds: int) -> dict:
    """B: whole loader passes with 1 and 2 workers, alternating."""
    b = {1: [], 2: []}
    for r in range(rounds):
        for w in ((1, 2) if r % 2 == 0 else (2, 1)):
            b[w].append(loader_pass(views, items, w))
        print(f"  B round {r + 1}/{rounds}: 1 worker {b[1][-1]['views_per_s']:.0f}, "
              f"2 workers {b[2][-1]['views_per_s']:.0f} views/s", flush=True)
    return b


def report(a: dict, b: dict, batches: int, rounds: int) -> dict:
    med = statistics.median
    print(f"\nA. per view, one process, one torch thread; median over {rounds} rounds [min, max], microseconds:")
    print(f"{'part':8s} {'us/view':>8s} {'[min, max]':>14s}  share of draw+render")
    for p in ("decode", "draw", "render", "mix"):
        xs = a[p]
        share = ratio_stats(xs, [d + r for d, r in zip(a["draw"], a["render"])]) if p in ("draw", "render") else None
        span = f"[{min(xs):.0f}, {max(xs):.0f}]"
        print(f"{p:8s} {med(xs):8.0f} {span:>14s}  {fmt_ratio(share) if share else ''}")
    dr = ratio_stats(a["draw"], a["render"])
    print(f"draw / render = {fmt_ratio(dr)} (per round)")
    print(f"\nB. DataLoader(ViewStream), {batches} batches of 64 per pass, worker start-up included:")
    for w in (1, 2):
        xs = [x["views_per_s"] for x in b[w]]
        busy = [med([x["worker_busy"][i] for x in b[w]]) for i in range(w)]
        print(f"  {w} worker(s): {med(xs):6.0f} views/s [{min(xs):.0f}, {max(xs):.0f}], worker busy {shares(busy)}")
    sc = ratio_stats([x["views_per_s"] for x in b[2]], [x["views_per_s"] for x in b[1]])
    print(f"  2 workers / 1 worker = {fmt_ratio(sc)}")
    return {"draw/render": dr, "2w/1w": sc}


def main(argv=None) -> int:
    ap = bench_parser(__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", type=int, default=512, help="500x375 JPEGs (default 512)")
    ap.add_argument("--data-dir", help="where the JPEGs are made and kept (default: a temporary directory)")
    ap.add_argument("--out", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    from tinydistill.sources import open_source
    from tinydistill.stream import epoch_order, train_items
    from tinydistill.views import Views

    env = environment()
    print(f"bench_views: {env}")
    res: dict = {"env": env, "config": vars(args)}
    with tempfile.TemporaryDirectory(prefix="bench_views_") as tmp:
        root = args.data_dir or str(Path(tmp) / "jpeg")
        info = make_photo_folder(root, args.images, classes=10)
        print(f"data: {args.images} JPEGs 500x375, mean {info['mean_kb']:.1f} KB; TinyViT recipe at 224 px, "
              f"{args.rounds} rounds")
        source = open_source(root)
        spec = aug_spec(RECIPE)
        views = Views(source, spec, 0)
        res["A_us_per_view"] = a = part_a(views, len(source), args.rounds)
        items = train_items(epoch_order(len(source), spec.mix_group, spec.mixing, 0, 0, 0, 0), 0, 64)
        res["B_loader"] = b = part_b(views, items, args.rounds)
    res["summary"] = report(a, b, len(items), args.rounds)
    write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
