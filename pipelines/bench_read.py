"""Read amplification and read speed of each data source, and of stored targets, in one run.

For one epoch in a fresh random order (batches of ``--batch``): bytes read over the data's
bytes, requests per epoch per worker, and images/s of reading + decoding every image of the
epoch relative to an ImageFolder of the same JPEGs. Sources: ImageFolder, indexed webdataset
shards on the local disk, and the same shards on an S3 API server on loopback (moto, through
s3fs). Targets: bytes a rank's main process fetches from a local store per epoch over that
epoch's stored bytes (RankTargets), against workers joining their own (ChunkTargets).

    python pipelines/bench_read.py            # 8,192 photos in 16 shards
    python pipelines/bench_read.py --smoke    # 512 photos in 16 shards: checks the script
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import benchlib  # noqa: E402


def pack_shards(folder, out: Path, shards: int) -> str:
    """The ImageFolder's images (in its store order) as ``shards`` tars of jpg + cls."""
    from tinydistill.sources import ImageFolderSource

    src = ImageFolderSource(str(folder))
    out.mkdir(parents=True, exist_ok=True)
    for s, rows in enumerate(np.array_split(np.arange(len(src)), shards)):
        with tarfile.open(out / f"part-{s:03d}.tar", "w") as tar:
            for r in rows:
                for name, data in ((f"{r:07d}.jpg", Path(src.path(r)).read_bytes()),
                                   (f"{r:07d}.cls", str(int(src.labels[r])).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(out / f"part-{{000..{shards - 1:03d}}}.tar")


def epoch(src, batch: int, seed: int = 0) -> dict:
    """Read and decode one epoch in a random order, batch by batch (rows ascending in a batch,
    as a DataLoader worker reads them)."""
    order = np.random.default_rng(seed).permutation(len(src))
    t = time.perf_counter()
    for lo in range(0, len(order), batch):
        for _, img in src.read(np.sort(order[lo:lo + batch]).tolist()):
            img.convert("RGB")
    wall = time.perf_counter() - t
    return {"images_per_s": len(src) / wall, "batches": -(-len(order) // batch)}


def folder_bytes(src) -> int:
    return sum(os.path.getsize(src.path(r)) for r in range(len(src)))


def targets(n: int, batch: int, workers: int) -> dict:
    """Bytes fetched per epoch from a local store over the epoch's stored bytes."""
    import zarr

    import tinydistill as td
    from tinydistill.ranktargets import RankTargets
    from tinydistill.stream import ChunkTargets, epoch_order, train_items

    fetched = [0]
    real_get = zarr.storage.LocalStore.get

    async def counting_get(self, key, prototype=None, byte_range=None):
        buf = await real_get(self, key, prototype, byte_range)
        if buf is not None and key.split("/")[0] in ("logp", "index_gap"):
            fetched[0] += len(buf)
        return buf

    with tempfile.TemporaryDirectory() as d:
        st = td.create_store(f"{d}/t.zarr", num_classes=1000, k=10, epochs=1, keys=[f"k{i}" for i in range(n)],
                             chunk_rows=256, shard_rows=256 * 16)
        rng = np.random.default_rng(0)
        for s in range(st.num_shards):
            a, b = st.shard_bounds(s)
            ids = np.argsort(rng.random((b - a, 1000)), 1)[:, :10]
            st.write_shard(0, s, np.log(rng.dirichlet(np.ones(10), b - a) * 0.9), ids, np.arange(a, b))
        stored = sum(v for k, v in st.bytes_on_disk().items() if k in ("logp", "index_gap"))
        st = td.open_store(f"{d}/t.zarr")
        items = train_items(epoch_order(n, 64, False, 0, 0, 0, 0), 0, batch)
        zarr.storage.LocalStore.get = counting_get
        try:
            rt = RankTargets(st, items)
            for it in items:
                rt.get(it.epoch, it.rows)
            rt.close()
            main = fetched[0]
            fetched[0] = 0
            for w in range(workers):
                ct = ChunkTargets(st, items[w::workers])
                for it in items[w::workers]:
                    ct.get(it.epoch, it.rows)
            in_workers = fetched[0]
        finally:
            zarr.storage.LocalStore.get = real_get
    return {"stored_bytes": stored, "main_process": main / stored, f"{workers}_workers_each": in_workers / stored}


def webdataset_local(spec: str, fsrc, a) -> tuple[dict, dict, float, float]:
    """The shards on the local disk against the ImageFolder, epochs alternated over ``a.rounds``
    rounds (ImageFolder first in even rounds, webdataset first in odd ones) so machine drift falls
    on both: (ImageFolder's figures, the webdataset's: amplification and requests per epoch,
    speed, speed ratio per round), and the first (indexing) and cached open times."""
    from tinydistill.sources import open_source

    t = time.perf_counter()
    wsrc = open_source(spec)
    first_open = time.perf_counter() - t
    t = time.perf_counter()
    again = open_source(spec)
    cached_open = time.perf_counter() - t
    f, w = [], []
    for r in range(a.rounds):
        for src, out in ((fsrc, f), (wsrc, w)) if r % 2 == 0 else ((wsrc, w), (fsrc, f)):
            out.append(epoch(src, a.batch, seed=r)["images_per_s"])
    ratio = benchlib.ratio_stats(w, f)
    folder = {"bytes_read_over_data": 1.0, "requests_per_epoch_per_worker": len(fsrc) / a.workers,
              "images_per_s": benchlib.med(f), "per_round": f}  # each file read once, whole
    return (folder,
            {"bytes_read_over_data": wsrc.io["bytes"] / a.rounds / wsrc.data_bytes,
             "bytes_read_over_image_bytes": wsrc.io["bytes"] / a.rounds / folder_bytes(fsrc),
             "requests_per_epoch_per_worker": wsrc.io["requests"] / a.rounds / a.workers,
             "images_per_s": benchlib.med(w), "per_round": w, "relative_speed": ratio["median"],
             "relative_speed_rounds": ratio, "open_s_first": first_open, "open_s_cached": cached_open,
             "index_sources": again.index_stats},
            first_open, cached_open)


def webdataset_s3(spec: str, f: dict, a) -> dict:
    """The same shards on an S3 API server on loopback (moto, through s3fs)."""
    from s3server import S3Server

    from tinydistill.sources import open_source

    server = S3Server()
    try:
        os.environ.update(server.env())
        server.make_bucket("bench")
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        for p in sorted(Path(spec).parent.glob("part-*.tar")):
            fs.put_file(str(p), f"bench/shards/{p.name}")
        ssrc = open_source(f"s3://bench/shards/{Path(spec).name}")
        s = epoch(ssrc, a.batch)
        return {"bytes_read_over_data": ssrc.io["bytes"] / ssrc.data_bytes,
                "requests_per_epoch_per_worker": ssrc.io["requests"] / a.workers,
                "images_per_s": s["images_per_s"], "relative_speed": s["images_per_s"] / f["images_per_s"]}
    finally:
        server.stop()


def report(res: dict, first_open: float, cached_open: float) -> None:
    for name in ("imagefolder", "webdataset_local", "webdataset_s3"):
        r = res[name]
        print(f"{name:18s} bytes read/data {r['bytes_read_over_data']:.3f}  requests/epoch/worker "
              f"{r['requests_per_epoch_per_worker']:.0f}  images/s {r['images_per_s']:.0f}"
              + (f"  relative to ImageFolder {benchlib.fmt_ratio(r['relative_speed_rounds'])}"
                 if "relative_speed_rounds" in r else
                 f"  relative to ImageFolder {r['relative_speed']:.3f}" if "relative_speed" in r else ""))
    tr = res["targets"]
    print(f"targets            fetched/stored per epoch: main process {tr['main_process']:.3f}, "
          f"4 workers joining their own {tr['4_workers_each']:.3f}")
    print(f"webdataset open: first (indexing) {first_open:.3f} s, cached {cached_open:.3f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8192)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=8, help="workers the requests are spread over")
    ap.add_argument("--rounds", type=int, default=3, help="alternated epochs of ImageFolder and local webdataset")
    ap.add_argument("--smoke", action="store_true", help="512 images, 16 shards")
    ap.add_argument("--data", default=os.environ.get("TD_BENCH_DATA", "/tmp/td_bench_read"))
    ap.add_argument("--out", default=None, help="JSON results file")
    a = ap.parse_args()
    if a.smoke:
        a.images = 512
    t_start = time.perf_counter()
    env = benchlib.environment(images=a.images, shards=a.shards, batch=a.batch, smoke=a.smoke)
    os.environ.setdefault("TINYDISTILL_CACHE", tempfile.mkdtemp(prefix="td_cache_"))
    from tinydistill.sources import ImageFolderSource

    root = Path(a.data)
    folder = root / f"photos{a.images}"
    benchlib.make_photo_folder(folder, a.images, classes=100)
    spec = pack_shards(folder, root / f"shards{a.images}x{a.shards}", a.shards)
    res = {"env": env}
    fsrc = ImageFolderSource(str(folder))
    res["imagefolder"], res["webdataset_local"], first_open, cached_open = webdataset_local(spec, fsrc, a)
    res["webdataset_s3"] = webdataset_s3(spec, res["imagefolder"], a)
    res["targets"] = targets(max(a.images, 4096), a.batch, workers=4)
    report(res, first_open, cached_open)
    benchlib.finish(res, env, t_start, a.out, {k: res[k] for k in ("webdataset_local", "webdataset_s3", "targets")})


if __name__ == "__main__":
    main()
