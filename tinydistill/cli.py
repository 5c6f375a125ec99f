"""The ``tinydistill`` command line: one click group, one subcommand per job."""

from __future__ import annotations

import json
import os
import sys

import click

from . import __version__
from .augment import AugSpec
from .config import GenConfig, TrainConfig, VerifyConfig
from .options import RecipeError, cli_names, click_options, flags_in, from_options, load_recipe
from .errors import Stopped, TinydistillError


def _one_line(e: BaseException) -> str:
    """The user-facing line of an error; DataLoader workers wrap theirs in a traceback."""
    msg = str(e).strip()
    if "Original Traceback" in msg:  # re-raised from a DataLoader worker
        last = msg.splitlines()[-1]
        msg = last.split(": ", 1)[1] if ": " in last and "Error" in last.split(": ", 1)[0] else last
    return " ".join(msg.split())


class _Exit(click.ClickException):
    """A one-line message with its own exit status (a run stopped by a signal: 128 + its number)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class _Group(click.Group):
    """Turns every error a user can cause into a one-line message and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Stopped as e:  # kept its work and said so: 143 after SIGTERM, 130 after SIGINT, as a killed process
            raise _Exit(flags_in(_one_line(e)), 128 + e.signum) from None
        except TinydistillError as e:
            err = click.ClickException(flags_in(_one_line(e)))
            err.exit_code = getattr(e, "exit_code", 1)  # 128 + signal for a run stopped by one
            raise err from None
        except OSError as e:
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None
        except KeyboardInterrupt:
            raise click.ClickException("interrupted; completed shards are kept, re-run the same command to resume") from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tinydistill")
def main():
    """Offline soft-label distillation: store a teacher's top-K outputs once, train students from the store."""


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
@click.option("--params", "n_params", type=click.IntRange(min=1), metavar="N",
              help="Also print the parameter records of N views (needs --data): crop, flips, ops, erasing, mix.")
@click.option("--attention", "attention_png", type=click.Path(dir_okay=False), metavar="PNG",
              help="Stores with attention maps: write N views (--params N, default 8) with the teacher's map laid "
                   "over each (needs --data).")
@click.option("--data", help="SRC the store was made from (for --params and --attention).")
@click.option("--epoch", type=click.IntRange(min=0), default=0, show_default=True,
              help="Epoch of the --params / --attention views.")
def inspect(store, as_json, plot, max_views, check, n_params, attention_png, data, epoch):
    """Summarise a logit store: shape, teacher, completeness, size on disk, teacher statistics.

    STORE is a local path or an fsspec URL (s3://, gs://, file://, memory://).
    """
    from .store import open_store
    from .summary import check_plot_path, plot_summary, summarize, summary_lines

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
        for line in summary_lines(summary, check=check, plot=plot):
            click.echo(line)
    if n_params:
        for r in _spread_rows(st, data, epoch, n_params, "--params"):
            p = st.view(epoch, int(r), data=data).params
            click.echo(json.dumps(p.to_dict()) if as_json else p.summary())
    if attention_png:
        _attention_sheet(st, data, epoch, n_params or 8, attention_png)
        if not as_json:
            click.echo(f"attention views: {attention_png}")


def _spread_rows(st, data, epoch: int, n: int, option: str):
    """n rows spread over the store, after checking the options that views need."""
    if not data:
        raise click.UsageError(f"{option} needs --data SRC (the data the store was made from)")
    if epoch >= st.epochs:
        raise click.BadParameter(f"{epoch}: the store holds epochs 0..{st.epochs - 1}", param_hint="--epoch")
    import numpy as np

    return np.unique(np.linspace(0, st.num_rows - 1, num=min(n, st.num_rows)).round().astype(int))


def _attention_sheet(st, data, epoch: int, n: int, path: str) -> None:
    """A PNG of n views of one epoch, each beside itself under the teacher's attention map."""
    import io

    from PIL import Image

    if st.kind("attention") is None:
        raise click.ClickException(f"{st.path}: holds no attention maps (made without gen-logits --attention-grid)")
    pics = [st.view(epoch, int(r), data=data) for r in _spread_rows(st, data, epoch, n, "--attention")]
    tiles = [Image.open(io.BytesIO(v._repr_png_())) for v in pics]
    cols = min(4, len(tiles))
    w, h = max(t.width for t in tiles), max(t.height for t in tiles)
    sheet = Image.new("RGB", (cols * w, -(-len(tiles) // cols) * h), "white")
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % cols) * w, (i // cols) * h))
    try:
        sheet.save(path, format="PNG")
    except (OSError, ValueError) as e:
        raise click.ClickException(f"{path}: cannot write the picture ({e})") from None


# ---- shared options --------------------------------------------------------------------------

def _load_config(ctx, param, value):
    """YAML recipe -> defaults for this command's options; the command line still wins."""
    if not value:
        return value
    try:
        flat = load_recipe(value, ctx.command.name, known={p.name for p in ctx.command.params})
    except RecipeError as e:
        raise click.BadParameter(str(e)) from None
    ctx.default_map = {**(ctx.default_map or {}), **flat}
    return value


def config_option(f):
    return click.option("--config", type=click.Path(dir_okay=False), callback=_load_config, is_eager=True,
                        expose_value=False, help="YAML recipe; options given on the command line override it.")(f)


def spec_from_options(opts: dict):
    """Pop the augmentation options out of a command's values: an AugSpec of those given."""
    given = {k: opts.pop(k) for k in cli_names(AugSpec) if k in opts}
    return AugSpec.from_dict({k: v for k, v in given.items() if v is not None}, source="augmentation options")


def _default_device() -> str:
    from .dist import default_device  # imports torch: only when a command runs

    return default_device()


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
@click_options(GenConfig)
@click_options(AugSpec, defaults=False)
def gen_logits_cmd(**opts):
    """Run a teacher once over every view of every epoch and store its top-K outputs.

    Re-running the same command resumes. Under torchrun, rank 0 creates the store and the
    work is split across ranks. Prints a one-line JSON summary on stdout.
    """
    from .generate import gen_logits, summary_line

    rank = int(os.environ.get("RANK", 0))
    _setup_logging(rank == 0)
    summary = gen_logits(from_options(GenConfig, opts, spec=spec_from_options(opts)))
    if summary["rank"] == 0:
        click.echo(summary_line(summary))


@main.command()
@click.argument("store")
@config_option
@click_options(VerifyConfig)
def verify(store, **opts):
    """Replay random stored views, re-run the teacher and compare with the store.

    Exits 1 when the agreement is below --min-id-agreement or the largest difference is above
    --max-logp-diff (or, for a store with attention maps, --max-attention-diff). On the hardware, dtype and thread count that made the store the
    default tolerance (exact) holds.
    """
    from .verify import verify_store

    _setup_logging()
    c = from_options(VerifyConfig, opts)
    r = verify_store(store, c.data, c.teacher, c.teacher_weights, samples=c.samples, seed=c.seed,
                     device=c.device or _default_device(), amp=c.amp, render=c.render,
                     allow_renderer_change=c.allow_renderer_change, decode=c.decode)
    click.echo(json.dumps(r))
    maps = r.get("max_abs_attention_diff", 0.0)
    if (r["topk_id_agreement"] < c.min_id_agreement or r["max_abs_logp_diff"] > c.max_logp_diff
            or maps > c.max_attention_diff):
        raise click.ClickException(
            f"{store}: top-K ids agree on {100 * r['topk_id_agreement']:.2f}% of {r['views_checked']} views "
            f"(need {100 * c.min_id_agreement:.2f}%), largest |delta log-prob| {r['max_abs_logp_diff']:.3g} "
            f"(allowed {c.max_logp_diff:g})"
            + (f", largest |delta attention| {maps:.3g} (allowed {c.max_attention_diff:g})"
               if "max_abs_attention_diff" in r else ""))


# ---- train-student -------------------------------------------------------------------------------

@main.command("train-student")
@config_option
@click_options(TrainConfig)
@click_options(AugSpec, exclude=("renderer",), defaults=False)
def train_student_cmd(**opts):
    """Train a timm student from a logit store: the same views, sparse targets, no teacher.

    --no-kd and --online-teacher run the same loop without a store, as baselines. Writes
    last.pth/best.pth, metrics.jsonl (per epoch) and steps.jsonl (per step) in --out.
    """
    from .train import TrainError, train_student

    ctx = click.get_current_context()
    aug_names = [n for n in cli_names(AugSpec) if n != "renderer"]
    on_cli = [n for n in aug_names if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]
    in_recipe = [n for n in aug_names if ctx.get_parameter_source(n) == click.core.ParameterSource.DEFAULT_MAP]
    if (opts["logits"] or opts["like"]) and on_cli:
        raise TrainError("augmentation options are for `no_kd`/`online_teacher` without `like`: "
                         "a store replays its own views")
    rank = int(os.environ.get("RANK", 0))
    _setup_logging(rank == 0)
    cfg = from_options(TrainConfig, opts, spec=spec_from_options(opts), expect_spec=bool(opts["logits"] and in_recipe))
    from .signals import stop_on_signals

    try:
        with stop_on_signals() as stop:  # SIGTERM / Ctrl-C: a checkpoint at the step, then one line (Stopped)
            summary = train_student(cfg, stop=stop)
    except KeyboardInterrupt:  # during set-up, before anything was trained
        raise _Exit(f"{cfg.out}: interrupted before training began: nothing new kept", 130) from None
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


# ---- index-tars ----------------------------------------------------------------------------------

@main.command("index-tars")
@click.argument("src")
@click.option("--cache", "to_cache", is_flag=True,
              help="Write the indexes to $TINYDISTILL_CACHE/tarindex/ instead of beside the tars (for tars in a "
                   "folder you cannot write; the cache must then be shared by every rank that reads them).")
def index_tars_cmd(src, to_cache):
    """Index webdataset tars once, so no rank scans them: writes SHARD.tar.idx beside each tar.

    Under torchrun each rank indexes its share of the tars (no process group is needed); a tar
    whose index is already valid is skipped, so the command can be run again after adding tars.
    """
    from webdataset.shardlists import expand_urls

    from .dist import rank_world
    from .tarindex import ShardError, index_tars

    urls = [u for u in expand_urls(src) if ".tar" in u]
    if not urls or any(u.startswith("pipe:") for u in urls):
        raise ShardError(f"{src}: not webdataset .tar shards that can be indexed (pipe: shards cannot seek)")
    rank, world = rank_world()
    out = index_tars(urls, rank, world, beside=not to_cache)
    click.echo(f"rank {rank}/{world}: {out['indexed']} tars indexed, {out['valid']} already indexed, "
               f"of {len(urls[rank::world])} ({len(urls)} in all)")


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
