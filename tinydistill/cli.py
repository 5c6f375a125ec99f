"""The ``tinydistill`` command line: one click group, one subcommand per job."""

from __future__ import annotations

import json
import sys

import click

from . import __version__
from .errors import TinydistillError


class _Group(click.Group):
    """Turns every error a user can cause into a one-line message and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TinydistillError as e:
            raise click.ClickException(str(e).replace("\n", " ")) from None
        except OSError as e:
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None


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
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG: top-1 probability, top-K mass, per-class confidence.")
@click.option("--max-views", type=click.IntRange(min=1), default=200_000, show_default=True,
              help="Views read for the statistics (whole chunks, sampled across epochs).")
@click.option("--check", is_flag=True, help="Also read every complete shard in full; exit 1 if any is corrupt.")
def inspect(store, as_json, plot, max_views, check):
    """Summarise a logit store: shape, teacher, completeness, size on disk, teacher statistics.

    STORE is a local path or an fsspec URL (s3://, gs://, file://, memory://).
    """
    from .store import open_store
    from .summary import plot_summary, summarize

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
        else:
            lines.append(("statistics", "no complete views yet"))
        if check:
            lines.append(("check", "every complete shard reads back intact"))
        if plot:
            lines.append(("plot", plot))
        w = max(len(k) for k, _ in lines)
        for k, v in lines:
            click.echo(f"{k:<{w}}  {v}")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
