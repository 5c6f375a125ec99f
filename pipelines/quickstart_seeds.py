"""The quickstart over several seeds: mean and spread of val top-1 for each way of training.

    python pipelines/quickstart_seeds.py [--seeds 0 1 2] [--out runs/seeds] [--plot docs/results.png]

Runs `tinydistill quickstart --seed S` for each seed (each in OUT/seed-S; a seed whose
results.json exists is reused), then prints a markdown table (mean ± std over seeds, and
each seed) and writes a plot: final top-1 per method with every seed shown, and the mean
validation curves.
"""

import argparse
import json
import subprocess
import textwrap
import sys
from pathlib import Path

import numpy as np

METHODS = ["no_kd", "offline_kd", "online_kd"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/seeds")
    ap.add_argument("--plot", default="docs/results.png")
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args()
    runs = []
    for s in args.seeds:
        d = Path(args.out) / f"seed-{s}"
        if not (d / "results.json").exists():
            subprocess.run([sys.executable, "-m", "tinydistill", "quickstart", "--out", str(d), "--seed", str(s),
                            "--epochs", str(args.epochs), "--no-progress"], check=True)
        runs.append(json.loads((d / "results.json").read_text()))

    acc = {m: np.array([r["students"][m] for r in runs]) for m in METHODS}
    teacher = np.array([r["teacher_val_top1"] for r in runs])
    secs = {m: np.array([r["seconds"][m] for r in runs]) for m in METHODS}
    print(f"| model | val top-1, mean ± std over {len(runs)} seeds | per seed | train s (mean) |")
    print("|---|---|---|---|")
    print(f"| teacher ({runs[0]['teacher']}, supervised) | {teacher.mean():.2f} ± {teacher.std(ddof=1):.2f} | "
          f"{', '.join(f'{a:.2f}' for a in teacher)} | |")
    for m in METHODS:
        a = acc[m]
        print(f"| student {runs[0]['student']}, {m.replace('_', ' ')} | {a.mean():.2f} ± {a.std(ddof=1):.2f} | "
              f"{', '.join(f'{x:.2f}' for x in a)} | {secs[m].mean():.0f} |")
    d_off_on = acc["offline_kd"] - acc["online_kd"]
    d_off_no = acc["offline_kd"] - acc["no_kd"]
    print(f"\noffline - online: {d_off_on.mean():+.2f} (per seed {', '.join(f'{x:+.2f}' for x in d_off_on)})")
    print(f"offline - no KD:  {d_off_no.mean():+.2f} (per seed {', '.join(f'{x:+.2f}' for x in d_off_no)})")
    print(f"total quickstart seconds per seed: {', '.join(str(r['total_seconds']) for r in runs)}")

    plot_seeds(runs, METHODS, {"no_kd": "tab:gray", "offline_kd": "tab:blue", "online_kd": "tab:orange"},
               teacher, args.plot)


def plot_seeds(runs: list[dict], methods: list[str], colors: dict, teacher: np.ndarray, path: str,
               ylim=(50, 100)) -> None:
    """Final top-1 per method (mean ± std, every seed a dot) and the validation curves (mean,
    min-max band) of runs, each a results.json with ``students`` and ``curves`` per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = {m: np.array([r["students"][m] for r in runs]) for m in methods}
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, m in enumerate(methods):
        ax[0].errorbar(i, acc[m].mean(), yerr=acc[m].std(ddof=1) if len(runs) > 1 else 0, fmt="o", color=colors[m],
                       capsize=6, ms=8)
        ax[0].scatter(np.full(len(runs), i) + 0.12, acc[m], color=colors[m], alpha=0.5, s=18)
    ax[0].axhline(teacher.mean(), color="black", ls="--", lw=1, label=f"teacher {teacher.mean():.1f}%")
    ax[0].set_xticks(range(len(methods)), [textwrap.fill(m.replace("_", " "), 14) for m in methods])
    ax[0].set(ylabel="digits:val top-1 (%)", title=f"final top-1, mean ± std over {len(runs)} seeds (dots: seeds)")
    ax[0].legend()
    for m in methods:
        c = np.array([r["curves"][m] for r in runs])
        x = np.arange(1, c.shape[1] + 1)
        ax[1].plot(x, c.mean(0), color=colors[m], label=m.replace("_", " "))
        ax[1].fill_between(x, c.min(0), c.max(0), color=colors[m], alpha=0.15)
    ax[1].set(xlabel="epoch", ylabel="top-1 (%)", title="validation curves (mean, band: min-max over seeds)",
              ylim=ylim)
    ax[1].legend()
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print("plot:", path)

if __name__ == "__main__":
    main()
