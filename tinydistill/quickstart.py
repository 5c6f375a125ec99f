"""``tinydistill quickstart``: the whole pipeline on the built-in digits, in minutes on a laptop.

1. a CNN teacher (timm ``test_resnet``) trained supervised on ``digits:train`` by the same trainer;
2. ``gen-logits``: its top-K outputs for every augmented view of every epoch, in a store;
3. a ViT student (timm ``test_vit``, 4-px patches) trained three ways on the same views:
   no KD, offline KD from the store, online KD with the teacher run every step;
4. all evaluated on ``digits:val``: a table on stdout, ``results.json`` and ``quickstart.png``.
Every artefact stays in the output directory.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .augment import AugSpec
from .generate import GenConfig, gen_logits
from .train import TrainConfig, train_student

log = logging.getLogger("tinydistill")

SPEC = AugSpec(img_size=32, scale=(0.35, 1.0), ratio=(0.75, 1.333), hflip=0.0, color_jitter=0.0,
               auto_augment=None, interpolation="bicubic", re_prob=0.0, mixup=0.0, cutmix=1.0, mix_prob=0.5,
               mix_group=64)
TEACHER, STUDENT = "test_resnet", "test_vit"
STUDENT_KWARGS = {"patch_size": 4}
K = 5


def quickstart(out: str, seed: int = 0, epochs: int = 30, teacher_epochs: int = 30, workers: int = 1,
               device: str = "cpu", progress: bool = True) -> dict:
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    timings = {}
    common = dict(data="digits", val_data="digits:val", batch_size=64, workers=workers, device=device,
                  seed=seed, progress=progress, val_crop_pct=1.0, warmup_epochs=2.0, weight_decay=0.05,
                  overwrite=True)  # a re-run replaces the last one's runs, as it does the store

    log.info("[1/5] teacher: %s, supervised, %d epochs", TEACHER, teacher_epochs)
    t = time.time()
    train_student(TrainConfig(student=TEACHER, out=str(outp / "teacher"), no_kd=True, epochs=teacher_epochs,
                                        lr=2e-3, spec=SPEC, view_seed=seed + 1000, **common))
    timings["teacher"] = time.time() - t
    weights = str(outp / "teacher" / "best.pth")

    log.info("[2/5] gen-logits: K=%d, %d epochs of views", K, epochs)
    t = time.time()
    gen = gen_logits(GenConfig(data="digits", teacher=TEACHER, teacher_weights=weights, teacher_input_size=32,
                               out=str(outp / "logits.zarr"), k=K, epochs=(0, epochs), seed=seed, batch_size=128,
                               workers=workers, device=device, spec=SPEC, overwrite=True, progress=progress))
    timings["gen_logits"] = time.time() - t

    students = {}
    student = dict(student=STUDENT, epochs=epochs, lr=1e-3, model_kwargs=STUDENT_KWARGS, **common)
    for i, (name, extra) in enumerate([
        ("no_kd", dict(no_kd=True, like=str(outp / "logits.zarr"))),  # the same views and batches as offline KD
        ("offline_kd", dict(logits=str(outp / "logits.zarr"))),
        ("online_kd", dict(online_teacher=TEACHER, teacher_weights=weights, teacher_input_size=32, k=K,
                           like=str(outp / "logits.zarr"))),
    ]):
        log.info("[%d/5] student %s: %s", 3 + min(i, 2), STUDENT, name)
        t = time.time()
        students[name] = train_student(TrainConfig(out=str(outp / f"student_{name}"), **student, **extra))
        timings[name] = time.time() - t

    results = {
        "seed": seed, "epochs": epochs, "k": K, "teacher": TEACHER, "student": STUDENT,
        "teacher_val_top1": _final(outp / "teacher"),
        "students": {n: _final(outp / f"student_{n}") for n in students},
        "curves": {n: _curve(outp / f"student_{n}") for n in students} | {"teacher": _curve(outp / "teacher")},
        "views_stored": gen["views"], "seconds": {k: round(v, 1) for k, v in timings.items()},
        "total_seconds": round(time.time() - t0, 1),
    }
    (outp / "results.json").write_text(json.dumps(results, indent=1))
    plot_quickstart(results, outp / "quickstart.png")
    return results


def _curve(run: Path) -> list[float]:
    return [json.loads(l)["val_top1"] for l in (run / "metrics.jsonl").read_text().splitlines()]


def _final(run: Path) -> float:
    return _curve(run)[-1]


def table(results: dict) -> str:
    s = results["students"]
    rows = [("teacher (" + results["teacher"] + ", supervised)", results["teacher_val_top1"], results["seconds"]["teacher"])]
    rows += [(f"student {results['student']}: {n.replace('_', ' ')}", s[n], results["seconds"][n]) for n in s]
    w = max(len(r[0]) for r in rows)
    lines = [f"{'model':<{w}}  val top-1   train s", "-" * (w + 22)]
    lines += [f"{n:<{w}}  {a:8.2f}%  {t:8.1f}" for n, a, t in rows]
    lines.append(f"gen-logits: {results['views_stored']} views in {results['seconds']['gen_logits']:.1f} s; "
                 f"total {results['total_seconds']:.0f} s")
    return "\n".join(lines)


def plot_quickstart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"no_kd": "tab:gray", "offline_kd": "tab:blue", "online_kd": "tab:orange", "teacher": "black"}
    for name, curve in results["curves"].items():
        ax.plot(range(1, len(curve) + 1), curve, label=name.replace("_", " "), color=colors.get(name),
                ls="--" if name == "teacher" else "-")
    ax.set(xlabel="epoch", ylabel="digits:val top-1 (%)", ylim=(max(0, min(min(c) for c in results["curves"].values()) - 5), 100),
           title=f"quickstart, seed {results['seed']}: {results['student']} student, K={results['k']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
