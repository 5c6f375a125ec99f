"""Benchmark: what replayable views cost, and how many views per second one worker renders.

Everything is measured side by side in one run. On a shared, noisy machine absolute times
wander, so the variants of each comparison take turns on the same data in small blocks (one
mix group / unit of 64 rows; the order rotates from block to block), every round renders
fresh views (epoch = round), and the figures are medians over rounds: views/s of each
variant, and the per-round ratio between variants (with its min and max).

  A. Replay overhead on the same decoded images and the same AugSpec. *plain* calls
     ``maker.transform(img)`` (+ ``maker.erase``; + a per-view mix with its partner when the
     spec mixes) with nobody touching the global RNGs; *replay* renders the same images through
     ``maker.base(img, seed)`` (+ ``maker.mix(..., seed)`` and the seeded pairing), which reseeds
     Python ``random`` / numpy / torch from each view's PCG64 stream and restores them after.
     The image work is the same code; only the bookkeeping differs (the ops drawn differ, so
     each round renders fresh views: epoch = round).
  B. The bookkeeping alone, per view: ``view_generator`` + ``isolated_rng`` around nothing,
     and its parts (state save/restore of each RNG).
  C. The full path, per worker (one process, one torch thread): ``ViewStream`` iterated
     directly (decode once per unit, augment, seeded mix, collate batches of 64) against the
     plain timm-style loop (decode, transform, erase, collate, timm ``Mixup`` in batch mode).
     On the built-in ``digits`` source (8x8 grey, rendered at 32 px) and on a temporary
     ImageFolder of synthetic 320x256 JPEG photos (rendered at 224 px).
  D. ``DataLoader(ViewStream, num_workers=2)`` against ``num_workers=0`` on the JPEGs (wall
     time; whole passes alternate; persistent workers, warmed up before timing).

Specs: TinyViT's ImageNet recipe in timm terms (img_size 224, RandAugment
``rand-m9-mstd0.5-inc1``, colour jitter 0.4, bicubic, random erasing 0.25 pixel mode), with and
without mixup 0.8 / cutmix 1.0 (switch 0.5); ``mix_group`` 64 so units of 64 rows split evenly
over workers. Digits use the same specs at img_size 32. No timing is asserted.

    .venv/bin/python pipelines/bench_views.py [--rounds R] [--images N] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tinydistill.augment import AugSpec, ViewMaker, mix_pairs
from tinydistill.seeds import encode_seed, isolated_rng, view_generator
from tinydistill.sources import open_source
from tinydistill.views import ViewStream
from benchlib import make_jpeg_folder  # noqa: E402

TINYVIT = dict(auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.4, interpolation="bicubic",
               re_prob=0.25, re_mode="pixel", mix_group=64)
MIX = dict(mixup=0.8, cutmix=1.0, switch_prob=0.5)
BATCH = 64


# ---- data ---------------------------------------------------------------------------------------

def decoded(source, rows) -> list:
    return [img.convert("RGB") if img.mode != "RGB" else img for _, img in source.read(rows)]


# ---- timing -------------------------------------------------------------------------------------

def interleave(variants: dict, blocks: list, rounds: int, warmup: bool = False) -> dict:
    """Time ``fn(round, block) -> views`` of every variant on every block, for several rounds.

    Variants take turns block by block (the order rotates from block to block), so a slow spell
    of the shared machine falls on all of them alike. Each round gives one total per variant;
    views of round r are those of epoch r. ``warmup`` runs each variant once on the first block,
    untimed, first.
    """
    names = list(variants)
    if warmup:
        for name in names:
            variants[name](10_000, blocks[0])
    out = {k: [] for k in names}
    turn = 0
    for r in range(rounds):
        acc = {k: {"views": 0, "wall_s": 0.0, "cpu_s": 0.0} for k in names}
        gc.collect()
        gc.disable()
        try:
            for b in blocks:
                for name in names[turn % len(names):] + names[:turn % len(names)]:
                    c0, t0 = time.process_time(), time.perf_counter()
                    n = variants[name](r, b)
                    acc[name]["wall_s"] += time.perf_counter() - t0
                    acc[name]["cpu_s"] += time.process_time() - c0
                    acc[name]["views"] += n
                turn += 1
        finally:
            gc.enable()
        for k in names:
            out[k].append(acc[k])
    return out


def blocks_of(n: int, size: int) -> list:
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def summarise(runs: dict, base: str, *others: str) -> dict:
    """Median views/s of each variant, and per-round ratios other/base of views/s (median, min, max).

    ``cpu`` ratios use this process's CPU time instead of wall time (meaningless with workers).
    """
    def vps(x, key="wall_s"):
        return x["views"] / x[key]

    out = {k: statistics.median(vps(x) for x in runs[k]) for k in (base, *others)}
    for o in others:
        ratios = [vps(y) / vps(x) for x, y in zip(runs[base], runs[o])]
        cpu = [vps(y, "cpu_s") / vps(x, "cpu_s") for x, y in zip(runs[base], runs[o])]
        out[f"{o}/{base}"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                              "cpu_median": statistics.median(cpu)}
    out["rounds"] = runs
    return out


# ---- A: replay overhead on decoded images ---------------------------------------------------------

def plain_mix(maker: ViewMaker, x: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """``ViewMaker.mix`` without the reseeding: the same timm draws, from the global RNGs."""
    from timm.data.mixup import cutmix_bbox_and_lam

    lam, use_cutmix = maker.mixer._params_per_batch()
    if lam == 1.0:
        return x
    if use_cutmix:
        (yl, yh, xl, xh), lam = cutmix_bbox_and_lam(x.shape, lam, ratio_minmax=maker.mixer.cutmix_minmax,
                                                    correct_lam=maker.mixer.correct_lam)
        out = x.clone()
        out[:, yl:yh, xl:xh] = partner[:, yl:yh, xl:xh]
        return out
    return x * lam + partner * (1.0 - lam)


def overhead_variants(maker: ViewMaker, imgs: list) -> dict:
    """Variants over a block = one mix group of rows [lo, hi) of ``imgs``."""
    n, mixing = len(imgs), maker.mixer is not None

    def plain(_r, block):
        lo, hi = block
        xs = []
        for img in imgs[lo:hi]:
            x = maker.transform(img)
            if maker.erase is not None:
                x = maker.erase(x)
            xs.append(x)
        if mixing:  # partner: the mirror row of the group, as timm's batch flip
            for j in range(len(xs)):
                plain_mix(maker, xs[j], xs[-1 - j])
        return hi - lo

    def reseed(r, block):  # seeded per view like replay, but no save/restore of the RNG states
        lo, hi = block
        xs = []
        for i in range(lo, hi):
            _seed_from(view_generator(maker.base_seed, int(encode_seed(r, i, n)), 0))
            x = maker.transform(imgs[i])
            if maker.erase is not None:
                x = maker.erase(x)
            xs.append(x)
        if mixing:
            partner = mix_pairs(maker.base_seed, r, lo // maker.spec.mix_group, np.arange(lo, hi))
            for i in range(lo, hi):
                _seed_from(view_generator(maker.base_seed, int(encode_seed(r, i, n)), 1))
                plain_mix(maker, xs[i - lo], xs[partner[i] - lo])
        return hi - lo

    def replay(r, block):  # what ViewStream does with decoded images
        lo, hi = block
        xs = [maker.base(imgs[i], int(encode_seed(r, i, n))) for i in range(lo, hi)]
        if mixing:
            partner = mix_pairs(maker.base_seed, r, lo // maker.spec.mix_group, np.arange(lo, hi))
            for i in range(lo, hi):
                maker.mix(xs[i - lo], xs[partner[i] - lo], int(encode_seed(r, i, n)))
        return hi - lo

    return {"plain": plain, "reseed": reseed, "replay": replay}


def _seed_from(gen: np.random.Generator) -> None:
    """What ``isolated_rng`` does on entry, without saving the states it would restore."""
    s = gen.integers(0, 2**63, size=3)
    random.seed(int(s[0]))
    np.random.seed(int(s[1]) % 2**32)
    torch.default_generator.manual_seed(int(s[2]))


# ---- B: bookkeeping alone -----------------------------------------------------------------------

def bookkeeping(rounds: int, n: int = 3000) -> dict:
    st = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    parts = {
        "view_generator (SeedSequence + PCG64)": lambda i: view_generator(0, i, 0),
        "isolated_rng(view_generator(..)) around nothing": lambda i: _empty_isolated(i),
        "python random getstate+setstate": lambda i: random.setstate(random.getstate()),
        "numpy get_state+set_state": lambda i: np.random.set_state(np.random.get_state()),
        "torch get_rng_state+set_rng_state": lambda i: torch.set_rng_state(torch.get_rng_state()),
        "seed all three (random.seed, np.random.seed, default_generator)": lambda i: _seed3(i),
        "encode_seed": lambda i: int(encode_seed(3, i, 1_281_167)),
    }
    res = {k: [] for k in parts}
    for r in range(rounds):
        for k, f in (parts.items() if r % 2 == 0 else reversed(parts.items())):
            gc.collect()
            t0 = time.perf_counter()
            for i in range(n):
                f(i)
            res[k].append((time.perf_counter() - t0) / n * 1e6)
    random.setstate(st[0]), np.random.set_state(st[1]), torch.set_rng_state(st[2])
    return {k: statistics.median(v) for k, v in res.items()}


def _empty_isolated(i):
    with isolated_rng(view_generator(0, i, 0)):
        pass


def _seed3(i):
    random.seed(i * 7919 + 12345)
    np.random.seed(i)
    torch.default_generator.manual_seed(i)


# ---- C: full path per worker --------------------------------------------------------------------

def full_path_variants(source, spec: AugSpec) -> dict:
    from timm.data.mixup import Mixup
    from torch.utils.data import default_collate

    maker = ViewMaker(spec, 0)
    mixer = (Mixup(mixup_alpha=spec.mixup, cutmix_alpha=spec.cutmix, prob=spec.mix_prob,
                   switch_prob=spec.switch_prob, mode="batch", label_smoothing=0.0,
                   num_classes=source.num_classes) if spec.mixing else None)

    def plain(_r, block):  # a block is one unit (and one batch) of rows
        lo, hi = block
        batch = []
        for row, img in source.read(range(lo, hi)):
            x = maker.transform(img.convert("RGB") if img.mode != "RGB" else img)
            if maker.erase is not None:
                x = maker.erase(x)
            batch.append((x, int(source.labels[row])))
        x, y = default_collate(batch)
        if mixer is not None and len(x) >= 2:
            m = len(x) - len(x) % 2  # timm's batch Mixup wants an even batch
            mixer(x[:m], y[:m])
        return len(batch)

    def stream(r, block):
        unit = block[0] // spec.mix_group
        vs = ViewStream(source, spec, base_seed=0, epochs=[r], unit_rows=spec.mix_group, units=[(r, unit)],
                        batch_size=BATCH)
        vs._maker = maker  # built once, as in a persistent worker
        return sum(len(b["row"]) for b in vs)

    return {"plain": plain, "stream": stream}


# ---- D: DataLoader workers ----------------------------------------------------------------------

def worker_variants(source, spec: AugSpec, workers: int, epochs: int) -> tuple[dict, list]:
    from torch.utils.data import DataLoader

    vs = ViewStream(source, spec, base_seed=0, epochs=range(epochs), unit_rows=spec.mix_group, batch_size=BATCH)
    loaders = {f"workers={w}": DataLoader(vs, batch_size=None, num_workers=w, persistent_workers=w > 0)
               for w in (0, workers)}

    def run(loader):
        return lambda _r, _b: sum(len(b["row"]) for b in loader)

    for loader in loaders.values():  # warm-up: start workers, build their ViewMakers
        run(loader)(0, None)
    return {k: run(v) for k, v in loaders.items()}, list(loaders.values())


# ---- main ---------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds per comparison (default 7)")
    ap.add_argument("--images", type=int, default=300, help="synthetic JPEGs to generate (default 300)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers to compare with 0 (default 2; 0 skips D)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads in this process (default 1, as a worker)")
    ap.add_argument("--out", help="also write all figures and raw rounds to this JSON file")
    args = ap.parse_args()

    import timm
    import PIL

    torch.set_num_threads(args.threads)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    t_start = time.perf_counter()
    env = {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
           "torch": torch.__version__, "timm": timm.__version__, "pillow": PIL.__version__,
           "numpy": np.__version__, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "rounds": args.rounds, "images": args.images, "batch": BATCH,
           "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    print(f"bench_views: {env}\n")
    res: dict = {"env": env}

    specs = {"tinyvit": AugSpec(img_size=224, **TINYVIT), "tinyvit+mix": AugSpec(img_size=224, **TINYVIT, **MIX)}
    dspecs = {"tinyvit": AugSpec(img_size=32, **TINYVIT), "tinyvit+mix": AugSpec(img_size=32, **TINYVIT, **MIX)}

    with tempfile.TemporaryDirectory(prefix="bench_views_") as tmp:
        t0 = time.perf_counter()
        make_jpeg_folder(Path(tmp), args.images)
        jpeg = open_source(tmp)
        digits = open_source("digits")
        jpeg_bytes = sum(p.stat().st_size for p in Path(tmp).rglob("*.jpg"))
        print(f"data: {len(jpeg)} JPEGs 320x256 q90 ({jpeg_bytes / len(jpeg) / 1024:.0f} KiB avg, "
              f"made in {time.perf_counter() - t0:.1f} s); digits:train {len(digits)} images 8x8\n")

        # decode cost alone, for the breakdown
        dec = interleave({"decode": lambda _r, _b: sum(1 for _ in jpeg.read(range(len(jpeg))))}, [None], 3)
        res["jpeg_decode_ms"] = statistics.median(d["wall_s"] / d["views"] * 1e3 for d in dec["decode"])

        # A
        print("A. replay overhead, same decoded images and spec (views/s, median of rounds; ratios: median of "
              "per-round ratios)\n   plain  = transform (+erase) (+mix with partner) drawing from the global RNGs "
              "as they are\n   reseed = the same, seeding the three global RNGs per view from its PCG64 stream, "
              "no save/restore\n   replay = ViewMaker.base(img, seed) (+ seeded pairing and ViewMaker.mix(.., seed)), "
              "as ViewStream does")
        print(f"   {'images':9s} {'spec':12s} {'plain':>7s} {'reseed':>7s} {'replay':>7s}  {'replay/plain [min, max]':>24s}"
              f" {'reseed/plain':>12s} {'cpu r/p':>7s} {'plain ms':>8s} {'+us/view':>8s}")
        res["A"] = {}
        cases = [("jpeg224", k, specs[k], decoded(jpeg, range(len(jpeg)))) for k in specs]
        cases += [("digits32", k, dspecs[k], decoded(digits, range(len(digits)))) for k in dspecs]
        for name, sname, spec, imgs in cases:
            maker = ViewMaker(spec, 0)
            runs = interleave(overhead_variants(maker, imgs), blocks_of(len(imgs), spec.mix_group), args.rounds,
                              warmup=True)
            s = summarise(runs, "plain", "reseed", "replay")
            s["replay_extra_us_per_view"] = (1 / s["replay"] - 1 / s["plain"]) * 1e6
            res["A"][f"{name}/{sname}"] = s
            rp, sp = s["replay/plain"], s["reseed/plain"]
            print(f"   {name:9s} {sname:12s} {s['plain']:7.0f} {s['reseed']:7.0f} {s['replay']:7.0f}  "
                  f"{rp['median']:9.3f} [{rp['min']:.3f}, {rp['max']:.3f}] {sp['median']:12.3f} {rp['cpu_median']:7.3f} "
                  f"{1e3 / s['plain']:8.2f} {s['replay_extra_us_per_view']:8.0f}")

        # B
        print("\nB. bookkeeping alone, us per view (median over rounds)")
        res["B_us"] = bookkeeping(args.rounds)
        for k, v in res["B_us"].items():
            print(f"   {k:66s} {v:7.1f}")

        # C
        print(f"\nC. full path, one process ({args.threads} torch thread), views/s; stream = ViewStream iterated "
              f"directly (decode once, seeded\n   augment and mix, collate {BATCH}); plain = decode, transform, "
              "erase, collate, timm Mixup in batch mode; units of 64 rows take turns")
        print(f"   {'source':9s} {'spec':12s} {'plain':>7s} {'stream':>7s}  {'stream/plain [min, max]':>24s}"
              f" {'cpu s/p':>7s} {'plain ms':>8s} {'stream ms':>9s}")
        res["C"] = {}
        for name, src, sp in [("jpeg224", jpeg, specs), ("digits32", digits, dspecs)]:
            for sname, spec in sp.items():
                runs = interleave(full_path_variants(src, spec), blocks_of(len(src), spec.mix_group), args.rounds,
                                  warmup=True)
                s = summarise(runs, "plain", "stream")
                res["C"][f"{name}/{sname}"] = s
                q = s["stream/plain"]
                print(f"   {name:9s} {sname:12s} {s['plain']:7.0f} {s['stream']:7.0f}  {q['median']:9.3f} "
                      f"[{q['min']:.3f}, {q['max']:.3f}] {q['cpu_median']:7.3f} {1e3 / s['plain']:8.2f} "
                      f"{1e3 / s['stream']:9.2f}")

        # D
        if args.workers > 0:
            epochs = 2
            print(f"\nD. DataLoader(ViewStream(batch_size={BATCH}), batch_size=None) on jpeg224/tinyvit+mix, "
                  f"{epochs} epochs per pass\n   ({epochs * len(jpeg)} views in units of 64 rows), wall time, "
                  "persistent workers warmed up first")
            variants, loaders = worker_variants(jpeg, specs["tinyvit+mix"], args.workers, epochs)
            a, b = list(variants)
            s = summarise(interleave(variants, [None], args.rounds), a, b)
            res["D"] = s
            q = s[f"{b}/{a}"]
            print(f"   {a}: {s[a]:.0f} views/s   {b}: {s[b]:.0f} views/s   {b}/{a}: {q['median']:.2f} "
                  f"[{q['min']:.2f}, {q['max']:.2f}]")
            del loaders

    res["elapsed_s"] = time.perf_counter() - t_start
    res["env"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"\njpeg decode alone: {res['jpeg_decode_ms']:.2f} ms/image; total {res['elapsed_s']:.0f} s; "
          f"load average (1, 5, 15 min) at start {res['env']['loadavg_start']}, at end {res['env']['loadavg_end']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1, default=float) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
