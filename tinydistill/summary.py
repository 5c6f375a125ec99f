"""What ``tinydistill inspect`` reports: teacher statistics read from whole chunks, and a plot."""

from __future__ import annotations

import numpy as np

from .errors import TinydistillError
from .store import LogitStore

LEAST_SURE = 20  # classes named in the plot's third panel when there are too many to show all
MANY_CLASSES = 40


def least_sure(per_class: np.ndarray, class_names: list[str], n: int = LEAST_SURE) -> list[tuple[str, float]]:
    """(name, mean probability of the true class) of the n classes the teacher is least sure of."""
    seen = np.nonzero(np.isfinite(per_class))[0]
    worst = seen[np.argsort(per_class[seen], kind="stable")[:n]]
    return [(class_names[c] if c < len(class_names) else str(c), float(per_class[c])) for c in worst]


def plot_formats() -> dict[str, str]:
    """File extensions matplotlib can write (e.g. png, pdf, svg), or {} without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        return {}
    return dict(Figure().canvas.get_supported_filetypes())


def check_plot_path(path: str) -> str:
    """The output format of ``--plot PATH``: its extension, if matplotlib can write it."""
    import os

    ext = os.path.splitext(path)[1].lower().lstrip(".")
    formats = plot_formats()
    if not formats:
        raise TinydistillError("--plot needs matplotlib: pip install 'tinydistill[plot]'")
    if not ext:
        raise TinydistillError(f"{path}: --plot needs a file extension that names the format "
                               f"({', '.join(sorted(formats))})")
    if ext not in formats:
        raise TinydistillError(f"{path}: cannot write .{ext} plots; use one of {', '.join(sorted(formats))}")
    return ext


def summarize(store: LogitStore, max_views: int = 200_000, seed: int = 0) -> dict:
    """Statistics over up to ``max_views`` complete views, sampled as whole chunks.

    Returns a JSON-able dict (``info`` plus ``stats``) and, under ``"_arrays"``, the per-view
    values the plot needs (top-1 probability, top-K mass, per-class confidence).
    """
    info = store.info
    mask = store.complete_mask()
    units = [
        (e, c)
        for e in range(store.epochs)
        for c in range(-(-store.num_rows // store.chunk_rows))
        if mask[e, (c * store.chunk_rows) // store.shard_rows]
    ]
    rng = np.random.default_rng(seed)
    rng.shuffle(units)
    labels = store.labels
    top1, mass, pred, lab, p_label, peak, entropy = [], [], [], [], [], [], []
    seen = skipped = 0
    has_maps = store.kind("attention") is not None
    for e, c in units:
        if seen >= max_views:
            break
        lo, hi = c * store.chunk_rows, min((c + 1) * store.chunk_rows, store.num_rows)
        logp, idx = store.topk(e, slice(lo, hi), order="desc")
        ok = ~np.isnan(logp[:, 0])  # skipped views (unreadable images) have no outputs
        skipped += int((~ok).sum())
        logp, idx = logp[ok], idx[ok]
        p = np.exp(logp)
        y = labels[lo:hi][ok]
        total = p.sum(1)
        hit = idx == y[:, None]
        # probability the (smoothed) teacher gives the true class
        rest = np.clip(1 - total, 0, None) / max(store.num_classes - store.k, 1)
        p_label.append(np.where(hit.any(1), (p * hit).sum(1), rest))
        top1.append(p[:, 0]), mass.append(total), pred.append(idx[:, 0]), lab.append(y)
        if has_maps:  # how concentrated the teacher's attention is: its largest cell, its entropy
            a = store.attention(e, slice(lo, hi))[ok].reshape(int(ok.sum()), -1).astype(np.float64)
            peak.append(a.max(1))
            with np.errstate(divide="ignore", invalid="ignore"):
                entropy.append(-np.nansum(np.where(a > 0, a * np.log2(a), 0.0), 1))
        seen += int(ok.sum())
    stats: dict = {"views_sampled": int(seen), "views_skipped": skipped}
    arrays: dict = {}
    if seen:
        top1_a, mass_a = np.concatenate(top1), np.concatenate(mass)
        pred_a, lab_a, pl_a = np.concatenate(pred), np.concatenate(lab), np.concatenate(p_label)
        known = lab_a >= 0
        stats.update(
            mean_top1_prob=float(top1_a.mean()),
            mean_topk_mass=float(mass_a.mean()),
            top1_agreement=float((pred_a[known] == lab_a[known]).mean()) if known.any() else None,
        )
        per_class = np.full(store.num_classes, np.nan)
        if known.any():
            sums = np.bincount(lab_a[known], weights=pl_a[known], minlength=store.num_classes)
            counts = np.bincount(lab_a[known], minlength=store.num_classes)
            with np.errstate(invalid="ignore", divide="ignore"):
                per_class = sums / counts
        arrays = {"top1": top1_a, "mass": mass_a, "per_class": per_class}
        if has_maps:
            stats.update(mean_attention_peak=float(np.concatenate(peak).mean()),
                         mean_attention_entropy_bits=float(np.concatenate(entropy).mean()))
        if np.isfinite(per_class).any():
            stats["least_sure_classes"] = [
                {"class": name, "mean_true_class_prob": p} for name, p in least_sure(per_class, store.class_names, 10)]
    return {"info": info, "completed": store.completed().tolist(), "stats": stats, "_arrays": arrays}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _completeness_line(done: list[float]) -> str:
    if len(done) <= 12:
        return "  ".join(f"e{e}: {100 * f:.0f}%" for e, f in enumerate(done))
    full = sum(f == 1 for f in done)
    empty = sum(f == 0 for f in done)
    partial = [f"e{e}: {100 * f:.0f}%" for e, f in enumerate(done) if 0 < f < 1]
    return f"{full} epochs complete, {empty} empty" + (f", partial: {' '.join(partial[:10])}" if partial else "")


def summary_lines(summary: dict, check: bool = False, plot: str | None = None) -> list[str]:
    """``tinydistill inspect``'s text: one aligned "name  value" line per fact of :func:`summarize`."""
    info, stats = summary["info"], summary["stats"]
    t = info["teacher"]
    teacher = ", ".join(f"{k}={v}" for k, v in t.items() if k in ("name", "weights_digest", "input_size")) or "not recorded"
    lines = [
        ("store", f"{info['path']}  (format {info['format_version']}, created {info['created']})"),
        ("shape", f"{info['epochs']} epochs x {info['num_rows']} rows x K={info['k']}, "
                  f"{info['num_classes']} classes, index {info['index_dtype']}"),
        ("teacher", teacher),
        ("spec hash", str(info["spec_hash"])[:16]),
        ("complete", _completeness_line(summary["completed"])),
        ("on disk", f"{_fmt_bytes(info['bytes_on_disk'])}"
                    + (f", {info['bytes_per_view']:.1f} bytes/view" if info["bytes_per_view"] else "")
                    + "  (" + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in sorted(info["bytes_by_array"].items())) + ")"),
    ]
    if stats["views_sampled"]:
        lines += [
            ("top-1 prob", f"mean {stats['mean_top1_prob']:.4f}  ({stats['views_sampled']} views sampled"
                           + (f", {stats['views_skipped']} skipped as unreadable)" if stats["views_skipped"] else ")")),
            ("top-K mass", f"mean {stats['mean_topk_mass']:.4f}"),
            ("agreement", "no labels" if stats["top1_agreement"] is None
             else f"teacher top-1 = label on {100 * stats['top1_agreement']:.2f}% of views"),
        ]
        if "mean_attention_peak" in stats:
            g = info["targets"]["attention"]["grid"]
            cells = max(info["complete_views"], 1) * g * g
            lines.append(("attention", f"{g}x{g} maps: largest cell {stats['mean_attention_peak']:.3f} on average "
                                       f"(uniform {1 / (g * g):.3f}), entropy {stats['mean_attention_entropy_bits']:.2f}"
                                       f" bits (uniform {np.log2(g * g):.2f}); "
                                       f"{info['bytes_by_array'].get('attention', 0) / cells:.3f} bytes/cell on disk"))
        if stats.get("least_sure_classes"):
            lines.append(("least sure", ", ".join(f"{c['class']} ({c['mean_true_class_prob']:.2f})"
                                                  for c in stats["least_sure_classes"][:5])
                          + "  (mean probability of the true class)"))
    else:
        lines.append(("statistics", "no complete views yet"))
    if check:
        lines.append(("check", "every complete shard reads back intact"))
    if plot:
        lines.append(("plot", plot))
    w = max(len(k) for k, _ in lines)
    return [f"{k:<{w}}  {v}" for k, v in lines]


def plot_summary(summary: dict, class_names: list[str], path: str) -> None:
    """Three panels: top-1 probability, top-K mass, and per-class confidence on the true class
    (every class when there are at most 40, else the 20 the teacher is least sure of, named).
    The format follows the extension of ``path`` (png, pdf, svg, ...)."""
    fmt = check_plot_path(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arrays = summary["_arrays"]
    if not arrays:
        raise TinydistillError(f"{summary['info']['path']}: no complete views to plot")
    info = summary["info"]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].hist(arrays["top1"], bins=50, range=(0, 1), color="tab:blue")
    ax[0].set(title="teacher top-1 probability", xlabel="probability", ylabel="views")
    ax[1].hist(arrays["mass"], bins=50, range=(0, 1), color="tab:orange")
    ax[1].set(title=f"top-{info['k']} mass", xlabel="sum of top-K probabilities", ylabel="views")
    pc = arrays["per_class"]
    if np.isfinite(pc).any():
        if len(pc) <= MANY_CLASSES:
            ax[2].bar(range(len(pc)), np.nan_to_num(pc), color="tab:green")
            ax[2].set_xticks(range(len(pc)), [n[:12] for n in class_names], rotation=90, fontsize=7)
            ax[2].set(title="mean teacher probability of the true class", ylabel="probability", ylim=(0, 1))
        else:
            worst = least_sure(pc, class_names)
            seen = int(np.isfinite(pc).sum())
            y = np.arange(len(worst))[::-1]  # least sure at the top
            ax[2].barh(y, [p for _, p in worst], color="tab:red")
            ax[2].set_yticks(y, [n[:28] for n, _ in worst], fontsize=7)
            ax[2].axvline(float(np.nanmedian(pc)), color="grey", ls="--", lw=1, label="median class")
            ax[2].legend(fontsize=7, loc="lower right")
            ax[2].set(title=f"classes where the teacher is least sure\n({len(worst)} of {seen} classes)",
                      xlabel="mean teacher probability of the true class", xlim=(0, 1))
    else:
        ax[2].text(0.5, 0.5, "no ground-truth labels in store", ha="center", va="center")
        ax[2].set_axis_off()
    teacher = info["teacher"].get("name", "unknown teacher")
    fig.suptitle(f"{info['path']}  ({teacher}, {summary['stats']['views_sampled']} views sampled)")
    fig.tight_layout()
    try:
        with matplotlib.rc_context({"svg.fonttype": "none", "pdf.fonttype": 42}):  # text stays text
            fig.savefig(path, dpi=110, format=fmt)
    except OSError as e:
        raise TinydistillError(f"{path}: cannot write plot ({e.strerror or e})") from e
    finally:
        plt.close(fig)
