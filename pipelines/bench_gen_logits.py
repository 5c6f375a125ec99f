"""Benchmark: how close `gen-logits` end to end comes to the teacher's own forward throughput.

Measured side by side in one run, variants interleaved over several rounds (the order reversed
every other round) so that drift and noisy neighbours on a shared machine hit all of them alike;
ratios are per-round ratios (variant / forward-only of the same round), reported as the median
over rounds with [min, max].

  forward   The teacher alone. The views are rendered once beforehand, exactly as gen-logits
            cuts them (``ViewStream(Views(...), gen_plan(...).items)``: same spec, seed, epochs, batch size),
            and held in memory as collated batches. Timed: for each batch, the project's own
            ``Teacher.topk(batch, K)`` (host-to-device copy, the teacher's resize + normalise,
            the model under ``torch.inference_mode`` and autocast when ``--amp`` is set,
            ``log_softmax(...).topk(K)``) and ``.cpu().numpy()`` of its outputs
            (``benchlib.forward_ceiling``). Same teacher as gen-logits loads
            (``load_teacher(...).place(device, amp)`` with the same weights file: channels_last on CUDA).
  gen w=N   ``tinydistill.generate.gen_logits(GenConfig(...))`` on the same data, teacher and
            spec, with ``workers=N`` DataLoader workers, into a fresh store in a temporary
            directory: views rendered by the workers (or inline for N=0), top-K, shard buffers,
            background shard writer, store creation and replay canary, teacher loading.

Each gen-logits run gives three rates:
  e2e     views / wall time of the whole ``gen_logits()`` call (what a user sees; includes the
          fixed set-up: source, teacher build + weights digest, store creation, canary);
  loop    views / the loop's wall time as gen_logits reports it (``load.wall_s``: from starting
          the DataLoader to the last shard written; no teacher loading or store creation);
  steady  views after the first batch / time between the first and the last batch, from the
          ``on_step`` callback gen_logits calls after every teacher batch. Also reported: CPU seconds per view
(this process + reaped DataLoader workers), and, on the CPU, a "CPU budget" ceiling for the
ratio: min(1, C / (forward views/s x (forward + render CPU s per view))), what the ratio could
be if the teacher and the rendering shared C cores perfectly, for C = all cores and for C = the
cores the forward-only pass actually kept busy (less than all when other jobs share them).

Threads. On the CPU, gen-logits sets this process's torch intra-op threads itself (at the time
of writing: max(1, cores - workers) when ``OMP_NUM_THREADS`` is unset, so that each DataLoader
worker keeps a core). Each run records the thread count its loop ran with ("thr"), and for every
such count M other than this process's own, a "forward t=M" variant (the forward-only pass at M
threads) joins the rounds, so each gen-logits run is also compared with the teacher alone at the
thread count it actually had ("fwd same thr") and with the faster forward-only pass of the round
("best fwd", the strictest reference). The benchmark restores its own thread count
after each gen-logits call. The OpenMP environment (``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY``) and
the load average are recorded.

Presets (every option below can still be overridden):
  cpu (default)  random-init timm resnet18, 1000 classes, input 96 px; built-in ``digits``
                 (1438 images) rendered at 32 px with TinyViT's recipe (RandAugment m9, jitter
                 0.4, random erasing 0.25, mixup 0.8 / cutmix 1.0); K=10, batch 64, 1 epoch,
                 shards of 256 rows (6 shards), workers 0,1,2, 3 rounds. About 1.5 minutes on 2
                 idle cores, 3-4 minutes when other jobs share them (the teacher is ~90 % of
                 the CPU work: ~5 ms per view against ~0.5 ms to render it).
  gpu            random-init vit_large_patch14_clip_224 (1000 classes), input 224, bf16 AMP on
                 ``cuda``; 4096 synthetic 320x256 JPEGs (an ImageFolder in a temp dir) rendered
                 at 224 px with the same recipe; K=10, batch 256, shards of 256 rows, workers
                 0,4,8 and cores-1, 2 rounds. Skipped, with a message, when CUDA is not available.
                 Each gen-logits call rebuilds the 304 M-parameter teacher twice and hashes its
                 1.2 GB weights file (``load_teacher``), so read the loop column there.

Teachers are random-init (``pretrained=False``, seeded) and saved with
``torch.save(model.state_dict())`` to a temp file passed as the teacher weights, as the tests do:
nothing is downloaded. No timing is asserted.

    .venv/bin/python pipelines/bench_gen_logits.py [--preset cpu|gpu] [--rounds R] [--workers 0,1,2]
        [--teacher NAME] [--num-classes C] [--input-size PX] [--data digits|synthetic-jpeg|SRC]
        [--images N] [--img-size PX] [--batch-size B] [--epochs E] [--shard-rows N] [--device cpu|cuda]
        [--amp none|bf16|fp16] [--threads T] [--out FILE.json]
    .venv/bin/python pipelines/bench_gen_logits.py --preset gpu     # on a machine with CUDA
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch

from benchlib import (apply_preset, begin, bench_parser, cpu_seconds, finish, fmt_ratio,
                      forward_ceiling, gen_config, in_process_options, med, placed_teacher, ratio_stats,
                      run_rounds, save_random_model, StepClock, workspace)
from tinydistill.generate import gen_logits
from tinydistill.sources import open_source
from tinydistill.stream import ViewStream, gen_plan
from tinydistill.views import Views

PRESETS = {
    "cpu": dict(teacher="resnet18", num_classes=1000, input_size=96, data="digits", images=0, img_size=32,
                batch_size=64, epochs=1, shard_rows=256, mix_group=64, workers="0,1,2", device="cpu",
                amp="none", rounds=3),
    "gpu": dict(teacher="vit_large_patch14_clip_224", num_classes=1000, input_size=224, data="synthetic-jpeg",
                images=4096, img_size=224, batch_size=256, epochs=1, shard_rows=256, mix_group=64,
                workers=None, device="cuda", amp="bf16", rounds=2),
}


def parse_args(argv=None):
    ap = bench_parser(__doc__, PRESETS)
    ap.add_argument("--teacher", help="timm model name (random init, no download)")
    ap.add_argument("--num-classes", type=int, help="teacher head size")
    ap.add_argument("--input-size", type=int, help="teacher input size (prepare() resizes views to it)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--epochs", type=int, help="epochs of views per measurement")
    ap.add_argument("--shard-rows", type=int, help="chunk_rows = shard_rows of the store (work items are cut by gen_plan)")
    ap.add_argument("--workers", help="comma-separated DataLoader worker counts for gen-logits")
    in_process_options(ap)
    args = ap.parse_args(argv)
    apply_preset(args, PRESETS[args.preset])
    if args.workers is None:  # gpu preset: scale with the machine
        cores = os.cpu_count() or 1
        args.workers = ",".join(str(w) for w in sorted({0, min(4, cores), min(8, cores), max(cores - 1, 1)}))
    args.worker_counts = [int(w) for w in str(args.workers).split(",") if w.strip() != ""]
    return args


# ---- the two measurements ------------------------------------------------------------------------

def render_batches(source, spec, args, pin: bool) -> tuple[list[torch.Tensor], dict]:
    """The views gen-logits will see, cut into the same batches, rendered once in this process
    with one torch thread (as a DataLoader worker runs). Returns the image batches and timing."""
    n, shard = len(source), args.shard_rows
    todo = [(e, s) for e in range(args.epochs) for s in range(-(-n // shard))]
    plan = gen_plan(todo, lambda s: (s * shard, min((s + 1) * shard, n)), n, spec.mix_group, args.batch_size,
                    workers=1, world=1, rank=0)
    stream = ViewStream(Views(source, spec, args.seed), plan.items)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.collect()
    c0, t0 = cpu_seconds(), time.perf_counter()
    batches = [b.image for b in stream]
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    torch.set_num_threads(threads)
    if pin:
        batches = [b.pin_memory() for b in batches]
    views = sum(len(b) for b in batches)
    return batches, {"views": views, "wall_s": wall, "cpu_s": cpu, "views_per_s": views / wall,
                     "cpu_s_per_view": cpu / views}


def run_gen(args, data: str, weights: str, tmp: Path, workers: int, spec, tag: str) -> dict:
    """One gen_logits() call into a fresh store. gen_logits may change this process's torch
    thread count (on the CPU it leaves cores to the workers); it is restored afterwards."""
    import shutil

    out = tmp / f"store_{tag}_w{workers}.zarr"
    cfg = gen_config(data, args.teacher, weights, str(out), spec, args.shard_rows, k=args.k, epochs=(0, args.epochs),
                     teacher_input_size=args.input_size, seed=args.seed, batch_size=args.batch_size,
                     workers=workers, device=args.device, amp=args.amp)
    clock = StepClock()
    before = torch.get_num_threads()
    gc.collect()
    c0, t0 = cpu_seconds(), time.perf_counter()
    try:
        summary = gen_logits(cfg, on_step=clock)
    finally:
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        torch.set_num_threads(before)
    views = summary["views"]
    rec = {"views": views, "wall_s": wall, "cpu_s": cpu, "views_per_s": views / wall,
           "summary_views_per_s": summary.get("views_per_s"), "complete": summary.get("complete")}
    load = summary.get("load") or {}
    if load.get("wall_s"):
        rec["loop_s"] = load["wall_s"]
        rec["loop_views_per_s"] = views / rec["loop_s"]
        rec["setup_s"] = wall - rec["loop_s"]
        rec["main_busy"], rec["worker_busy"] = load.get("main_busy_share"), load.get("worker_busy_share")
        rec["item_rows"], rec["items"] = summary.get("item_rows"), summary.get("items")
    rec["threads"] = clock.threads
    if clock.steady_views_per_s() is not None:
        rec["steady_views_per_s"] = clock.steady_views_per_s()
    shutil.rmtree(out, ignore_errors=True)
    return rec


# ---- stages --------------------------------------------------------------------------------------

def set_up(args, data: str, spec, tmp: Path, res: dict):
    """The random teacher (saved, then placed as gen-logits places it) and the rendered batches."""
    source = open_source(data)
    weights = tmp / "teacher.pth"
    t0 = time.perf_counter()
    save_random_model(args.teacher, args.num_classes, weights)
    secs = time.perf_counter() - t0
    print(f"teacher: {args.teacher} random init, {args.num_classes} classes, "
          f"{weights.stat().st_size / 2**20:.0f} MiB state_dict (built + saved in {secs:.1f} s)")
    device = torch.device(args.device)
    teacher = placed_teacher(args.teacher, str(weights), device, args.amp, args.input_size,
                             class_names=source.class_names)
    nparams = sum(p.numel() for p in teacher.model.parameters())
    print(f"         {nparams / 1e6:.1f} M params, input {teacher.input_size} px ({teacher.interpolation}), "
          f"device {device}, amp {args.amp}")
    batches, render = render_batches(source, spec, args, pin=device.type == "cuda")
    res["render"] = render
    print(f"views: {source.name} ({len(source)} images) x {args.epochs} epoch(s) = {render['views']} views "
          f"rendered at {args.img_size} px ({args.recipe} recipe), {len(batches)} batches of <= "
          f"{args.batch_size}, shards of {args.shard_rows} rows\n"
          f"       rendering alone, 1 process, 1 torch thread: {render['views_per_s']:.0f} views/s "
          f"({render['cpu_s_per_view'] * 1e3:.2f} ms CPU per view)")
    return teacher, str(weights), batches


def warm_up(args, teacher, batches, data: str, weights: str, tmp: Path, spec, res: dict) -> dict:
    """The teacher on a few batches, and small gen-logits runs (imports, zarr, caches, worker
    start-up), which also tell the thread count gen-logits gives the teacher per worker count."""
    forward_ceiling(teacher, batches[:2], args.k)
    warm_data = "digits:val" if data.startswith("digits") else data
    warm_args = argparse.Namespace(**{**vars(args), "epochs": 1})
    warm_counts = args.worker_counts if args.device == "cpu" else [max(args.worker_counts + [0])]
    gen_threads = {}
    t0 = time.perf_counter()
    for w in warm_counts:
        gen_threads[w] = run_gen(warm_args, warm_data, weights, tmp, w, spec, "warmup").get("threads")
    print(f"warm-up gen-logits on {warm_data}, workers {warm_counts}: {time.perf_counter() - t0:.1f} s; "
          f"teacher threads in gen-logits per worker count: {gen_threads} (this process: {torch.get_num_threads()})\n")
    res["gen_threads_warmup"] = gen_threads
    return gen_threads


def variants(args, teacher, batches, gen_threads: dict, data: str, weights: str, tmp: Path, spec) -> dict:
    """name -> one measurement: forward-only at this process's threads (and, on the CPU, at each
    thread count gen-logits gave the teacher), then gen-logits per worker count."""
    out = {"forward": lambda r, i: forward_ceiling(teacher, batches, args.k)}
    if args.device == "cpu":
        for t_w in sorted({t for t in gen_threads.values() if t} - {torch.get_num_threads()}):
            out[f"forward t={t_w}"] = lambda r, i, t_w=t_w: forward_ceiling(teacher, batches, args.k, threads=t_w)
    for w in args.worker_counts:
        out[f"gen w={w}"] = lambda r, i, w=w: run_gen(args, data, weights, tmp, w, spec, "run")
    return out


# ---- reporting -----------------------------------------------------------------------------------

def fmt(x, spec=".0f", width=7):
    return f"{x:{width}{spec}}" if x is not None else f"{'-':>{width}s}"


def cpu_budget(args, fw_vps: list, fw_cpu: float, render: dict) -> dict:
    """On the CPU: the ceiling of the ratio if teacher and rendering shared all cores (or only
    those the forward-only pass kept busy) perfectly."""
    cores = os.cpu_count() or 1
    ceiling = ceiling_used = used = None
    if args.device == "cpu":
        r_cpu = render["cpu_s_per_view"]
        ceiling = min(1.0, cores / (med(fw_vps) * (fw_cpu + r_cpu)))
        used = med(fw_vps) * fw_cpu  # cores the forward-only pass actually kept busy
        ceiling_used = min(1.0, used / (med(fw_vps) * (fw_cpu + r_cpu)))
    return {"forward_views_per_s": med(fw_vps), "forward_cpu_s_per_view": fw_cpu,
            "render_cpu_s_per_view": render["cpu_s_per_view"], "cpu_budget_ceiling": ceiling,
            "forward_cores_used": used, "cpu_budget_ceiling_forward_cores": ceiling_used,
            "main_threads": torch.get_num_threads()}


def variant_row(name: str, rs: list[dict], main_threads: int, fw_vps: list, fw_by_threads: dict, fw_best: list) -> dict:
    e2e = [x["views_per_s"] for x in rs]
    loop = [x.get("loop_views_per_s") for x in rs]
    steady = [x.get("steady_views_per_s") for x in rs]
    if name.startswith("forward"):
        thr = int(name.split("=")[1]) if "=" in name else main_threads
    else:
        thr = med([x.get("threads") for x in rs])
        thr = int(thr) if thr is not None else None
    s = {"threads": thr, "e2e_views_per_s": med(e2e), "loop_views_per_s": med(loop),
         "steady_views_per_s": med(steady), "setup_s": med([x.get("setup_s") for x in rs]),
         "cpu_s_per_view": med([x["cpu_s"] / x["views"] for x in rs])}
    if name != "forward":
        s.update({"e2e/forward": ratio_stats(e2e, fw_vps), "loop/forward": ratio_stats(loop, fw_vps),
                  "steady/forward": ratio_stats(steady, fw_vps)})
    if name.startswith("gen") and thr in fw_by_threads:
        s["e2e/forward_same_threads"] = ratio_stats(e2e, fw_by_threads[thr])
    if name.startswith("gen"):
        s["e2e/best_forward"] = ratio_stats(e2e, fw_best)
        s["loop/best_forward"] = ratio_stats(loop, fw_best)
    return s


def summarise(args, rounds: dict, render: dict) -> dict:
    fw_vps = [x["views_per_s"] for x in rounds["forward"]]
    fw_cpu = med([x["cpu_s"] / x["views"] for x in rounds["forward"]])
    summ = cpu_budget(args, fw_vps, fw_cpu, render)
    main_threads = torch.get_num_threads()
    fw_by_threads = {main_threads: fw_vps}
    for name in rounds:
        if name.startswith("forward t="):
            fw_by_threads[int(name.split("=")[1])] = [x["views_per_s"] for x in rounds[name]]
    fw_best = [max(v[r] for v in fw_by_threads.values()) for r in range(len(fw_vps))]
    print(f"\nmedian over {args.rounds} rounds; ratios: median over rounds of (variant / forward-only of the same "
          f"round) [min, max].\nthr = torch threads the teacher ran with; 'forward' uses this process's {main_threads}; "
          "'fwd same thr': the forward-only pass at the same\nthread count; 'best fwd': the faster forward-only "
          "pass of the round, whatever its thread count")
    print(f"{'variant':11s} {'thr':>3s} {'e2e/s':>6s} {'loop/s':>6s} {'stdy/s':>6s} {'setup':>5s} {'cpu ms/v':>8s}  "
          f"{'e2e / forward':>20s}  {'loop / forward':>20s}  {'e2e / fwd same thr':>20s}  {'e2e / best fwd':>20s}")
    for name, rs in rounds.items():
        summ[name] = s = variant_row(name, rs, main_threads, fw_vps, fw_by_threads, fw_best)
        print(f"{name:11s} {fmt(s['threads'], 'd', 3)} {fmt(s['e2e_views_per_s'], width=6)} "
              f"{fmt(s['loop_views_per_s'], width=6)} {fmt(s['steady_views_per_s'], width=6)} "
              f"{fmt(s['setup_s'], '.1f', 5)} {fmt(s['cpu_s_per_view'] * 1e3, '.2f', 8)}  "
              f"{fmt_ratio(s.get('e2e/forward'), 3, 2):>20s}  {fmt_ratio(s.get('loop/forward'), 3, 2):>20s}  "
              f"{fmt_ratio(s.get('e2e/forward_same_threads'), 3, 2):>20s}  "
              f"{fmt_ratio(s.get('e2e/best_forward'), 3, 2):>20s}")
    if summ["cpu_budget_ceiling"] is not None:
        print(f"\nCPU budget: forward {fw_cpu * 1e3:.2f} ms CPU/view at {med(fw_vps):.0f} views/s (= "
              f"{summ['forward_cores_used']:.2f} cores busy), rendering {render['cpu_s_per_view'] * 1e3:.2f} ms "
              f"CPU/view. Ceiling of the ratio if teacher and rendering shared the CPU perfectly: "
              f"{summ['cpu_budget_ceiling']:.3f} with all {os.cpu_count() or 1} cores, "
              f"{summ['cpu_budget_ceiling_forward_cores']:.3f} with only the {summ['forward_cores_used']:.2f} "
              "cores the forward-only pass got")
    return summ


# ---- main ----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    env, res, spec, t_start = begin("bench_gen_logits", args,
                                    f"--device cuda (preset {args.preset}, teacher {args.teacher})")
    with workspace("bench_gen_logits_", args) as (tmp, data):
        teacher, weights, batches = set_up(args, data, spec, tmp, res)
        gen_threads = warm_up(args, teacher, batches, data, weights, tmp, spec, res)
        res["rounds"] = rounds = run_rounds(variants(args, teacher, batches, gen_threads, data, weights, tmp, spec),
                                            args.rounds)
    finish(res, env, t_start, args.out, summarise(args, rounds, res["render"]), minutes=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
