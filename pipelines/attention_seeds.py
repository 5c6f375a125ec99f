"""Does the teacher's attention help a ViT student? Offline against online, over seeds, on digits.

    python pipelines/attention_seeds.py [--seeds 0 1 2 3 4] [--out runs/attention] [--epochs 30]
                                        [--weight 1.0] [--plot docs/attention.png]

Per seed, in the quickstart's manner (its views, optimiser and schedule; tinydistill.quickstart):

1. a ViT teacher, timm ``test_vit`` (6 blocks, width 64, 16-px patches) at 128 px, so the
   32-px views it sees make an 8 x 8 patch grid, trained supervised on ``digits:train`` by the
   same trainer (lr 1e-3 and 60 epochs: at the quickstart's 2e-3 and 30 it stopped at 74 %);
2. ``gen-logits`` with K = 5 and ``--attention-grid 8``: top-5 and the class-token attention map
   of every view of every epoch;
3. a smaller ViT student, ``test_vit`` with 4-px patches and 3 blocks (also an 8 x 8 grid at
   32 px), trained three ways on the same views and batches:
   ``logits`` (offline, top-5 only), ``logits_attn_offline`` (plus ``--attention-weight W``
   against the stored maps) and ``logits_attn_online`` (the same, the teacher run every step).

Prints a markdown table (mean ± std and each seed), the offline-online per-step loss gaps at
the start, and writes a plot. A seed whose results.json exists is reused; ``--extra-weights``
adds offline students at other attention weights to finished seeds (their stores are reused).
"""

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from quickstart_seeds import plot_seeds
from tinydistill.generate import GenConfig, gen_logits
from tinydistill.quickstart import SPEC, _curve, _final
from tinydistill.train import TrainConfig, train_student

TEACHER, TEACHER_SIZE, GRID, K = "test_vit", 128, 8, 5
STUDENT, STUDENT_KWARGS = "test_vit", {"patch_size": 4, "depth": 3}
METHODS = ["logits", "logits_attn_offline", "logits_attn_online"]


def common(seed: int) -> dict:
    return dict(data="digits", val_data="digits:val", batch_size=64, workers=1, device="cpu", seed=seed,
                progress=False, val_crop_pct=1.0, warmup_epochs=2.0, weight_decay=0.05, overwrite=True)


def student_config(seed: int, epochs: int) -> TrainConfig:
    return TrainConfig(student=STUDENT, out="", epochs=epochs, lr=1e-3, model_kwargs=STUDENT_KWARGS, **common(seed))


def extra_weight(out: Path, res: dict, weight: float) -> None:
    """One more offline student of a finished seed, with attention weight ``weight``, into ``res``."""
    name = f"logits_attn_offline_w{weight:g}"
    if name in res["students"]:
        return
    t = time.time()
    train_student(replace(student_config(res["seed"], res["epochs"]), out=str(out / name),
                          logits=str(out / "logits.zarr"), attention_weight=weight))
    res["seconds"][name] = round(time.time() - t, 1)
    res["students"][name], res["curves"][name] = _final(out / name), _curve(out / name)


def run_seed(out: Path, seed: int, epochs: int, teacher_epochs: int, weight: float) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    secs = {}
    t = time.time()
    train_student(TrainConfig(student=TEACHER, out=str(out / "teacher"), no_kd=True, epochs=teacher_epochs, lr=1e-3,
                              input_size=TEACHER_SIZE, spec=SPEC, view_seed=seed + 1000, **common(seed)))
    secs["teacher"] = time.time() - t
    weights, store = str(out / "teacher" / "best.pth"), str(out / "logits.zarr")
    t = time.time()
    gen = gen_logits(GenConfig(data="digits", teacher=TEACHER, teacher_weights=weights, teacher_input_size=TEACHER_SIZE,
                               out=store, k=K, attention_grid=GRID, epochs=(0, epochs), seed=seed, batch_size=128,
                               workers=1, device="cpu", spec=SPEC, overwrite=True, progress=False))
    secs["gen_logits"] = time.time() - t
    student = student_config(seed, epochs)
    online = dict(online_teacher=TEACHER, teacher_weights=weights, teacher_input_size=TEACHER_SIZE, k=K, like=store)
    for name, extra in [("logits", dict(logits=store)),
                        ("logits_attn_offline", dict(logits=store, attention_weight=weight)),
                        ("logits_attn_online", dict(attention_weight=weight, **online))]:
        t = time.time()
        train_student(replace(student, out=str(out / name), **extra))
        secs[name] = time.time() - t
    steps = {m: [json.loads(line)["loss"] for line in (out / m / "steps.jsonl").read_text().splitlines()]
             for m in METHODS}
    gap = np.abs(np.array(steps["logits_attn_offline"][:20]) - np.array(steps["logits_attn_online"][:20]))
    return {"seed": seed, "epochs": epochs, "teacher_epochs": teacher_epochs, "weight": weight, "grid": GRID, "k": K,
            "teacher_val_top1": _final(out / "teacher"), "students": {m: _final(out / m) for m in METHODS},
            "curves": {m: _curve(out / m) for m in METHODS}, "first_steps_offline_online_max_gap": float(gap.max()),
            "first_step_loss": {m: steps[m][0] for m in METHODS}, "views_stored": gen["views"],
            "seconds": {k: round(v, 1) for k, v in secs.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", default="runs/attention")
    ap.add_argument("--epochs", type=int, default=30, help="epochs of views and of each student")
    ap.add_argument("--teacher-epochs", type=int, default=60)
    ap.add_argument("--weight", type=float, default=1.0, help="--attention-weight of the two attention runs")
    ap.add_argument("--plot", default="docs/attention.png")
    ap.add_argument("--extra-weights", type=float, nargs="*", default=[],
                    help="also train an offline student at each of these attention weights (per seed)")
    args = ap.parse_args()
    runs = []
    for s in args.seeds:
        d = Path(args.out) / f"seed-{s}"
        if not (d / "results.json").exists():
            d.mkdir(parents=True, exist_ok=True)
            res = run_seed(d, s, args.epochs, args.teacher_epochs, args.weight)
            (d / "results.json").write_text(json.dumps(res, indent=1))
        res = json.loads((d / "results.json").read_text())
        for w in args.extra_weights:
            extra_weight(d, res, w)
            (d / "results.json").write_text(json.dumps(res, indent=1))
        runs.append(res)
        print(f"seed {s}: {runs[-1]['students']} (teacher {runs[-1]['teacher_val_top1']:.2f})", flush=True)
    report(runs, args.plot, Path(args.out), [f"logits_attn_offline_w{w:g}" for w in args.extra_weights])


def first_apart(out: Path, a: str, b: str, rel: float = 0.01) -> int | None:
    """The first step at which the per-step losses of runs a and b differ by more than ``rel``."""
    la, lb = ([json.loads(line)["loss"] for line in (out / m / "steps.jsonl").read_text().splitlines()] for m in (a, b))
    return next((i + 1 for i, (x, y) in enumerate(zip(la, lb)) if abs(x - y) > rel * abs(y)), None)


def report(runs: list[dict], plot: str, out: Path, extra: list[str] = ()) -> None:
    acc = {m: np.array([r["students"][m] for r in runs]) for m in METHODS + list(extra)}
    teacher = np.array([r["teacher_val_top1"] for r in runs])
    sd = (lambda a: a.std(ddof=1) if len(a) > 1 else 0.0)  # noqa: E731
    print(f"\n| model | val top-1, mean ± std over {len(runs)} seeds | per seed | train s (mean) |")
    print("|---|---|---|---|")
    print(f"| teacher ({TEACHER} at {TEACHER_SIZE} px, supervised) | {teacher.mean():.2f} ± {sd(teacher):.2f} | "
          f"{', '.join(f'{a:.2f}' for a in teacher)} | |")
    for m in METHODS + list(extra):
        secs = np.mean([r["seconds"][m] for r in runs])
        print(f"| student, {m.replace('_', ' ')} | {acc[m].mean():.2f} ± {sd(acc[m]):.2f} | "
              f"{', '.join(f'{x:.2f}' for x in acc[m])} | {secs:.0f} |")
    for a, b in [("logits_attn_offline", "logits"), ("logits_attn_offline", "logits_attn_online")] + [
            (m, "logits") for m in extra]:
        d = acc[a] - acc[b]
        print(f"{a} - {b}: {d.mean():+.2f} (per seed {', '.join(f'{x:+.2f}' for x in d)})")
    print("largest |offline - online| per-step loss over the first 20 steps, per seed: "
          + ", ".join(f"{r['first_steps_offline_online_max_gap']:.2e}" for r in runs))
    steps = len((out / f"seed-{runs[0]['seed']}" / "logits" / "steps.jsonl").read_text().splitlines())
    print(f"first step (of {steps}) at which offline and online losses differ by more than 1 %, per seed: "
          + ", ".join(str(first_apart(out / f"seed-{r['seed']}", "logits_attn_offline", "logits_attn_online"))
                      for r in runs))

    colors = {"logits": "tab:blue", "logits_attn_offline": "tab:green", "logits_attn_online": "tab:orange"}
    colors.update(zip(extra, ["tab:purple", "tab:red", "tab:brown", "tab:pink"]))
    plot_seeds(runs, METHODS + list(extra), colors, teacher, plot, ylim=(30, 100))

if __name__ == "__main__":
    main()
