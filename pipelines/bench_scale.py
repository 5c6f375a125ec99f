"""What grows with the data set, per process: memory and start-up of both stages' data path at
N = 100k, 400k and 1.6M rows, fitted and extrapolated to ImageNet-1k and ImageNet-21k on 8 x 8 GPUs.

Sources are cheap and synthetic: an ImageFolder of hard links to tiny JPEGs (ImageNet-like
names, 1,000 class folders), and webdataset tars of tiny JPEG + cls samples (one 5,000-sample
tar hard-linked under many shard names, with indexes beside them; the same tars without
indexes at the smallest N). Each (source, N) is measured in a fresh process:

- the main process: resident (Rss) and private (Private_Dirty) memory from
  /proc/self/smaps_rollup after opening the source and taking its fingerprint (what every
  rank of both stages does), over the same process before;
- time from start (open) to the first batch out of a DataLoader with long-lived workers
  (fork, as on Linux), each holding the view core of both stages (:class:`Views` over the
  source), which renders a first batch and then reads a share of the rows (``--share`` of
  them each, spread over the whole data set, as a long run's workers do over its epochs);
- each worker's Private_Dirty after that work: pages copy-on-write made private.

The stored-targets half (``chunk_share_x_world``, ``inspect_requests_per_object`` and more)
comes from ``pipelines/scale_targets.py`` when it is present (its ``run(n, workdir, smoke)``),
merged per N; without it those figures say "not measured".

    python pipelines/bench_scale.py --out bench_scale.json          # 100k, 400k, 1.6M rows
    python pipelines/bench_scale.py --smoke                         # 20k, 40k, 80k: checks the script
                                                                    # (its per-row figures are noise at those sizes)
    python pipelines/bench_scale.py --compare-with /path/to/other/checkout   # that code, same data
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import benchlib  # noqa: E402

TARGETS = {"imagenet-1k": 1_281_167, "imagenet-21k": 13_000_000}
NODES, GPUS, WORKERS = 8, 8, 8  # the users' scale: 8 nodes x 8 GPUs, 8 DataLoader workers per rank
GOALS = {"resident_bytes_per_row": 40, "worker_private_bytes_per_row": 4, "start_s_at_21k": 60}


# ---- data -----------------------------------------------------------------------------------------

def tiny_jpeg(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def make_folder(root: Path, n: int, classes: int, base: Path) -> str:
    """``n`` hard links to one tiny JPEG per class, ImageNet-style names, ``classes`` folders."""
    if (root / ".done").exists():
        return str(root)
    base.mkdir(parents=True, exist_ok=True)
    for c in range(classes):
        src = base / f"{c}.JPEG"
        if not src.exists():
            src.write_bytes(tiny_jpeg(c))
        d = root / f"n{c:08d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(c, n, classes):
            os.link(src, d / f"n{c:08d}_{i}.JPEG")
    (root / ".done").write_text("")
    return str(root)


def make_template_tar(path: Path, per: int, classes: int) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(per):
            c = i % classes
            for name, data in ((f"n{c:08d}_{i}.jpg", tiny_jpeg(i % 97)), (f"n{c:08d}_{i}.cls", str(c).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def make_tars(root: Path, n: int, template: Path, per: int, indexed: bool) -> str:
    """``n // per`` shard names hard-linked to one template tar (keys are shard/key: unique),
    each with the template's index hard-linked beside it when ``indexed``."""
    shards = max(1, n // per)
    if not (root / ".done").exists():
        root.mkdir(parents=True, exist_ok=True)
        for s in range(shards):
            os.link(template, root / f"shard-{s:05d}.tar")
            if indexed:
                os.link(str(template) + ".idx", root / f"shard-{s:05d}.tar.idx")
        (root / ".done").write_text("")
    return str(root / f"shard-{{00000..{shards - 1:05d}}}.tar")


# ---- one measurement, in a fresh process ----------------------------------------------------------

def smaps() -> dict:
    """Bytes of this process from /proc/self/smaps_rollup (Rss, Pss, Private_Dirty, ...)."""
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[-1] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def table_bytes(obj) -> tuple[int, int]:
    """(Python objects reachable from ``obj``, bytes they hold), numpy buffers counted once by size."""
    import types

    seen, todo, nbytes = set(), [obj], 0
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)
    while todo:
        o = todo.pop()
        if id(o) in seen or isinstance(o, skip):
            continue
        seen.add(id(o))
        nbytes += o.nbytes if isinstance(o, np.ndarray) and o.base is None else sys.getsizeof(o)
        todo.extend(gc.get_referents(o))
    return len(seen), nbytes


def child(path: str, workers: int, share: float, batch: int) -> dict:
    import torch
    from torch.utils.data import DataLoader, IterableDataset, get_worker_info

    from tinydistill.augment import AugSpec
    from tinydistill.sources import open_source
    from tinydistill.views import Views

    class Worker(IterableDataset):
        """A long-lived worker: a first batch of views, then a share of the rows read."""

        def __init__(self, core):
            self.core = core

        def __iter__(self):
            w = get_worker_info()
            wid, nw = (w.id, w.num_workers) if w else (0, 1)
            m0 = smaps()
            n = len(self.core.source)
            yield {"first": wid, "batch": self.core.render(0, list(range(wid * batch, min(n, (wid + 1) * batch))))}
            step = max(1, int(round(1 / share)))
            rows = np.arange(wid, n, step)
            t = time.perf_counter()
            for lo in range(0, len(rows), 256):
                for _ in self.core.source.read_encoded(rows[lo:lo + 256].tolist()):
                    pass
                self.core.source.labels[rows[lo:lo + 256]].sum()
            gc.collect()  # as a long-lived worker's collector does, sooner or later
            yield {"mem": wid, "start": m0, "end": smaps(), "rows": len(rows), "read_s": time.perf_counter() - t}

    torch.set_num_threads(1)
    Views(open_source("digits:val"), AugSpec(img_size=16, renderer="pil"), base_seed=0).render(0, [0, 1])  # imports
    gc.collect()
    base = smaps()
    t0, c0 = time.perf_counter(), time.process_time()
    src = open_source(path)
    t_open, c_open = time.perf_counter() - t0, time.process_time() - c0
    fp = src.fingerprint
    t_fp, c_fp = time.perf_counter() - t0 - t_open, time.process_time() - c0 - c_open
    gc.collect()
    opened = smaps()
    objects, held = table_bytes(src)
    core = Views(src, AugSpec(img_size=16, renderer="pil"), base_seed=0)
    dl = DataLoader(Worker(core), batch_size=None, num_workers=workers)
    it = iter(dl)
    first = next(it)
    t_first = time.perf_counter() - t0
    mems = [m for m in it if "mem" in m]
    return {"rows": len(src), "open_s": t_open, "fingerprint_s": t_fp, "open_cpu_s": c_open, "fingerprint_cpu_s": c_fp, "first_batch_s": t_first,
            "first_batch_rows": len(first["batch"]), "fingerprint": fp[:12],
            "main_rss_growth": opened["Rss"] - base["Rss"],
            "main_private_growth": opened["Private_Dirty"] - base["Private_Dirty"],
            "main_anonymous_growth": opened["Anonymous"] - base["Anonymous"],
            "source_objects": objects, "source_bytes": held,
            "workers": [{"private_dirty": m["end"]["Private_Dirty"], "rss": m["end"]["Rss"],
                         "private_dirty_growth": m["end"]["Private_Dirty"] - m["start"]["Private_Dirty"],
                         "rows_read": m["rows"], "read_s": m["read_s"]} for m in mems],
            "index_stats": getattr(src, "index_stats", None)}


def run_child(path: str, args, env_extra: dict, pythonpath: str) -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", **env_extra}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, __file__, "--child", path, "--workers", str(args.workers), "--share", str(args.share)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"child failed on {path}:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- fits -----------------------------------------------------------------------------------------

def fit(ns, ys) -> dict:
    """Least-squares line y = a + b N, and the growth exponent (slope of log y over log N; None
    when some y <= 0, i.e. nothing measurable grows)."""
    ns, ys = np.asarray(ns, float), np.asarray(ys, float)
    b, a = np.polyfit(ns, ys, 1)
    exp = float(np.polyfit(np.log(ns), np.log(ys), 1)[0]) if (ys > 0).all() else None
    return {"per_row": float(b), "intercept": float(a), "exponent": exp}


def summarise(per_n: dict, kinds: list[str]) -> dict:
    ns = sorted(int(n) for n in per_n)
    out = {"resident_bytes_per_row": {}, "main_private_bytes_per_row": {}, "worker_private_bytes_per_row": {},
           "startup_us_per_row": {}, "open_us_per_row": {}, "growth_exponent": {}, "fits": {}, "extrapolation": {}}
    for k in kinds:
        rows = [per_n[str(n)][k] for n in ns]
        f = {"resident": fit(ns, [r["main_rss_growth"] for r in rows]),
             "main_private": fit(ns, [r["main_private_growth"] for r in rows]),
             "source_bytes": fit(ns, [r["source_bytes"] for r in rows]),
             "source_objects": fit(ns, [r["source_objects"] for r in rows]),
             "worker_private_growth": fit(ns, [max(w["private_dirty_growth"] for w in r["workers"]) for r in rows]),
             "worker_private": fit(ns, [max(w["private_dirty"] for w in r["workers"]) for r in rows]),
             "startup_s": fit(ns, [r["first_batch_s"] for r in rows]),
             "open_s": fit(ns, [r["open_s"] + r["fingerprint_s"] for r in rows]),
             "open_cpu_s": fit(ns, [r["open_cpu_s"] for r in rows]),
             "open_fingerprint_cpu_s": fit(ns, [r["open_cpu_s"] + r["fingerprint_cpu_s"] for r in rows])}
        out["fits"][k] = f
        out["resident_bytes_per_row"][k] = f["resident"]["per_row"]
        out["main_private_bytes_per_row"][k] = f["main_private"]["per_row"]
        out.setdefault("source_bytes_per_row", {})[k] = f["source_bytes"]["per_row"]
        out.setdefault("source_objects_per_row", {})[k] = f["source_objects"]["per_row"]
        out["worker_private_bytes_per_row"][k] = f["worker_private"]["per_row"]
        out["startup_us_per_row"][k] = f["startup_s"]["per_row"] * 1e6
        out["open_us_per_row"][k] = f["open_s"]["per_row"] * 1e6
        out.setdefault("open_cpu_us_per_row", {})[k] = f["open_cpu_s"]["per_row"] * 1e6
        out.setdefault("open_fingerprint_cpu_us_per_row", {})[k] = f["open_fingerprint_cpu_s"]["per_row"] * 1e6
        out["growth_exponent"][k] = {m: f[m]["exponent"] for m in f}
        for name, n in TARGETS.items():
            rank = max(0.0, f["resident"]["per_row"]) * n
            worker = max(0.0, f["worker_private"]["per_row"]) * n
            out["extrapolation"].setdefault(name, {})[k] = {
                "rows": n, "rank_resident_growth_GB": rank / 1e9, "worker_private_growth_GB": worker / 1e9,
                "node_GB": GPUS * (rank + WORKERS * worker) / 1e9,
                "start_to_first_batch_s": f["startup_s"]["intercept"] + f["startup_s"]["per_row"] * n,
                "world": NODES * GPUS, "workers_per_rank": WORKERS}
    return out


def targets_half(n: int, workdir: Path, smoke: bool) -> dict:
    try:
        import scale_targets  # noqa: F401  (pipelines/scale_targets.py: the stored-targets side)
    except ImportError:
        return {"status": "not measured (pipelines/scale_targets.py is absent)"}
    d = workdir / f"targets-{n}"
    d.mkdir(parents=True, exist_ok=True)
    return scale_targets.run(n, str(d), smoke)


# ---- main -----------------------------------------------------------------------------------------

def table(res: dict, kinds: list[str]) -> str:
    s = res["summary"]
    lines = ["| source | source's arrays B/row (objects/row) | open CPU us/row | open + fingerprint CPU us/row | open + fingerprint wall us/row | start-to-first-batch us/row | main resident B/row | main private B/row | "
             "worker private B/row | exponent (resident, start) |", "|---|---|---|---|---|---|---|"]
    for k in kinds:
        e = s["growth_exponent"][k]
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"| {k} | {s['source_bytes_per_row'][k]:.1f} ({s['source_objects_per_row'][k]:.5f}) | "
                     f"{s['open_cpu_us_per_row'][k]:.2f} | {s['open_fingerprint_cpu_us_per_row'][k]:.2f} | "
                     f"{s['open_us_per_row'][k]:.2f} | {s['startup_us_per_row'][k]:.2f} | "
                     f"{s['resident_bytes_per_row'][k]:.1f} | {s['main_private_bytes_per_row'][k]:.1f} | "
                     f"{s['worker_private_bytes_per_row'][k]:.2f} | {fmt(e['resident'])}, {fmt(e['startup_s'])} |")
    lines += ["", "| extrapolated (8 x 8 GPUs, 8 workers a rank) | source | growth per rank | private growth per worker "
              "| per node | start to first batch |", "|---|---|---|---|---|---|"]
    for name, by in s["extrapolation"].items():
        for k, x in by.items():
            lines.append(f"| {name} ({x['rows']:,} rows) | {k} | {x['rank_resident_growth_GB']:.3f} GB | "
                         f"{x['worker_private_growth_GB']:.4f} GB | {x['node_GB']:.2f} GB | {x['start_to_first_batch_s']:.1f} s |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="20k, 40k, 80k rows, 100 classes: checks the script (< 5 min)")
    ap.add_argument("--sizes", default=None, help="comma-separated N (default 100000,400000,1600000)")
    ap.add_argument("--workers", type=int, default=2, help="long-lived DataLoader workers per measured process")
    ap.add_argument("--share", type=float, default=0.05, help="share of the rows each worker reads")
    ap.add_argument("--workdir", default=None, help="where the synthetic data goes (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir")
    ap.add_argument("--compare-with", default=None, help="also measure the tinydistill checkout at this path")
    ap.add_argument("--compare-kinds", default="folder,tars", help="sources measured with --compare-with")
    ap.add_argument("--out", default=None, help="write the figures as JSON")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.workers, args.share, batch=32)))
        return
    t_start = time.perf_counter()
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else (
        [20_000, 40_000, 80_000] if args.smoke else [100_000, 400_000, 1_600_000])
    classes, per = (100, 1000) if args.smoke else (1000, 5000)
    env = benchlib.environment(sizes=sizes, workers=args.workers, share=args.share, smoke=args.smoke)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_scale-"))
    work.mkdir(parents=True, exist_ok=True)
    repo = str(HERE.parent)
    sys.path.insert(0, repo)
    from tinydistill import tarindex

    template = work / "template.tar"
    if not template.exists():
        make_template_tar(template, per, classes)
    os.environ["TINYDISTILL_CACHE"] = str(work / "cache")
    t = time.perf_counter()
    tarindex.write_beside(str(template))
    index_us = (time.perf_counter() - t) / per * 1e6
    kinds = ["folder", "tars"]
    checkouts = {"this": repo} | ({"compare": str(Path(args.compare_with).resolve())} if args.compare_with else {})
    res = {"env": env, "sizes": sizes, "index_build_us_per_row": index_us, "per_n": {}, "compare": {}}
    for n in sizes:
        t = time.perf_counter()
        paths = {"folder": make_folder(work / f"folder-{n}", n, classes, work / "base"),
                 "tars": make_tars(work / f"tars-{n}", n, template, per, indexed=True)}
        print(f"N={n:,}: data made in {time.perf_counter() - t:.1f} s", flush=True)
        row = {}
        for who, code in checkouts.items():
            cache = {"TINYDISTILL_CACHE": str(work / f"cache-{who}")}
            for k in kinds if who == "this" else args.compare_kinds.split(","):
                if who != "this" and k == "tars":  # another checkout may read other index files: warm its cache
                    run_child(paths[k], args, cache, code)
                r = run_child(paths[k], args, cache, code)
                (row if who == "this" else res["compare"].setdefault(str(n), {}))[k] = r
                print(f"  {who} {k}: open {r['open_s']:.2f} s ({r['open_cpu_s'] / n * 1e6:.2f} CPU us/row) + fingerprint "
                      f"{r['fingerprint_s']:.2f} s, first batch "
                      f"{r['first_batch_s']:.2f} s, main +{r['main_rss_growth'] / n:.1f} B/row resident, workers "
                      f"private {[round(w['private_dirty'] / 1e6, 1) for w in r['workers']]} MB", flush=True)
        if n == sizes[0]:  # un-indexed tars: one process scans them (under torchrun: refused, index-tars)
            path = make_tars(work / f"tars-noindex-{n}", n, template, per, indexed=False)
            r = run_child(path, args, {"TINYDISTILL_CACHE": str(work / "cache-noindex")}, repo)
            row["tars_unindexed"] = r
            print(f"  tars without indexes: open (scan) {r['open_s']:.2f} s = {r['open_s'] / n * 1e6:.1f} us/row", flush=True)
        row["targets"] = targets_half(n, work, args.smoke)
        res["per_n"][str(n)] = row
    summary = summarise(res["per_n"], kinds)
    if res["compare"]:
        summary["compare"] = summarise(res["compare"], args.compare_kinds.split(","))
    tg = {n: res["per_n"][n]["targets"] for n in res["per_n"]}
    for key in ("chunk_share_x_world", "inspect_requests_per_object"):
        vals = {n: t[key] for n, t in tg.items() if key in t}
        summary[key] = vals[str(max(sizes))] if str(max(sizes)) in vals else "not measured"
        summary[key + "_per_n"] = vals or "not measured"
    summary["scan_us_per_row_unindexed"] = res["per_n"][str(sizes[0])]["tars_unindexed"]["open_s"] / sizes[0] * 1e6
    summary["index_build_us_per_row"] = index_us
    summary["goals"] = GOALS
    res.update({k: summary[k] for k in ("resident_bytes_per_row", "worker_private_bytes_per_row", "startup_us_per_row",
                                         "chunk_share_x_world", "inspect_requests_per_object")})
    res["summary"] = summary
    print()
    print(table(res, kinds))
    if "compare" in summary:
        print(f"\n{args.compare_with}:")
        print(table({"summary": summary["compare"]}, args.compare_kinds.split(",")))
    print(f"\nun-indexed tars, one process scanning: {summary['scan_us_per_row_unindexed']:.1f} us/row; "
          f"index-tars: {index_us:.1f} us/row")
    print(f"stored targets: chunk_share_x_world {summary['chunk_share_x_world']}, "
          f"inspect_requests_per_object {summary['inspect_requests_per_object']}")
    benchlib.finish(res, env, t_start, args.out, summary)
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
