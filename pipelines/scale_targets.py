"""Stored targets at scale: chunks a rank reads per epoch, and requests on object storage.

    python pipelines/scale_targets.py [--rows 100000] [--workdir runs/scale_targets] [--smoke]

:func:`run` builds a store of N rows through the store API (a simulated teacher: random top-K,
no model), then measures, for train-student's epoch order:

- ``chunk_share_x_world``: the most chunks one rank reads in an epoch (counted by the real
  joiner, :class:`~tinydistill.ranktargets.RankTargets`, ranks simulated in one process) over
  the epoch's chunks, times the world size, at world 8 and 64 (1.0 is a perfect split; the
  issue's goal is at most 1.5); ``chunk_share_x_world_global_order`` is the same for the order
  before chunks were dealt to ranks (one global order of mix groups);
- on a local S3 API server (moto, ``tests/s3server.py``), with the store uploaded to it:
  ``inspect_requests_per_object`` (every request `inspect` sends, over the store's objects:
  its statistics read up to 200,000 views, so on a small store they read it all, and on a big
  one the ratio falls), ``inspect_info_requests`` (shape, completeness and sizes alone:
  listings), and ``mirror_requests_per_epoch`` (requests the node mirror sends per epoch, its
  background download of the next epoch included).

``pipelines/bench_scale.py`` calls :func:`run` at several N.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHUNK_ROWS, MIX_GROUP, BATCH, K, CLASSES = 4096, 256, 256, 10, 1000


def fake_targets(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Random top-K of a simulated teacher: descending log-probs holding 80 % of the mass, and K
    distinct class ids."""
    v = -np.sort(-rng.random((n, K), dtype=np.float32), 1) + np.float32(1e-3)
    logp = np.log(v / (v.sum(1, keepdims=True) * np.float32(1.25)))
    idx = (rng.integers(0, CLASSES, (n, 1)) + np.arange(K) * 7) % CLASSES
    return logp.astype(np.float32), idx


def build_store(path: str, n: int, epochs: int, seed: int = 0):
    import tinydistill as td

    st = td.create_store(path, num_classes=CLASSES, k=K, epochs=epochs, keys=[f"s{i:08d}" for i in range(n)],
                         labels=np.arange(n) % CLASSES, chunk_rows=CHUNK_ROWS, overwrite=True)
    rng = np.random.default_rng(seed)
    for e in range(epochs):
        for s in range(st.num_shards):
            a, b = st.shard_bounds(s)
            st.write_shard(e, s, *fake_targets(b - a, rng), np.arange(a, b, dtype=np.uint64) + np.uint64(e * n))
    return td.open_store(path)


def chunk_shares(store, world: int, epoch: int = 0) -> dict:
    """Chunks each rank reads in one epoch (the real joiner, ranks one after the other), and the
    chunks each rank's batches touch under the former global order."""
    from tinydistill.ranktargets import RankTargets
    from tinydistill.stream import epoch_order, epoch_steps, train_items

    n, cr = store.num_rows, store.chunk_rows
    chunks = -(-n // cr)
    steps = epoch_steps(n, BATCH, world)
    reads = []
    for r in range(world):
        items = train_items(epoch_order(n, MIX_GROUP, False, 0, epoch, 1, epoch, cr, world, r), epoch, BATCH, steps)
        joined = RankTargets(store, items, threads=2)
        for it in items:
            joined.get(it.epoch, it.rows)
        joined.close()
        reads.append(joined.reads)
    # before: one global order of mix groups, global batch t = order[t*B*W:(t+1)*B*W], rank r its r-th slice
    order = epoch_order(n, MIX_GROUP, False, 0, epoch, 1, epoch)
    step = BATCH * world
    before = []
    for r in range(world):
        mine = np.concatenate([order[t + r * BATCH:t + (r + 1) * BATCH] for t in range(0, len(order) - step + 1, step)]
                              or [np.zeros(0, np.int64)])
        before.append(len(np.unique(mine // cr)))
    return {"chunks": chunks, "max_reads": max(reads), "mean_reads": float(np.mean(reads)),
            "share_x_world": max(reads) / chunks * world, "mean_share_x_world": float(np.mean(reads)) / chunks * world,
            "global_order_share_x_world": max(before) / chunks * world}


def s3_requests(local: str, workdir: Path, epochs: int) -> dict:
    """Upload the store to a local S3 API server; count `inspect`'s and the node mirror's requests."""
    sys.path.insert(0, str(ROOT / "tests"))
    from s3server import S3Server

    server = S3Server()
    try:
        os.environ.update(server.env())
        os.environ["TINYDISTILL_CACHE"] = str(workdir / "cache")
        server.make_bucket("scale")
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # a cached filesystem still points at the last size's server
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.put(local, "scale/store.zarr", recursive=True)
        objects = len(fs.find("scale/store.zarr"))
        import tinydistill as td
        from tinydistill import nodecache
        from tinydistill.summary import summarize

        url = "s3://scale/store.zarr"
        server.start_counting()
        summarize(td.open_store(url))  # what `inspect` computes: info (sizes), then statistics
        inspect = server.requests()
        opened = td.open_store(url)
        server.start_counting()
        opened.info  # the shape, completeness and sizes alone: listings, no request per object
        info = server.requests()
        remote = td.open_store(url)
        per_epoch = []
        for e in range(epochs):
            server.start_counting()
            nodecache.node_local(remote, e, e + 1 if e + 1 < epochs else None)
            for fut in list(nodecache._pending.values()):
                fut.result()  # its background download of the next epoch counts too
            per_epoch.append(len(server.requests()))
        nodecache.clear(remote)
        return {"objects": objects, "inspect_requests": len(inspect),
                "inspect_head_requests": sum(m == "HEAD" for m, _ in inspect),
                "inspect_info_requests": len(info),
                "inspect_requests_per_object": len(inspect) / objects,
                "mirror_requests_per_epoch": float(np.mean(per_epoch)), "mirror_requests_by_epoch": per_epoch,
                "objects_per_epoch": objects / epochs}
    finally:
        server.stop()


def run(n: int, workdir: str, smoke: bool) -> dict:
    """Figures for a store of ``n`` rows (``smoke``: 2 epochs instead of 3, world 8 only on S3)."""
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    epochs = 2 if smoke else 3
    t0 = time.perf_counter()
    path = str(work / f"store-{n}.zarr")
    store = build_store(path, n, epochs)
    build_s = time.perf_counter() - t0
    shares = {str(w): chunk_shares(store, w) for w in (8, 64)}
    s3 = s3_requests(path, work, epochs)
    shutil.rmtree(path, ignore_errors=True)
    return {"rows": n, "epochs": epochs, "chunk_rows": CHUNK_ROWS, "batch_size": BATCH,
            "chunk_share_x_world": {w: round(v["share_x_world"], 3) for w, v in shares.items()},
            "chunk_share_x_world_mean": {w: round(v["mean_share_x_world"], 3) for w, v in shares.items()},
            "chunk_share_x_world_global_order": {w: round(v["global_order_share_x_world"], 3)
                                                 for w, v in shares.items()},
            "chunks_per_epoch": shares["8"]["chunks"],
            "inspect_requests_per_object": round(s3["inspect_requests_per_object"], 4),
            "inspect_requests": s3["inspect_requests"], "inspect_head_requests": s3["inspect_head_requests"],
            "inspect_info_requests": s3["inspect_info_requests"],
            "objects": s3["objects"], "objects_per_epoch": s3["objects_per_epoch"],
            "mirror_requests_per_epoch": s3["mirror_requests_per_epoch"],
            "mirror_requests_by_epoch": s3["mirror_requests_by_epoch"],
            "build_s": round(build_s, 2), "seconds": round(time.perf_counter() - t0, 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000])
    ap.add_argument("--workdir", default="runs/scale_targets")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    for n in args.rows:
        print(json.dumps(run(n, args.workdir, args.smoke)))


if __name__ == "__main__":
    main()
