"""The ``tinydistill`` command line: one click group, one subcommand per job."""

from __future__ import annotations

import json
import sys

import click

from . import __version__
from .errors import TinydistillError


def _one_line(e: BaseException) -> str:
    """The user-facing line of an error; DataLoader workers wrap theirs in a traceback."""
    msg = str(e).strip()
    if "Original Traceback" in msg:  # re-raised from a DataLoader worker
        last = msg.splitlines()[-1]
        msg = last.split(": ", 1)[1] if ": " in last and "Error" in last.split(": ", 1)[0] else last
    return " ".join(msg.split())


class _Group(click.Group):
    """Turns every error a user can cause into a one-line message and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TinydistillError as e:
            raise click.ClickException(_one_line(e)) from None
        except OSError as e:
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None
        except KeyboardInterrupt:
            raise click.ClickException("interrupted; completed shards are kept, re-run the same command to resume") from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tinydistill")
def main():
    """Offline soft-label distillation: store a teacher's top-K outputs once, train students from the store."""


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


@main.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--plot", type=click.Path(dir_okay=False),
              help="Write a plot of top-1 probability, top-K mass and per-class confidence (with many "
                   "classes: the least sure ones, named). The format follows the extension: "
                   ".png, .pdf, .svg, ...")
@click.option("--max-views", type=click.IntRange(min=1), default=200_000, show_default=True,
              help="Views read for the statistics (whole chunks, sampled across epochs).")
@click.option("--check", is_flag=True, help="Also read every complete shard in full; exit 1 if any is corrupt.")
def inspect(store, as_json, plot, max_views, check):
    """Summarise a logit store: shape, teacher, completeness, size on disk, teacher statistics.

    STORE is a local path or an fsspec URL (s3://, gs://, file://, memory://).
    """
    from .store import open_store
    from .summary import check_plot_path, plot_summary, summarize

    if plot:
        check_plot_path(plot)  # a bad extension fails before the store is read
    st = open_store(store)
    bad = st.check() if check else []
    if bad:  # report every bad unit before the statistics, which would stop at the first
        for e, s, why in bad:
            click.echo(f"corrupt: epoch {e} shard {s}: {why}", err=True)
        raise click.ClickException(f"{store}: {len(bad)} corrupt unit(s) (listed above); regenerate them")
    summary = summarize(st, max_views=max_views)
    if plot:
        plot_summary(summary, st.class_names, plot)
    info, stats = summary["info"], summary["stats"]
    if as_json:
        out = {**info, "completed": summary["completed"], **stats}
        if check:
            out["check"] = "ok"
        click.echo(json.dumps(out))
    else:
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
        for k, v in lines:
            click.echo(f"{k:<{w}}  {v}")


# ---- shared options --------------------------------------------------------------------------

SECTIONS = ("gen_logits", "train_student", "verify", "quickstart")


def _load_config(ctx, param, value):
    """YAML recipe -> defaults for this command's options; the command line still wins."""
    if not value:
        return value
    import yaml

    try:
        with open(value) as f:
            raw = yaml.safe_load(f) or {}
    except OSError as e:
        raise click.BadParameter(f"{value}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise click.BadParameter(f"{value}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise click.BadParameter(f"{value}: expected a mapping of option names to values")
    flat = {}
    section = ctx.command.name.replace("-", "_")
    for k, v in raw.items():
        k = k.replace("-", "_")
        if k == "augmentation" and isinstance(v, dict):
            flat.update({kk.replace("-", "_"): vv for kk, vv in v.items()})
        elif k == section and isinstance(v, dict):
            flat.update({kk.replace("-", "_"): vv for kk, vv in v.items()})
        elif k not in SECTIONS:
            flat[k] = v
    known = {p.name for p in ctx.command.params}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise click.BadParameter(f"{value}: unknown option(s) {unknown} for {ctx.command.name}")
    ctx.default_map = {**(ctx.default_map or {}), **flat}
    return value


def config_option(f):
    return click.option("--config", type=click.Path(dir_okay=False), callback=_load_config, is_eager=True,
                        expose_value=False, help="YAML recipe; options given on the command line override it.")(f)


AUG_OPTIONS = [
    ("--img-size", dict(type=int, help="View size the store renders (consumers resize).")),
    ("--scale", dict(type=(float, float), help="RandomResizedCrop area range, e.g. 0.08 1.0.")),
    ("--ratio", dict(type=(float, float), help="RandomResizedCrop aspect range.")),
    ("--hflip", dict(type=float, help="Horizontal flip probability.")),
    ("--vflip", dict(type=float, help="Vertical flip probability.")),
    ("--color-jitter", dict(type=float, help="Colour jitter strength (0 = off; off under auto_augment).")),
    ("--auto-augment", dict(type=str, help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1.")),
    ("--interpolation", dict(type=str, help="bicubic, bilinear, random, ...")),
    ("--re-prob", dict(type=float, help="Random erasing probability.")),
    ("--re-mode", dict(type=str, help="Random erasing fill: const, rand, pixel.")),
    ("--re-count", dict(type=int, help="Random erasing max count.")),
    ("--mixup", dict(type=float, help="Mixup Beta alpha (0 = off).")),
    ("--cutmix", dict(type=float, help="CutMix Beta alpha (0 = off).")),
    ("--mix-prob", dict(type=float, help="Probability a view is mixed.")),
    ("--switch-prob", dict(type=float, help="Probability of CutMix over Mixup when both are on.")),
    ("--mix-group", dict(type=int, help="Rows per mix-pairing group (power of two, divides chunk rows).")),
]


def aug_options(f):
    for name, kw in reversed(AUG_OPTIONS):
        f = click.option(name, default=None, show_default=False, **kw)(f)
    return f


def spec_from_options(opts: dict):
    from .augment import AugSpec

    fields = {n.lstrip("-").replace("-", "_") for n, _ in AUG_OPTIONS}
    given = {k: opts.pop(k) for k in list(opts) if k in fields}
    return AugSpec.from_dict({k: v for k, v in given.items() if v is not None}, source="augmentation options")


def _kv(pairs) -> dict:
    """KEY=VALUE strings (or a mapping from a YAML recipe) -> dict, values parsed as YAML scalars."""
    import yaml

    if isinstance(pairs, dict):
        return dict(pairs)
    out = {}
    for p in pairs or ():
        if "=" not in p:
            raise click.BadParameter(f"{p}: expected KEY=VALUE", param_hint="--model-kwargs")
        k, v = p.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _setup_logging(rank0: bool = True):
    """tinydistill's own messages to stderr (other libraries keep their own handlers)."""
    import logging

    log = logging.getLogger("tinydistill")
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("tinydistill: %(message)s"))
        log.addHandler(h)
        log.propagate = False
    log.setLevel(logging.INFO if rank0 else logging.WARNING)


# ---- gen-logits ----------------------------------------------------------------------------------

@main.command("gen-logits")
@config_option
@click.option("--data", required=True, help="SRC: ImageFolder directory, webdataset shards, or digits[:train|:val].")
@click.option("--teacher", required=True, help="timm model name, timm:NAME, an alias (see `tinydistill teachers`), or open_clip:ARCH/PRETRAINED.")
@click.option("--k", type=click.IntRange(min=1), default=10, show_default=True, help="Classes kept per view.")
@click.option("--epochs", default="1", show_default=True, help="E (epochs 0..E-1) or a range A:B, so several jobs can fill one store.")
@click.option("--total-epochs", type=click.IntRange(min=1), help="Epochs the store holds when it is created by a job filling a range.")
@click.option("--out", required=True, help="Store path or URL (s3://, gs://, file://).")
@click.option("--teacher-weights", type=click.Path(dir_okay=False), help="Local checkpoint or .safetensors state_dict.")
@click.option("--teacher-input-size", type=click.IntRange(min=1), help="Teacher input size [default: its pretrained config's].")
@click.option("--seed", type=int, default=0, show_default=True, help="Base seed of every view.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=4, show_default=True, help="DataLoader workers.")
@click.option("--device", default=None, help="cpu or cuda [default: cuda when available].")
@click.option("--amp", type=click.Choice(["bf16", "fp16", "none"]), default=None, help="[default: bf16 on cuda, none on cpu]")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the teacher.")
@click.option("--chunk-rows", type=click.IntRange(min=2), default=4096, show_default=True)
@click.option("--shard-rows", type=click.IntRange(min=2), default=None, help="Rows per shard (the unit of work) [default: 16 chunks].")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images (counted, recorded in the store) instead of stopping.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store instead of resuming it.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@aug_options
def gen_logits_cmd(**opts):
    """Run a teacher once over every view of every epoch and store its top-K outputs.

    Re-running the same command resumes. Under torchrun, rank 0 creates the store and the
    (epoch, shard) units are split across ranks. Prints a one-line JSON summary on stdout.
    """
    from .generate import GenConfig, gen_logits, parse_epochs, summary_line

    spec = spec_from_options(opts)
    device = opts["device"] or _default_device()
    amp = opts["amp"] or ("bf16" if device.startswith("cuda") else "none")
    rank = int(__import__("os").environ.get("RANK", 0))
    _setup_logging(rank == 0)
    cfg = GenConfig(
        data=opts["data"], teacher=opts["teacher"], out=opts["out"], k=opts["k"],
        epochs=parse_epochs(opts["epochs"]), total_epochs=opts["total_epochs"],
        teacher_weights=opts["teacher_weights"], teacher_input_size=opts["teacher_input_size"], seed=opts["seed"], batch_size=opts["batch_size"],
        workers=opts["workers"], device=device, amp=amp, spec=spec, overwrite=opts["overwrite"],
        skip_bad=opts["skip_bad"], compile=opts["compile_"], chunk_rows=opts["chunk_rows"],
        shard_rows=opts["shard_rows"], progress=not opts["no_progress"],
    )
    summary = gen_logits(cfg)
    if summary["rank"] == 0:
        click.echo(summary_line(summary))


@main.command()
@click.argument("store")
@click.option("--data", required=True, help="SRC the store was made from.")
@click.option("--teacher", required=True, help="The teacher the store was made with.")
@click.option("--teacher-weights", type=click.Path(dir_okay=False))
@click.option("--samples", type=click.IntRange(min=1), default=64, show_default=True, help="Random views to replay.")
@click.option("--seed", type=int, default=0, show_default=True, help="Which random views.")
@click.option("--device", default=None, help="[default: cuda when available]")
@click.option("--amp", type=click.Choice(["bf16", "fp16", "none"]), default=None, help="[default: the store's]")
@click.option("--max-logp-diff", type=float, default=0.0, show_default=True,
              help="Largest allowed |delta log-prob| (after fp16 rounding). 0 = exact: same hardware and dtype.")
@click.option("--min-id-agreement", type=float, default=1.0, show_default=True,
              help="Smallest allowed fraction of views with the same top-K class ids.")
def verify(store, data, teacher, teacher_weights, samples, seed, device, amp, max_logp_diff, min_id_agreement):
    """Replay random stored views, re-run the teacher and compare with the store.

    Exits 1 when the agreement is below --min-id-agreement or the largest difference is above
    --max-logp-diff. On the hardware, dtype and thread count that made the store the
    default tolerance (exact) holds.
    """
    from .verify import verify_store

    _setup_logging()
    r = verify_store(store, data, teacher, teacher_weights, samples=samples, seed=seed,
                     device=device or _default_device(), amp=amp)
    click.echo(json.dumps(r))
    if r["topk_id_agreement"] < min_id_agreement or r["max_abs_logp_diff"] > max_logp_diff:
        raise click.ClickException(
            f"{store}: top-K ids agree on {100 * r['topk_id_agreement']:.2f}% of {r['views_checked']} views "
            f"(need {100 * min_id_agreement:.2f}%), largest |delta log-prob| {r['max_abs_logp_diff']:.3g} "
            f"(allowed {max_logp_diff:g})")


# ---- train-student -------------------------------------------------------------------------------

@main.command("train-student")
@config_option
@click.option("--logits", help="The logit store (offline KD). Not with --no-kd / --online-teacher.")
@click.option("--data", required=True, help="SRC the store was made from (training data).")
@click.option("--student", required=True, help="timm model name (randomly initialised).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for checkpoints and metrics.")
@click.option("--val-data", help="SRC evaluated (top-1/top-5) after every epoch.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--min-lr", type=float, default=1e-6, show_default=True)
@click.option("--weight-decay", type=float, default=0.05, show_default=True)
@click.option("--warmup-epochs", type=float, default=1.0, show_default=True)
@click.option("--opt", default="adamw", show_default=True, help="timm optimizer name.")
@click.option("--clip-grad", type=float, default=5.0, show_default=True, help="Max gradient norm (0 = off).")
@click.option("--drop-path", type=float, default=0.0, show_default=True)
@click.option("--ema", type=float, is_flag=False, flag_value=0.9998, default=None,
              help="Keep an EMA of the weights (ModelEmaV3); --ema alone uses decay 0.9998.")
@click.option("--amp", type=click.Choice(["bf16", "fp16", "none"]), default=None, help="[default: bf16 on cuda, none on cpu]")
@click.option("--workers", type=click.IntRange(min=0), default=4, show_default=True)
@click.option("--device", default=None, help="cpu or cuda [default: cuda when available].")
@click.option("--seed", type=int, default=0, show_default=True, help="Student init and batch order.")
@click.option("--resume", is_flag=True, help="Continue from DIR/last.pth (model, optimizer, scheduler, EMA, epoch, step).")
@click.option("--cycle-epochs", is_flag=True, help="Reuse the store's epochs when --epochs exceeds them.")
@click.option("--loss", type=click.Choice(["soft_ce", "kl", "hard"]), default="soft_ce", show_default=True,
              help="soft_ce: TinyViT; kl: KL with temperature; hard: DeiT hard distillation.")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--alpha", type=float, default=1.0, show_default=True, help="Weight of the teacher term; 1 - alpha goes to ground truth.")
@click.option("--smoothing", type=float, default=0.1, show_default=True, help="Label smoothing for --no-kd.")
@click.option("--no-kd", is_flag=True, help="Baseline: supervised on ground-truth labels, no store.")
@click.option("--online-teacher", help="Baseline: the same loss with this teacher run every step.")
@click.option("--teacher-weights", type=click.Path(dir_okay=False), help="Weights of --online-teacher.")
@click.option("--teacher-input-size", type=click.IntRange(min=1))
@click.option("--k", type=click.IntRange(min=1), help="Online teacher: classes kept [default: all].")
@click.option("--view-seed", type=int, help="Base seed of views for --no-kd/--online-teacher [default: --seed].")
@click.option("--unit-rows", type=click.IntRange(min=2), help="--no-kd/--online-teacher: rows per work unit (a store uses its chunk rows).")
@click.option("--input-size", type=click.IntRange(min=1), help="Student input size [default: the views' size].")
@click.option("--model-kwargs", multiple=True, metavar="KEY=VALUE",
              help="Extra timm.create_model argument for the student, e.g. patch_size=4 (repeatable).")
@click.option("--num-classes", type=click.IntRange(min=1), help="Student classes; must match the store's.")
@click.option("--val-crop-pct", type=float, help="Eval centre-crop fraction [default: the student's].")
@click.option("--no-progress", is_flag=True)
@aug_options
def train_student_cmd(**opts):
    """Train a timm student from a logit store: the same views, sparse targets, no teacher.

    --no-kd and --online-teacher run the same loop without a store, as baselines. Writes
    last.pth/best.pth, metrics.jsonl (per epoch) and steps.jsonl (per step) in --out.
    """
    from .train import TrainConfig, TrainError, train_student

    ctx = click.get_current_context()
    aug_names = [n.lstrip("-").replace("-", "_") for n, _ in AUG_OPTIONS]
    on_cli = [n for n in aug_names if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]
    in_recipe = [n for n in aug_names if ctx.get_parameter_source(n) == click.core.ParameterSource.DEFAULT_MAP]
    if opts["logits"] and on_cli:
        raise TrainError("augmentation options are for --no-kd/--online-teacher: a store replays its own views")
    spec = spec_from_options(opts)
    device = opts["device"] or _default_device()
    rank = int(__import__("os").environ.get("RANK", 0))
    _setup_logging(rank == 0)
    cfg = TrainConfig(
        data=opts["data"], student=opts["student"], out=opts["out"], logits=opts["logits"], val_data=opts["val_data"],
        epochs=opts["epochs"], batch_size=opts["batch_size"], lr=opts["lr"], min_lr=opts["min_lr"],
        weight_decay=opts["weight_decay"], warmup_epochs=opts["warmup_epochs"], opt=opts["opt"],
        clip_grad=opts["clip_grad"] or None, drop_path=opts["drop_path"], ema=opts["ema"],
        amp=opts["amp"] or ("bf16" if device.startswith("cuda") else "none"), workers=opts["workers"], device=device,
        seed=opts["seed"], resume=opts["resume"], cycle_epochs=opts["cycle_epochs"], no_kd=opts["no_kd"],
        online_teacher=opts["online_teacher"], teacher_weights=opts["teacher_weights"],
        teacher_input_size=opts["teacher_input_size"], k=opts["k"], loss=opts["loss"], temperature=opts["temperature"],
        alpha=opts["alpha"], smoothing=opts["smoothing"], input_size=opts["input_size"],
        num_classes=opts["num_classes"], val_crop_pct=opts["val_crop_pct"], spec=spec, view_seed=opts["view_seed"], unit_rows=opts["unit_rows"],
        model_kwargs=_kv(opts["model_kwargs"]), expect_spec=bool(opts["logits"] and in_recipe),
        progress=not opts["no_progress"],
    )
    summary = train_student(cfg)
    if rank == 0:
        click.echo(json.dumps(summary))


# ---- quickstart -----------------------------------------------------------------------------------

@main.command()
@click.option("--out", default="runs/quickstart", show_default=True, type=click.Path(file_okay=False),
              help="Directory for every artefact: teacher, store, students, results.json, quickstart.png.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True, help="Epochs of views stored and of student training.")
@click.option("--teacher-epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--device", default=None, help="[default: cuda when available]")
@click.option("--no-progress", is_flag=True)
def quickstart(out, seed, epochs, teacher_epochs, workers, device, no_progress):
    """The whole pipeline on the built-in digits: teacher, gen-logits, three students, a table and a plot."""
    from .quickstart import quickstart as run, table

    _setup_logging()
    r = run(out, seed=seed, epochs=epochs, teacher_epochs=teacher_epochs, workers=workers,
            device=device or _default_device(), progress=not no_progress)
    click.echo(table(r))
    click.echo(f"results: {out}/results.json  plot: {out}/quickstart.png")


@main.command()
def teachers():
    """List teacher aliases and the other ways to name a teacher."""
    from .teachers import ALIASES

    w = max(len(a) for a in ALIASES)
    for alias, name in ALIASES.items():
        click.echo(f"{alias:<{w}}  timm:{name}")
    click.echo("\nAlso: any timm model name (bare or timm:NAME), with --teacher-weights for local weights;"
               "\n      open_clip:ARCH/PRETRAINED, a zero-shot classifier over the data's class names"
               " (pip install 'tinydistill[clip]').")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
