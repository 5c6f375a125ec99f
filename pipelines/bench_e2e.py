"""Benchmark: `gen-logits` and `train-student` end to end, through the real command line, on
ImageNet-like JPEGs with TinyViT's recipe, default chunk / shard / batch sizes and K=100 of a
>= 10k-class teacher.

What runs (every command is ``python -m tinydistill ...`` in a subprocess, its JSON read back):

  data         16,384 synthetic 500x375 'photos' (JPEG quality 90, ~60 KB each, 100 class
               folders by default), made once with a process pool and kept in --data-dir.
  gen w=N      ``gen-logits --workers N --k 100 --overwrite`` with TinyViT's recipe
               (``--img-size 224 --auto-augment rand-m9-mstd0.5-inc1 --mixup 0.8 --cutmix 1.0``),
               the teacher a seeded random-init timm model with a 10,450-class head saved as a
               state_dict (``--teacher-weights``); chunk, shard and batch sizes left at the
               defaults (4,096 / 65,536 rows, batch 64). Its summary gives views/s (whole command,
               set-up included), the loop's wall time, the busy share of each DataLoader worker
               and of the main process (= the device: it runs the teacher), item rows and items.
  forward t=T  The teacher alone, in this process, with T torch threads (the count gen-logits'
               main process gives itself: cores - workers, at least 1): the same teacher object
               ``load_teacher(...).place(device, amp)`` builds from the same weights, on views
               rendered beforehand by ``Views.render`` and collated into batches of the same size,
               timed per batch as gen-logits runs it: the project's own ``Teacher.topk`` and the
               copy back (``benchlib.forward_ceiling``).
               The ceiling gen-logits would reach if rendering were free.
  offline      ``train-student --logits STORE --workers W`` (the store of the first gen run with
               the most workers): the student trains on the stored top-K.
  no-kd        ``train-student --no-kd --like STORE --workers W``: the same views and batches,
               labels only, no store read. The ceiling offline KD would reach if targets were free.

Rounds: every round runs each gen variant and each forward-only variant once, then offline and
no-KD once each, the order reversed every other round, so the shared machine's drift falls on
all alike. Ratios are per round (variants of the same round), printed as median [min, max] over
rounds: gen w=2 / gen w=1 (scaling with workers), gen / forward-only at the same thread count,
offline / no-KD (target >= 0.97). At the end the stores written with different worker counts
are compared array by array (they must be identical).

Presets, picked by --device (every option can still be overridden):
  cpu   teacher ``test_vit`` (timm's tiny test ViT, 6 blocks of width 64) at 224 px with a
        10,450-class head; student ``test_vit`` with ``patch_size=32`` at 224 px; gen workers 1
        and 2; train workers 2; 1 epoch; 2 rounds. 15 minutes on 2 cores shared with other
        jobs; ``--images 1024 --rounds 1`` is a smoke run of ~2 minutes. ``--classes 10450``
        gives the data as many classes as the teacher, so the no-KD student's head is the
        offline student's size (the same images, hard-linked into 10,450 class folders).
  cuda  teacher ``vit_large_patch14_clip_224`` with a 10,450-class head, student
        ``deit_tiny_patch16_224``, ``--amp bf16``; gen and train workers: cores - 1. Not run yet.

Nothing is downloaded and no timing is asserted.

    .venv/bin/python pipelines/bench_e2e.py [--device cpu|cuda] [--images N] [--rounds R]
        [--data-dir DIR] [--work-dir DIR] [--gen-workers 1,2] [--train-workers W] [--epochs E]
        [--teacher NAME] [--teacher-classes C] [--student NAME] [--k K] [--parts gen,train]
        [--out FILE.json]
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchlib import (alternate, apply_preset, aug_spec, bench_parser, cli_options, environment, finish, fmt_ratio,
                      forward_ceiling, last_json, make_photo_folder, med, placed_teacher, ratio_stats, recipe,
                      run_cli, run_rounds, save_random_model, shares, skipped_without_cuda)

RECIPE = recipe(erasing=False, img_size=224)  # TinyViT's, without random erasing
CORES = os.cpu_count() or 1
PRESETS = {
    "cpu": dict(teacher="test_vit", student="test_vit", student_kwargs="patch_size=32", gen_workers="1,2",
                train_workers=2, amp="none", rounds=2),
    "cuda": dict(teacher="vit_large_patch14_clip_224", student="deit_tiny_patch16_224",
                 student_kwargs="", gen_workers=str(max(1, CORES - 1)), train_workers=max(1, CORES - 1), amp="bf16",
                 rounds=3),
}


def main_threads(workers: int) -> int:
    """The torch thread count gen-logits' main process takes (tinydistill.dist.setup's rule)."""
    if "OMP_NUM_THREADS" in os.environ:
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, CORES - workers) if workers > 0 else torch.get_num_threads()


# ---- the teacher alone -------------------------------------------------------------------------

def forward_only(args, weights: str) -> tuple:
    """The teacher gen-logits builds (the project's own, placed as gen-logits places it) and
    ``--forward-batches`` batches of views rendered beforehand, for :func:`benchlib.forward_ceiling`."""
    from tinydistill.sources import open_source
    from tinydistill.views import Views

    source = open_source(args.data)
    teacher = placed_teacher(args.teacher, weights, args.device, args.amp, args.teacher_input_size,
                             class_names=source.class_names)
    n = min(args.forward_batches * args.batch_size, len(source))
    t0 = time.perf_counter()
    images = Views(source, aug_spec(RECIPE), args.seed).render(0, range(n)).image
    batches = list(images.split(args.batch_size))
    if teacher.device.type == "cuda":
        batches = [b.pin_memory() for b in batches]
    print(f"forward-only: {n} views rendered in this process in {time.perf_counter() - t0:.1f} s, "
          f"batches of {args.batch_size}")
    return teacher, batches


# ---- the commands ------------------------------------------------------------------------------

def gen_cmd(args, weights: str, out: Path, workers: int) -> list[str]:
    cmd = ["gen-logits", "--data", args.data, "--teacher", args.teacher, "--teacher-weights", weights,
           "--teacher-input-size", str(args.teacher_input_size), "--k", str(args.k), "--epochs", str(args.epochs),
           "--out", str(out), "--overwrite", "--workers", str(workers), "--device", args.device, "--amp", args.amp,
           "--seed", str(args.seed), *cli_options(RECIPE)]
    if args.batch_size_opt:
        cmd += ["--batch-size", str(args.batch_size)]
    if args.render:  # default: the CLI's (torch on cuda, pil on cpu)
        cmd += ["--render", args.render]
    return cmd


def run_gen(args, weights: str, workers: int, label: str) -> dict:
    out = args.work / f"gen_w{workers}.zarr"
    stdout, wall = run_cli(gen_cmd(args, weights, out, workers), label=label)
    s = last_json(stdout)
    load = s["load"]
    rec = {"views": s["views"], "seconds": s["seconds"], "cli_wall_s": wall, "views_per_s": s["views_per_s"],
           "loop_views_per_s": s["views"] / load["wall_s"], "main_busy": load["main_busy_share"],
           "worker_busy": load["worker_busy_share"], "worker_views": load["worker_views"],
           "item_rows": s["item_rows"], "items": s["items"], "complete": s["complete"]}
    try:
        from tinydistill import open_store

        rec["threads"] = open_store(str(out)).teacher.get("cpu_threads")
    except Exception:  # only a cross-check of main_threads()
        rec["threads"] = None
    return rec


def run_train(args, mode: str, store: Path, label: str) -> dict:
    out = args.work / f"train_{mode}"
    shutil.rmtree(out, ignore_errors=True)  # metrics.jsonl appends
    cmd = ["train-student", "--data", args.data, "--student", args.student, "--out", str(out),
           "--epochs", str(args.epochs), "--workers", str(args.train_workers), "--device", args.device,
           "--amp", args.amp, "--seed", str(args.seed)]
    cmd += ["--logits", str(store)] if mode == "offline" else ["--no-kd", "--like", str(store)]
    if args.train_batch_size:
        cmd += ["--batch-size", str(args.train_batch_size)]
    for kv in args.student_kwargs.split():
        cmd += ["--model-kwargs", kv]
    _, wall = run_cli(cmd, label=label)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    views, secs = sum(r["views"] for r in rows), sum(r["seconds"] for r in rows)
    load = rows[-1]["load"]
    return {"views": views, "seconds": secs, "cli_wall_s": wall, "views_per_s": views / secs,
            "loop_views_per_s": views / sum(r["load"]["wall_s"] for r in rows),
            "main_busy": load["main_busy_share"], "worker_busy": load["worker_busy_share"],
            "worker_views": load["worker_views"], "steps": rows[-1]["step"], "loss": rows[-1]["train_loss"]}


def same_stores(paths: list[Path]) -> bool | None:
    """Whether stores hold the same top-K log-probs, class ids and seeds (public store API)."""
    from tinydistill import open_store

    if len(paths) < 2:
        return None

    def arrays(st):
        out = []
        for e in range(st.epochs):
            out += [*st.topk(e, slice(0, st.num_rows), order="stored"), st.seeds(e, slice(0, st.num_rows))]
        return out

    ref = arrays(open_store(str(paths[0])))
    return all(all(np.array_equal(a, b, equal_nan=True) for a, b in zip(ref, arrays(open_store(str(p)))))
               for p in paths[1:])


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---- reporting ---------------------------------------------------------------------------------

def ratio_text(s: dict, key: str, vps: dict, num: str, den: str, label: str) -> str:
    """``s[key]``: the per-round ratio of two variants' views/s; returns ``label median [min, max]``."""
    s[key] = ratio_stats(vps[num], vps[den])
    return f"{label} {fmt_ratio(s[key])}"


def per_worker(recs: list[dict]) -> list[float]:
    """Median over rounds of each worker's busy share."""
    cols = [r["worker_busy"] for r in recs if r.get("worker_busy")]
    return [med([c[i] for c in cols]) for i in range(len(cols[0]))] if cols else []


def table(names: list[str], runs: dict, extra) -> list[dict]:
    print(f"{'variant':13s} {'thr':>3s} {'views/s':>8s} {'[min, max]':>15s} {'loop v/s':>8s} {'main busy':>9s} "
          f"{'worker busy':>11s}  {'item rows/items':>15s}  ratio")
    out = []
    for name in names:
        rs = runs[name]
        vps = [r["views_per_s"] for r in rs]
        s = {"name": name, "views_per_s": med(vps), "min": min(vps), "max": max(vps),
             "loop_views_per_s": med([r.get("loop_views_per_s") for r in rs]),
             "main_busy": med([r.get("main_busy") for r in rs]), "worker_busy": per_worker(rs),
             "threads": med([r.get("threads") for r in rs])}
        items = f"{rs[0]['item_rows']}/{rs[0]['items']}" if "item_rows" in rs[0] else "-"
        ratio_txt = extra(name, s)
        thr = f"{int(s['threads'])}" if s["threads"] is not None else "-"
        loop = f"{s['loop_views_per_s']:.0f}" if s["loop_views_per_s"] else "-"
        busy = f"{s['main_busy']:.3f}" if s["main_busy"] is not None else "-"
        span = f"[{s['min']:.0f}, {s['max']:.0f}]"
        print(f"{name:13s} {thr:>3s} {s['views_per_s']:8.1f} {span:>15s} {loop:>8s} {busy:>9s} "
              f"{shares(s['worker_busy']):>11s}  {items:>15s}  {ratio_txt}")
        out.append(s)
    return out


# ---- stages ------------------------------------------------------------------------------------

def work_dir(args):
    """``args.work``: --work-dir, or a temporary directory (returned, to be cleaned up)."""
    if args.work_dir:
        args.work = Path(args.work_dir).resolve()
        args.work.mkdir(parents=True, exist_ok=True)
        return None
    tmp = tempfile.TemporaryDirectory(prefix="bench_e2e_")
    args.work = Path(tmp.name)
    return tmp


def set_up(args, res: dict) -> str:
    """The photos and the random teacher's weights file; prints what runs."""
    info = make_photo_folder(args.data_dir, args.images, classes=args.classes, seed=args.seed)
    args.data = args.data_dir
    print(f"data: {args.images} JPEGs {info['size'][0]}x{info['size'][1]} in {args.classes} classes at {args.data}, "
          f"mean {info['mean_kb']:.1f} KB" + (" (cached)" if info["cached"] else
                                                f", made in {info['seconds']:.0f} s"
                                                + (f" (hard links to {info['linked_from']})" if "linked_from" in info else "")))
    weights = str(args.work / "teacher.pth")
    t_params = save_random_model(args.teacher, args.teacher_classes, weights, seed=args.seed)
    print(f"teacher: {args.teacher}, random init, {args.teacher_classes} classes, {t_params / 1e6:.2f} M params, "
          f"{args.teacher_input_size} px; K={args.k}; student: {args.student} {args.student_kwargs}, random init, "
          f"224 px\n"
          f"recipe: {' '.join(cli_options(RECIPE))}; chunk/shard rows: defaults; gen batch "
          f"{args.batch_size_opt or 'default (64)'}, train batch {args.train_batch_size or 'default (128)'}; "
          f"device {args.device}, amp {args.amp}; gen workers {args.gen_list}, train workers {args.train_workers}; "
          f"{args.epochs} epoch(s) per run, {args.rounds} round(s)")
    res["teacher_params"] = t_params
    return weights


def variants(args, weights: str) -> tuple[dict, list[str], list[str]]:
    """name -> one measurement (forward-only per thread count, gen per worker count, offline and
    no-KD training), and the gen-side and train-side names."""
    out: dict = {}
    if "gen" in args.part_list:
        teacher, batches = forward_only(args, weights)
        for t in sorted({main_threads(w) for w in args.gen_list}) if args.device == "cpu" else [None]:
            out[f"forward t={t}" if t else "forward"] = (
                lambda r, i, t=t: {**forward_ceiling(teacher, batches, args.k, t, args.forward_seconds, warm=1),
                                   "threads": t or torch.get_num_threads()})
        for w in args.gen_list:
            out[f"gen w={w}"] = lambda r, i, w=w: run_gen(args, weights, w, f"round {r + 1}/{args.rounds} gen w={w}")
    gen_names = list(out)
    store = args.work / f"gen_w{max(args.gen_list)}.zarr"
    if "gen" not in args.part_list:  # the store offline KD reads: one gen run, not measured
        print("store for training: one gen-logits run (not part of the figures)")
        run_gen(args, weights, max(args.gen_list), "store")
    if "train" in args.part_list:
        for m in ("offline", "no-kd"):
            out[m] = lambda r, i, m=m: run_train(args, m, store, f"round {r + 1}/{args.rounds} {m}")
    return out, gen_names, [n for n in out if n not in gen_names]


def measure(args, weights: str, res: dict) -> tuple[dict, list[str], list[str]]:
    fns, gen_names, train_names = variants(args, weights)
    runs = run_rounds(fns, args.rounds, lambda r: alternate(gen_names, r) + alternate(train_names, r),
                      digits=1, each=True)
    res["runs"] = runs
    if len(args.gen_list) > 1 and "gen" in args.part_list:
        res["stores_identical"] = same_stores([args.work / f"gen_w{w}.zarr" for w in args.gen_list])
    store = args.work / f"gen_w{max(args.gen_list)}.zarr"
    if store.exists():
        res["store_bytes"] = du(store)
    return runs, gen_names, train_names


def summarise(args, runs: dict, res: dict, gen_names: list[str], train_names: list[str]) -> dict:
    vps = {n: [r["views_per_s"] for r in runs[n]] for n in runs}
    summ: dict = {}
    print(f"\nmedian over {args.rounds} round(s) [min, max]; views/s: the command's own figure (gen: its summary, set-up "
          "included; train: metrics.jsonl views / seconds);\nloop v/s: views / the loop's wall time (load.wall_s); "
          "main busy: 1 - the share of the loop the main process waited for data (it runs the model: the device "
          "proxy);\nworker busy: each DataLoader worker's busy seconds / loop wall; thr: torch threads of the "
          "process running the model")
    if gen_names:
        print(f"\ngen-logits ({args.images} images x {args.epochs} epoch(s), K={args.k}):")
        fwd_name = {w: (f"forward t={main_threads(w)}" if args.device == "cpu" else "forward") for w in args.gen_list}
        w0 = min(args.gen_list)

        def gen_extra(name, s):
            if not name.startswith("gen"):
                return ""
            w = int(name.split("=")[1])
            txt = ratio_text(s, "vs_forward", vps, name, fwd_name[w], f"/ {fwd_name[w]}")
            return txt + (f"; {ratio_text(s, 'vs_w0', vps, name, f'gen w={w0}', f'/ gen w={w0}')}" if w != w0 else "")

        summ["gen"] = table(gen_names, runs, gen_extra)
        if "stores_identical" in res:
            print(f"stores written with workers {args.gen_list}: "
                  f"{'identical' if res['stores_identical'] else 'DIFFERENT'} (top-K log-probs, class ids, seeds)")
    if train_names:
        print(f"\ntrain-student ({args.student}, {args.train_workers} workers, {args.epochs} epoch(s) per run):")

        summ["train"] = table(train_names, runs, lambda name, s: "" if name != "offline" else ratio_text(
            s, "vs_no_kd", vps, "offline", "no-kd", "offline / no-KD") + " (target >= 0.97)")
    if "store_bytes" in res:
        print(f"\nstore: {res['store_bytes'] / 2**20:.1f} MiB on disk, "
              f"{res['store_bytes'] / (args.images * args.epochs):.1f} bytes per view")
    return summ


# ---- main --------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = bench_parser(__doc__)
    ap.add_argument("--device", choices=sorted(PRESETS), default="cpu", help="cpu (default) or cuda; picks the preset")
    ap.add_argument("--images", type=int, default=16384, help="JPEGs in the data set (default 16384)")
    ap.add_argument("--classes", type=int, default=100, help="class folders of the data set")
    ap.add_argument("--data-dir", help="where the data set is made and kept "
                    "(default /tmp/tinydistill-bench/in16k, or .../photos-N for another --images)")
    ap.add_argument("--work-dir", help="stores and training runs (default: a temporary directory, removed)")
    ap.add_argument("--teacher", help="timm model, random init")
    ap.add_argument("--teacher-classes", type=int, default=10450, help="teacher head size (default 10450)")
    ap.add_argument("--teacher-input-size", type=int, default=224)
    ap.add_argument("--student", help="timm model, random init")
    ap.add_argument("--student-kwargs", help="space-separated KEY=VALUE for --model-kwargs (cpu: patch_size=32)")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=1, help="epochs of views stored and trained per run")
    ap.add_argument("--gen-workers", help="comma-separated gen-logits worker counts")
    ap.add_argument("--train-workers", type=int, help="train-student workers (offline and no-KD alike)")
    ap.add_argument("--batch-size", type=int, help="gen-logits batch (default: the CLI's, 64)")
    ap.add_argument("--train-batch-size", type=int, help="train-student batch (default: the CLI's, 128)")
    ap.add_argument("--amp", choices=["none", "bf16", "fp16"])
    ap.add_argument("--render", choices=["pil", "torch"],
                    help="renderer of gen-logits (training replays the store's) [default: the CLI's: torch on cuda]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, help="default: 2 on cpu, 3 on cuda")
    ap.add_argument("--parts", default="gen,train", help="gen, train or both (train needs a store: gen runs once)")
    ap.add_argument("--forward-batches", type=int, default=8, help="batches rendered for the forward-only pass")
    ap.add_argument("--forward-seconds", type=float, default=10.0, help="time per forward-only measurement")
    ap.add_argument("--out", help="also write figures and raw rounds to this JSON file")
    args = ap.parse_args(argv)
    apply_preset(args, PRESETS[args.device])
    args.batch_size_opt = args.batch_size
    args.batch_size = args.batch_size or 64
    args.gen_list = [int(w) for w in str(args.gen_workers).split(",") if w.strip()]
    args.part_list = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not args.part_list <= {"gen", "train"} or not args.part_list:
        ap.error("--parts: gen, train or gen,train")
    if args.data_dir is None:
        name = "in16k" if args.images == 16384 and args.classes == 100 else f"photos-{args.images}-{args.classes}"
        args.data_dir = f"/tmp/tinydistill-bench/{name}"
    args.data_dir = str(Path(args.data_dir).resolve())
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    env = environment()
    print(f"bench_e2e: {env}")
    res: dict = {"env": env, "config": {k: str(v) if isinstance(v, (set, Path)) else v for k, v in vars(args).items()}}
    if skipped_without_cuda(args.device, res, args.out, where="here"):
        return 0
    t_start = time.perf_counter()
    tmp = work_dir(args)
    try:
        weights = set_up(args, res)
        runs, gen_names, train_names = measure(args, weights, res)
    finally:
        if tmp is not None:
            tmp.cleanup()
    finish(res, env, t_start, args.out, summarise(args, runs, res, gen_names, train_names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
