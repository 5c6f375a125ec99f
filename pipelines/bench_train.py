"""Benchmark: training steps/s of one student under offline KD, no-KD and online KD, side by side.

The three modes of ``tinydistill.train.train_student`` run the same loop on the same views:

  offline   ``TrainConfig(logits=STORE)``: targets are the teacher's stored top-K, read a store
            chunk at a time by the DataLoader workers alongside the views; no teacher exists.
  no-kd     ``TrainConfig(no_kd=True)``: the supervised baseline on the (mixed, smoothed) labels.
            This is the physical ceiling for offline KD: same student, same views, no targets.
  online    ``TrainConfig(online_teacher=NAME, teacher_weights=...)``: the teacher runs a forward
            pass on every batch, in the training process, before the student's step.

All three get the same student (built under the same seed), batch size, optimiser, DataLoader
worker count and views: the no-KD and online runs are given ``like=STORE`` (the store's
augmentation spec and base seed; every mode orders an epoch's rows the same way for the same
seed), so they draw exactly the batches the offline run replays. The store is made once beforehand by
``gen_logits`` with the same teacher and weights that the online run uses; its wall time is
reported as the one-off cost of offline KD, but it is not part of any ratio.

What is timed: the training steps only. ``train_student`` calls its ``on_step`` callback after
each step (after ``loss.item()``, so the step has finished, on a GPU too); this script passes
one that records the time of every step. In each epoch the first ``--skip-steps`` steps are left out, because
the first one also pays for starting the DataLoader workers and rendering their first batch (at
least 1 is left out: the epoch's start is not reported); the rate is (steps timed) / (time from
the end of step ``skip`` to the end of the last step), summed
over epochs and runs. Model building, teacher loading, store opening and its replay canary,
worker start-up, checkpoints and evaluation are outside the timed window. A second estimator,
1 / (median duration of a timed step), is shown beside it: it shrugs off a neighbour's burst
but also hides any periodic stall, so the mean rate stays the headline. As a cross-check the
table also shows each run's epoch wall time as ``train_student`` writes it in metrics.jsonl
("seconds", which does include the epoch's worker start-up).

Noise: on shared cores the modes are alternated. Before the rounds one untimed no-KD epoch
warms up the process (the teacher has already run in gen-logits). Each round runs every mode
once, in an order rotated every round so each mode takes each slot, then repeats offline and
no-KD (``--repeats``, default 2 runs each per round) in mirrored order (A B ... B A), since
their ratio is the one that needs precision; online runs once a round, for ``--online-epochs``
(default 1) epochs, as it is slow and steady. Ratios are per round (offline / no-KD and
offline / online of the same round, each mode's rate in a round = its timed steps over their
time) and reported as the median over rounds with [min, max]; steps/s are medians over rounds.

All runs use a constant learning rate (``min_lr = lr``, no warm-up; speed does not depend on
it), so the first epoch of a run does not depend on its length. That allows a check that the
modes really see the same views: the online run's epoch-0 mean loss and the offline run's
must agree up to the store's fp16 log-probs (K = all classes by default); it is printed.

Presets (every option can still be overridden):
  cpu (default)  built-in ``digits`` (1,438 train images, 10 classes) rendered at 32 px with
                 TinyViT's recipe (RandAugment m9, jitter 0.4, random erasing 0.25, mixup 0.8 /
                 cutmix 1.0, mix groups of 64); store of K=10 (= all classes) in chunks of 128 rows;
                 student random-init ``resnet18`` (11.2 M params) at 32 px; teacher random-init
                 ``resnet50`` (23.5 M params) at 96 px (``teacher_input_size``; the views are
                 upsampled for it); batch 64, 2 DataLoader workers, 2 epochs per offline / no-KD run
                 (23 steps each), 1 per online run, 3 rounds. About 4.5 minutes on 2 shared cores
                 (more when neighbours are busy).
  gpu            4,096 synthetic 320x256 JPEGs (an ImageFolder in a temp dir) rendered at 224 px with
                 the same recipe; student ``deit_tiny_patch16_224`` at 224; teacher random-init
                 ``vit_large_patch14_clip_224`` (304 M params) at 224; bf16 AMP on ``cuda``; batch
                 256, min(8, cores - 1) workers, 2 epochs per offline / no-KD run, 3 rounds
                 (``--online-epochs 2`` for a longer online window). When CUDA is not
                 available it prints that it was skipped and measures nothing.

Teachers are random-init (``pretrained=False``, seeded) and saved with
``torch.save(model.state_dict())`` to a temp file passed as the teacher weights, as the tests do;
nothing is downloaded. Everything is written under a temporary directory that is removed at the
end. No timing is asserted.

    .venv/bin/python pipelines/bench_train.py [--preset cpu|gpu] [--rounds R] [--repeats N]
        [--epochs E] [--online-epochs E]
        [--student NAME] [--input-size PX] [--teacher NAME] [--teacher-input-size PX]
        [--data digits|synthetic-jpeg|SRC] [--images N] [--img-size PX] [--recipe tinyvit|light]
        [--batch-size B] [--workers W] [--k K] [--device cpu|cuda] [--amp none|bf16|fp16]
        [--threads T] [--skip-steps S] [--modes offline,no-kd,online] [--out FILE.json]
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from benchlib import (apply_preset, begin, bench_parser, finish, fmt_ratio, gen_config,
                      in_process_options, med, ratio_stats, run_rounds, save_random_model,
                      StepClock, sync, workspace)
from tinydistill.generate import gen_logits
from tinydistill.sources import open_source
from tinydistill.train import TrainConfig, train_student

PRESETS = {
    "cpu": dict(data="digits", images=0, img_size=32, student="resnet18", input_size=32,
                teacher="resnet50", teacher_input_size=96, batch_size=64, workers=2, epochs=2,
                chunk_rows=128, mix_group=64, device="cpu", amp="none", rounds=3),
    "gpu": dict(data="synthetic-jpeg", images=4096, img_size=224, student="deit_tiny_patch16_224", input_size=224,
                teacher="vit_large_patch14_clip_224", teacher_input_size=224, batch_size=256, workers=None,
                epochs=2, chunk_rows=512, mix_group=64, device="cuda", amp="bf16", rounds=3),
}
MODES = ("offline", "no-kd", "online")


# ---- data and teacher ----------------------------------------------------------------------------

def count_student_params(args, num_classes: int) -> int:
    from tinydistill.train import create_student

    cfg = TrainConfig(data="", student=args.student, out="")
    m = create_student(cfg, num_classes, args.input_size)
    n = sum(p.numel() for p in m.parameters())
    del m
    return n


# ---- one training run ----------------------------------------------------------------------------

def train_config(args, mode: str, data: str, store: str, weights: str, out: str, epochs: int) -> TrainConfig:
    # constant LR (min_lr = lr, no warm-up): a run's first epoch is then the same whatever its length,
    # so the loss check can compare a 1-epoch online run with the offline run's first epoch
    common = dict(data=data, student=args.student, out=out, epochs=epochs, batch_size=args.batch_size,
                  workers=args.workers, device=args.device, amp=args.amp, seed=args.seed,
                  input_size=args.input_size, lr=1e-3, min_lr=1e-3, warmup_epochs=0.0,
                  progress=False)  # the step clock records whether or not the bar is shown
    if mode == "offline":
        return TrainConfig(logits=store, **common)
    baseline = dict(like=store, **common)
    if mode == "no-kd":
        return TrainConfig(no_kd=True, **baseline)
    return TrainConfig(online_teacher=args.teacher, teacher_weights=weights,
                       teacher_input_size=args.teacher_input_size, k=args.k, **baseline)


def timed_steps(clocks: list[list[float]], skip: int) -> tuple[int, int, float, list[float]]:
    """(steps, steps timed, their seconds, each timed step's duration) of per-epoch step end times,
    the first ``skip`` steps of each epoch left out."""
    timed, timed_s, steps, step_s = 0, 0.0, 0, []
    for c in clocks:
        steps += len(c)
        if len(c) > skip:
            start = c[skip - 1]
            timed += len(c) - skip
            timed_s += c[-1] - start
            edges = [start] + c[skip:]
            step_s += [b - a for a, b in zip(edges, edges[1:])]
    return steps, timed, timed_s, step_s


def run_mode(args, mode: str, data: str, store: str, weights: str, tmp: Path, tag: str,
             epochs: int | None = None) -> dict:
    out = tmp / f"run_{mode}_{tag}"
    epochs = epochs or (args.online_epochs if mode == "online" else args.epochs)
    cfg = train_config(args, mode, data, store, weights, str(out), epochs)
    clock = StepClock()
    gc.collect()
    sync(args.device)
    t0 = time.perf_counter()
    summary = train_student(cfg, on_step=clock)
    wall = time.perf_counter() - t0
    clocks = [clock.times[e] for e in sorted(clock.times)]
    if not clocks:
        raise RuntimeError("train_student never called on_step")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out, ignore_errors=True)
    steps, timed, timed_s, step_s = timed_steps(clocks, args.skip_steps)
    if summary.get("mode") != {"no-kd": "no_kd"}.get(mode, mode):
        raise RuntimeError(f"{mode}: train_student ran in mode {summary.get('mode')!r}")
    rec = {"epochs": epochs, "steps": steps, "timed_steps": timed, "timed_s": timed_s,
           "steps_per_s": timed / timed_s if timed_s > 0 else None,
           "epoch_seconds": [m["seconds"] for m in metrics], "views": sum(m["views"] for m in metrics),
           "wall_s": wall, "epoch_losses": [m["train_loss"] for m in metrics], "step_s": step_s}
    rec["setup_s"] = wall - sum(rec["epoch_seconds"])  # before the first epoch plus checkpoints after each
    return rec


# ---- stages --------------------------------------------------------------------------------------

def set_up(args, data: str, tmp: Path, res: dict) -> str:
    """The random teacher's weights file; prints what runs."""
    source = open_source(data)
    weights = tmp / "teacher.pth"
    t_params = save_random_model(args.teacher, source.num_classes, weights)
    s_params = count_student_params(args, source.num_classes)
    print(f"teacher: {args.teacher} random init, {t_params / 1e6:.1f} M params, input {args.teacher_input_size} px\n"
          f"student: {args.student} random init, {s_params / 1e6:.1f} M params, input {args.input_size} px\n"
          f"views:   {source.name} ({len(source)} images, {source.num_classes} classes) rendered at "
          f"{args.img_size} px ({args.recipe} recipe), store chunks of {args.chunk_rows} rows; batch {args.batch_size}, "
          f"{args.workers} DataLoader workers, {args.epochs} epoch(s) per run, device {args.device}, amp {args.amp}, "
          f"{torch.get_num_threads()} torch threads")
    res.update(teacher_params=t_params, student_params=s_params, images=len(source))
    return str(weights)


def make_store(args, data: str, weights: str, spec, store: str, res: dict) -> float:
    """The teacher's top-K for every view of every epoch a run will train on (one-off cost); its seconds."""
    cfg = gen_config(data, args.teacher, weights, store, spec, args.chunk_rows, k=args.k, epochs=(0, args.epochs),
                     teacher_input_size=args.teacher_input_size, seed=args.seed, batch_size=args.batch_size,
                     workers=args.workers, device=args.device, amp=args.amp)
    t0 = time.perf_counter()
    g = gen_logits(cfg)
    gen_s = time.perf_counter() - t0
    res["gen_logits"] = {"seconds": gen_s, "views": g["views"], "views_per_s": g["views"] / gen_s}
    print(f"store:   gen-logits {g['views']} views (K={args.k}) in {gen_s:.1f} s = {g['views'] / gen_s:.0f} views/s "
          "(one-off, not in any ratio)\n")
    return gen_s


def warm_up(args, data: str, store: str, weights: str, tmp: Path) -> None:
    """Untimed: one epoch of the cheapest mode (first-call costs: allocator, oneDNN kernels, the
    student's shapes); the teacher has already run at its shapes in gen-logits."""
    warm = "no-kd" if "no-kd" in args.mode_list else args.mode_list[0]
    t0 = time.perf_counter()
    run_mode(args, warm, data, store, weights, tmp, "warmup", epochs=1)
    print(f"warm-up: one {warm} epoch in {time.perf_counter() - t0:.1f} s (not counted)")


# ---- reporting -----------------------------------------------------------------------------------

def round_order(modes: list[str], r: int, repeats: int) -> list[str]:
    """Round r: the modes rotated by r (each mode takes each slot in turn), then the offline and no-KD
    runs repeated, each repeat in the reverse order of the one before (A B ... B A: a linear drift cancels)."""
    order = modes[r % len(modes):] + modes[:r % len(modes)]
    pair = [m for m in order if m in ("offline", "no-kd")]
    for _ in range(repeats - 1):
        pair = pair[::-1]
        order = order + pair
    return order


def per_round(runs: list[dict], rounds: int, median: bool = False) -> list[float | None]:
    """A mode's steps/s in each round: its timed steps in that round over their time (all its runs);
    with ``median``, 1 / the median duration of those steps instead (robust to a neighbour's burst)."""
    out = []
    for r in range(rounds):
        rs = [x for x in runs if x["round"] == r]
        if median:
            d = [t for x in rs for t in x["step_s"]]
            out.append(1.0 / statistics.median(d) if d else None)
            continue
        t = sum(x["timed_s"] for x in rs)
        out.append(sum(x["timed_steps"] for x in rs) / t if t > 0 else None)
    return out


def mode_table(args, runs: dict, rounds: dict, rounds_med: dict) -> dict:
    print(f"\nsteps/s: median over {args.rounds} rounds of (the mode's timed steps in the round / their time), first "
          f"{args.skip_steps} step(s) of each epoch left out;\nruns: the mode's runs per round x epochs per run; "
          "epoch s: train_student's own epoch wall time (metrics.jsonl 'seconds', includes worker start-up);\n"
          "setup s: the rest of the call (model, teacher, store + canary before the first epoch; checkpoints);\n"
          "med ms: median duration of a timed step (median over rounds), a second estimator robust to bursts")
    print(f"{'mode':8s} {'steps/s':>8s} {'ms/step':>8s} {'rounds min..max':>16s} {'med ms':>7s} {'runs':>6s} "
          f"{'steps/epoch':>11s} {'epoch s':>8s} {'setup s':>8s}")
    summ = {}
    for mode, rs in runs.items():
        sps = rounds[mode]
        epoch_s = med([statistics.mean(x["epoch_seconds"]) for x in rs])
        s = {"steps_per_s": med(sps), "ms_per_step": 1e3 / med(sps), "min": min(sps), "max": max(sps),
             "runs_per_round": len(rs) // args.rounds, "epochs_per_run": rs[0]["epochs"],
             "steps_per_epoch": rs[0]["steps"] // rs[0]["epochs"], "epoch_seconds": epoch_s,
             "setup_s": med([x["setup_s"] for x in rs]), "median_step_ms": 1e3 / med(rounds_med[mode])}
        summ[mode] = s
        runs_txt = f"{s['runs_per_round']}x{s['epochs_per_run']}"
        print(f"{mode:8s} {s['steps_per_s']:8.2f} {s['ms_per_step']:8.1f} {s['min']:7.2f}..{s['max']:<7.2f} "
              f"{s['median_step_ms']:7.1f} {runs_txt:>6s} {s['steps_per_epoch']:11d} {epoch_s:8.1f} {s['setup_s']:8.1f}")
    if len({s["steps_per_epoch"] for s in summ.values()}) != 1:
        print("note: the modes took different numbers of steps per epoch (they should not)")
    return summ


def loss_check(runs: dict, summ: dict) -> None:
    """Same views, same student init, constant LR, K = all classes: the online run's epoch and the offline
    run's first epoch train on the same targets up to the store's fp16 log-probs. Checks the views line up."""
    if "offline" in runs and "online" in runs:
        a, b = runs["offline"][0]["epoch_losses"][0], runs["online"][0]["epoch_losses"][0]
        summ["loss_check"] = {"offline_epoch0": a, "online_epoch0": b, "rel_diff": abs(a - b) / abs(b) if b else None}
        print(f"check: first-epoch mean loss offline {a:.5f}, online {b:.5f} (same views, same targets up to the "
              f"store's fp16: relative difference {summ['loss_check']['rel_diff']:.1e})")


def ratios(rounds: dict, rounds_med: dict, summ: dict) -> None:
    def ratio(a, b, table=rounds):
        return ratio_stats(table[a], table[b]) if a in table and b in table else None

    summ["offline/no-kd"] = ratio("offline", "no-kd")
    summ["offline/online"] = ratio("offline", "online")
    summ["no-kd/online"] = ratio("no-kd", "online")
    summ["offline/no-kd median-step"] = ratio("offline", "no-kd", rounds_med)
    summ["offline/online median-step"] = ratio("offline", "online", rounds_med)
    print("\nratios of steps/s, per round, median [min, max]:")
    if summ["offline/no-kd"]:
        print(f"  offline / no-KD  = {fmt_ratio(summ['offline/no-kd'])}   (1.0 = the store costs nothing; target >= 0.97)")
    if summ["offline/online"]:
        print(f"  offline / online = {fmt_ratio(summ['offline/online'], 2)}   (speed-up of offline over online KD)")
    if summ["no-kd/online"]:
        print(f"  no-KD / online   = {fmt_ratio(summ['no-kd/online'], 2)}")
    alt = [f"offline / {b} = {fmt_ratio(summ[f'offline/{k} median-step'], d)}"
           for k, b, d in (("no-kd", "no-KD", 3), ("online", "online", 2)) if summ[f"offline/{k} median-step"]]
    if alt:
        print("  from median step durations instead: " + ", ".join(alt))


def store_cost(args, gen_s: float, summ: dict) -> None:
    """One epoch of views costs the store gen_s / epochs once; online pays the teacher every epoch it trains."""
    if "offline" in summ and "online" in summ:
        steps = summ["offline"]["steps_per_epoch"]
        extra = steps / summ["online"]["steps_per_s"] - steps / summ["offline"]["steps_per_s"]
        per_epoch = gen_s / args.epochs
        summ["gen_seconds_per_epoch_of_views"] = per_epoch
        summ["online_extra_seconds_per_epoch"] = extra
        print(f"\none-off store cost: {per_epoch:.1f} s per epoch of views (gen-logits, teacher at "
              f"{args.teacher_input_size} px); online KD pays {extra:.1f} s more per epoch than offline, every time "
              "it trains")


def summarise(args, runs: dict, gen_s: float, res: dict) -> dict:
    rounds = {m: per_round(rs, args.rounds) for m, rs in runs.items()}
    rounds_med = {m: per_round(rs, args.rounds, median=True) for m, rs in runs.items()}
    res["per_round_steps_per_s"] = rounds
    res["per_round_median_step_rate"] = rounds_med
    summ = mode_table(args, runs, rounds, rounds_med)
    loss_check(runs, summ)
    ratios(rounds, rounds_med, summ)
    store_cost(args, gen_s, summ)
    return summ


# ---- main ----------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = bench_parser(__doc__, PRESETS)
    ap.add_argument("--student", help="timm student (random init)")
    ap.add_argument("--teacher", help="timm teacher (random init, saved as a state_dict; no download)")
    ap.add_argument("--input-size", type=int, help="student input size (views are resized to it)")
    ap.add_argument("--teacher-input-size", type=int, help="teacher input size for gen-logits and online KD")
    ap.add_argument("--k", type=int, default=10, help="top-K kept in the store and by the online teacher")
    ap.add_argument("--chunk-rows", type=int, help="store chunk rows (= shard rows)")
    ap.add_argument("--workers", type=int, help="DataLoader workers (all modes)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="offline and no-KD runs per round (online runs once per round); default 2")
    ap.add_argument("--epochs", type=int, help="epochs per offline / no-KD run (the store holds as many)")
    ap.add_argument("--online-epochs", type=int,
                    help="epochs per online run (default 1: it is by far the slowest and its rate is steady)")
    ap.add_argument("--skip-steps", type=int, default=2, help="leading steps of each epoch left out of the timing (>= 1)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of offline,no-kd,online")
    in_process_options(ap)
    args = ap.parse_args(argv)
    apply_preset(args, PRESETS[args.preset])
    if args.online_epochs is None:
        args.online_epochs = 1
    if not 1 <= args.online_epochs <= args.epochs:
        ap.error("--online-epochs must be between 1 and --epochs (the store holds --epochs epochs of views)")
    if args.skip_steps < 1:
        ap.error("--skip-steps must be >= 1 (the time an epoch starts is not reported)")
    if args.repeats < 1 or args.rounds < 1:
        ap.error("--repeats and --rounds must be >= 1")
    if args.workers is None:  # gpu preset: scale with the machine
        args.workers = max(1, min(8, (os.cpu_count() or 2) - 1))
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = set(args.mode_list) - set(MODES)
    if bad or not args.mode_list:
        ap.error(f"--modes: unknown {sorted(bad)}; choose from {','.join(MODES)}")
    if args.chunk_rows % args.mix_group:
        ap.error("--chunk-rows must be a multiple of --mix-group")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    env, res, spec, t_start = begin("bench_train", args, f"--device cuda (preset {args.preset}: student "
                                    f"{args.student} at {args.input_size} px, teacher {args.teacher}, amp {args.amp})")
    with workspace("bench_train_", args) as (tmp, data):
        weights = set_up(args, data, tmp, res)
        store = str(tmp / "store.zarr")
        gen_s = make_store(args, data, weights, spec, store, res)
        warm_up(args, data, store, weights, tmp)
        modes = {m: (lambda r, i, m=m: run_mode(args, m, data, store, weights, tmp, f"r{r}_{i}")) for m in args.mode_list}
        res["runs"] = runs = run_rounds(modes, args.rounds, lambda r: round_order(args.mode_list, r, args.repeats),
                                        key="steps_per_s", unit="steps/s", digits=2)
    finish(res, env, t_start, args.out, summarise(args, runs, gen_s, res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
