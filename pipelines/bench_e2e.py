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
               ``load_teacher`` builds from the same weights, on views rendered beforehand by
               ``Views.render`` and collated into batches of the same size, timed per batch as
               gen-logits runs it (``prepare``, the model, ``log_softmax().topk(K)``, copy back).
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

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchlib import (environment, finish, fmt_ratio, last_json, loadavg, make_photo_folder, med, ratio_stats,
                      run_cli, save_random_model, shares, write_json)

RECIPE = dict(img_size=224, auto_augment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0)
CORES = os.cpu_count() or 1
PRESETS = {
    "cpu": dict(teacher="test_vit", student="test_vit", student_kwargs="patch_size=32", gen_workers="1,2",
                train_workers=2, amp="none", rounds=2),
    "cuda": dict(teacher="vit_large_patch14_clip_224", student="deit_tiny_patch16_224",
                 student_kwargs="", gen_workers=str(max(1, CORES - 1)), train_workers=max(1, CORES - 1), amp="bf16",
                 rounds=3),
}


def recipe_options() -> list[str]:
    out = []
    for k, v in RECIPE.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def main_threads(workers: int) -> int:
    """The torch thread count gen-logits' main process takes (tinydistill.dist.setup's rule)."""
    if "OMP_NUM_THREADS" in os.environ:
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, CORES - workers) if workers > 0 else torch.get_num_threads()


# ---- the teacher alone -------------------------------------------------------------------------

class ForwardOnly:
    """The teacher's per-batch work in gen-logits, on views rendered beforehand."""

    def __init__(self, args, weights: str, batches: int):
        from torch.utils.data import default_collate

        from tinydistill.augment import AugSpec
        from tinydistill.sources import open_source
        from tinydistill.teachers import load_teacher
        from tinydistill.views import Views

        source = open_source(args.data)
        self.teacher = load_teacher(args.teacher, weights, class_names=source.class_names)
        self.teacher.input_size = args.teacher_input_size
        self.device = torch.device(args.device)
        self.model = self.teacher.model.to(self.device).eval()
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
        self.k = args.k
        n = min(batches * args.batch_size, len(source))
        t0 = time.perf_counter()
        views = Views(source, AugSpec(**RECIPE), args.seed).render(0, range(n))
        self.batches = [default_collate(views[i:i + args.batch_size])["image"] for i in range(0, n, args.batch_size)]
        if self.device.type == "cuda":
            self.batches = [b.pin_memory() for b in self.batches]
        self.render_s = time.perf_counter() - t0
        self.views = n

    def _pass(self) -> int:
        from tinydistill.views import prepare

        t, dev, n = self.teacher, self.device, 0
        with torch.inference_mode():
            for images in self.batches:
                x = prepare(images.to(dev, non_blocking=True), t.input_size, t.mean, t.std, t.interpolation)
                if dev.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(dev.type, dtype=self.amp, enabled=self.amp is not None):
                    logits = self.model(x)
                logp, idx = torch.log_softmax(logits.float(), dim=-1).topk(self.k, dim=-1)
                logp.cpu().numpy(), idx.cpu().numpy()
                n += len(images)
        return n

    def run(self, threads: int | None, min_s: float) -> dict:
        before = torch.get_num_threads()
        if threads and self.device.type == "cpu":
            torch.set_num_threads(threads)
        try:
            self._pass_batches(1)  # warm this thread count's kernels
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < min_s:
                n += self._pass()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        finally:
            torch.set_num_threads(before)
        return {"views": n, "wall_s": wall, "views_per_s": n / wall}

    def _pass_batches(self, k: int) -> None:
        keep, self.batches = self.batches, self.batches[:k]
        try:
            self._pass()
        finally:
            self.batches = keep


# ---- the commands ------------------------------------------------------------------------------

def gen_cmd(args, weights: str, out: Path, workers: int) -> list[str]:
    cmd = ["gen-logits", "--data", args.data, "--teacher", args.teacher, "--teacher-weights", weights,
           "--teacher-input-size", str(args.teacher_input_size), "--k", str(args.k), "--epochs", str(args.epochs),
           "--out", str(out), "--overwrite", "--workers", str(workers), "--device", args.device, "--amp", args.amp,
           "--seed", str(args.seed), *recipe_options()]
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
        from tinydistill.store import open_store

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
    from tinydistill.store import open_store

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


# ---- main --------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
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
    for k, v in PRESETS[args.device].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
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
    env = environment(loadavg_at_start=loadavg())
    print(f"bench_e2e: {env}")
    res: dict = {"env": env, "config": {k: str(v) if isinstance(v, (set, Path)) else v for k, v in vars(args).items()}}
    if args.device == "cuda" and not torch.cuda.is_available():
        msg = "skipped: --device cuda asked for, but torch.cuda.is_available() is False here; nothing was measured"
        print(msg)
        res["skipped"] = msg
        write_json(args.out, res)
        return 0
    t_start = time.perf_counter()
    tmp = None
    if args.work_dir:
        args.work = Path(args.work_dir).resolve()
        args.work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_e2e_")
        args.work = Path(tmp.name)
    try:
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
              f"recipe: {' '.join(recipe_options())}; chunk/shard rows: defaults; gen batch "
              f"{args.batch_size_opt or 'default (64)'}, train batch {args.train_batch_size or 'default (128)'}; "
              f"device {args.device}, amp {args.amp}; gen workers {args.gen_list}, train workers {args.train_workers}; "
              f"{args.epochs} epoch(s) per run, {args.rounds} round(s)")
        res["teacher_params"] = t_params

        gen_names, fwd = [], None
        thr_of = {w: main_threads(w) for w in args.gen_list}
        fwd_thr = sorted(set(thr_of.values())) if args.device == "cpu" else [None]
        if "gen" in args.part_list:
            fwd = ForwardOnly(args, weights, args.forward_batches)
            print(f"forward-only: {fwd.views} views rendered in this process in {fwd.render_s:.1f} s, "
                  f"batches of {args.batch_size}")
            gen_names = [f"forward t={t}" if t else "forward" for t in fwd_thr] + [f"gen w={w}" for w in args.gen_list]
        train_names = ["offline", "no-kd"] if "train" in args.part_list else []
        store = args.work / f"gen_w{max(args.gen_list)}.zarr"
        if "gen" not in args.part_list:  # the store offline KD reads: one gen run, not measured
            print("store for training: one gen-logits run (not part of the figures)")
            run_gen(args, weights, max(args.gen_list), "store")
        runs: dict[str, list[dict]] = {n: [] for n in gen_names + train_names}
        for r in range(args.rounds):
            order = (gen_names if r % 2 == 0 else gen_names[::-1]) + (train_names if r % 2 == 0 else train_names[::-1])
            line = []
            for name in order:
                label = f"round {r + 1}/{args.rounds} {name}"
                t0 = time.perf_counter()
                if name.startswith("forward"):
                    rec = fwd.run(int(name.split("=")[1]) if "=" in name else None, args.forward_seconds)
                    rec["threads"] = int(name.split("=")[1]) if "=" in name else torch.get_num_threads()
                elif name.startswith("gen"):
                    rec = run_gen(args, weights, int(name.split("=")[1]), label)
                else:
                    rec = run_train(args, name, store, label)
                rec.update(round=r, loadavg=loadavg())
                runs[name].append(rec)
                line.append(f"{name} {rec['views_per_s']:.1f}")
                print(f"  {label}: {rec['views_per_s']:.1f} views/s ({time.perf_counter() - t0:.0f} s)", flush=True)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(line) + " views/s", flush=True)
        res["runs"] = runs
        if len(args.gen_list) > 1 and "gen" in args.part_list:
            res["stores_identical"] = same_stores([args.work / f"gen_w{w}.zarr" for w in args.gen_list])
        if store.exists():
            res["store_bytes"] = du(store)
    finally:
        if tmp is not None:
            tmp.cleanup()

    # ---- summary
    vps = {n: [r["views_per_s"] for r in runs[n]] for n in runs}
    summ: dict = {}
    print(f"\nmedian over {args.rounds} round(s) [min, max]; views/s: the command's own figure (gen: its summary, set-up "
          "included; train: metrics.jsonl views / seconds);\nloop v/s: views / the loop's wall time (load.wall_s); "
          "main busy: 1 - the share of the loop the main process waited for data (it runs the model: the device "
          "proxy);\nworker busy: each DataLoader worker's busy seconds / loop wall; thr: torch threads of the "
          "process running the model")
    if gen_names:
        print(f"\ngen-logits ({args.images} images x {args.epochs} epoch(s), K={args.k}):")
        fwd_name = {w: (f"forward t={thr_of[w]}" if args.device == "cpu" else "forward") for w in args.gen_list}
        w0 = min(args.gen_list)

        def gen_extra(name, s):
            if not name.startswith("gen"):
                return ""
            w = int(name.split("=")[1])
            s["vs_forward"] = ratio_stats(vps[name], vps[fwd_name[w]])
            txt = f"/ {fwd_name[w]} {fmt_ratio(s['vs_forward'])}"
            if w != w0:
                s["vs_w0"] = ratio_stats(vps[name], vps[f"gen w={w0}"])
                txt += f"; / gen w={w0} {fmt_ratio(s['vs_w0'])}"
            return txt

        summ["gen"] = table(gen_names, runs, gen_extra)
        if "stores_identical" in res:
            print(f"stores written with workers {args.gen_list}: "
                  f"{'identical' if res['stores_identical'] else 'DIFFERENT'} (top-K log-probs, class ids, seeds)")
    if train_names:
        print(f"\ntrain-student ({args.student}, {args.train_workers} workers, {args.epochs} epoch(s) per run):")

        def train_extra(name, s):
            if name != "offline":
                return ""
            s["vs_no_kd"] = ratio_stats(vps["offline"], vps["no-kd"])
            return f"offline / no-KD {fmt_ratio(s['vs_no_kd'])} (target >= 0.97)"

        summ["train"] = table(train_names, runs, train_extra)
    if "store_bytes" in res:
        print(f"\nstore: {res['store_bytes'] / 2**20:.1f} MiB on disk, "
              f"{res['store_bytes'] / (args.images * args.epochs):.1f} bytes per view")
    finish(res, env, t_start, args.out, summ)
    return 0


if __name__ == "__main__":
    sys.exit(main())
