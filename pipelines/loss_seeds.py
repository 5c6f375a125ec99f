"""Distillation losses against soft_ce, over seeds, on digits (offline students from one store).

    python pipelines/loss_seeds.py [--seeds 0 1] [--out runs/seeds] [--losses dist bce]

Per seed, the quickstart's run in OUT/seed-S (`tinydistill quickstart --seed S`, run first when
its results.json is missing) gives the teacher, the store and the soft_ce student (its
``offline_kd``). Each loss in ``--losses`` then trains one more offline student from that same
store with the quickstart student's options, only ``loss`` changed (checked against the
soft_ce run's config.json), into OUT/seed-S/student_loss_LOSS. A student whose metrics exist is
reused. ``--losses soft_ce ...`` retrains the soft_ce student too (into student_loss_soft_ce, with
this code, and reports it against the quickstart's). Prints a markdown table: val top-1 after
the last epoch, mean ± std and each seed.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tinydistill.checkpoint import RUN_ONLY, config_defaults
from tinydistill.quickstart import STUDENT, STUDENT_KWARGS, _final
from tinydistill.train import TrainConfig, train_student

# options that may differ from the soft_ce student's: those a resume may change, and the loss
FREE = RUN_ONLY | {"loss", "dist_beta", "dist_gamma"}


def student(seed: int, epochs: int, store: str, out: str, loss: str) -> TrainConfig:
    """The quickstart's offline student (tinydistill.quickstart) with another ``loss``."""
    return TrainConfig(data="digits", val_data="digits:val", student=STUDENT, model_kwargs=STUDENT_KWARGS,
                       epochs=epochs, lr=1e-3, batch_size=64, workers=1, device="cpu", seed=seed, progress=False,
                       val_crop_pct=1.0, warmup_epochs=2.0, weight_decay=0.05, overwrite=True, logits=store, out=out,
                       loss=loss)


def run_seed(d: Path, seed: int, epochs: int, losses: list[str]) -> dict:
    if not (d / "results.json").exists():
        subprocess.run([sys.executable, "-m", "tinydistill", "quickstart", "--out", str(d), "--seed", str(seed),
                        "--epochs", str(epochs), "--no-progress"], check=True)
    qs = json.loads((d / "results.json").read_text())
    res = {"seed": seed, "students": {"soft_ce": qs["students"]["offline_kd"]},
           "seconds": {"soft_ce": qs["seconds"]["offline_kd"]}}
    base = json.loads((d / "student_offline_kd" / "config.json").read_text())
    for loss in losses:
        out = d / f"student_loss_{loss}"
        if not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < epochs:
            t = time.time()
            train_student(student(seed, qs["epochs"], str(d / "logits.zarr"), str(out), loss))
            (out / "seconds").write_text(f"{time.time() - t:.1f}")
        cfg = json.loads((out / "config.json").read_text())
        defaults = json.loads(json.dumps(config_defaults(TrainConfig), default=str))  # options a run predates
        a, b = {**defaults, **cfg}, {**defaults, **base}
        a["logits"], b["logits"] = Path(a["logits"]).parent.name, Path(b["logits"]).parent.name  # the seed's store
        diff = sorted(k for k in set(a) | set(b) if k not in FREE and a.get(k) != b.get(k))
        if diff:
            raise SystemExit(f"{out}: options differ from the soft_ce student's in {diff}")
        if loss == "soft_ce":
            res["quickstart_soft_ce"] = res["students"]["soft_ce"]
        res["students"][loss] = _final(out)
        res["seconds"][loss] = float((out / "seconds").read_text()) if (out / "seconds").exists() else None
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", default="runs/seeds")
    ap.add_argument("--epochs", type=int, default=30, help="epochs of a quickstart run when one is made")
    ap.add_argument("--losses", nargs="+", default=["dist", "bce"])
    args = ap.parse_args()
    runs = [run_seed(Path(args.out) / f"seed-{s}", s, args.epochs, args.losses) for s in args.seeds]
    names = ["soft_ce", *(m for m in args.losses if m != "soft_ce")]
    acc = {m: np.array([r["students"][m] for r in runs]) for m in names}
    sd = (lambda a: a.std(ddof=1) if len(a) > 1 else 0.0)  # noqa: E731
    print(f"| --loss | val top-1, mean ± std over {len(runs)} seeds | per seed ({', '.join(map(str, args.seeds))}) "
          "| minus soft_ce, per seed |")
    print("|---|---|---|---|")
    for m in names:
        delta = acc[m] - acc["soft_ce"]
        print(f"| {m} | {acc[m].mean():.2f} ± {sd(acc[m]):.2f} | {', '.join(f'{x:.2f}' for x in acc[m])} | "
              f"{'' if m == 'soft_ce' else ', '.join(f'{x:+.2f}' for x in delta)} |")
    if "soft_ce" in args.losses:
        print("soft_ce retrained here / in the quickstart, per seed: " + ", ".join(
            f"{r['students']['soft_ce']:.2f} / {r['quickstart_soft_ce']:.2f}" for r in runs))


if __name__ == "__main__":
    main()
