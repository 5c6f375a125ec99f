"""Stage 1: run a teacher once over every view and fill the logit store.

The store is created by rank 0 (or checked against this run when it exists: resume is the
default), the missing (epoch, shard) units are split across ranks and DataLoader workers,
top-K log-softmax runs on the device, and each finished shard goes to a background writer
thread so disk I/O overlaps compute. A killed run loses at most the shards in flight.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .augment import AugSpec
from . import dist
from .errors import NotAStoreError, StoreError, TinydistillError
from .sources import open_source
from .store import DEFAULT_CHUNK_ROWS, DEFAULT_SHARD_CHUNKS, LogitStore, open_store
from .teachers import load_teacher
from .views import ViewStream, check_replay, create_view_store, prepare

log = logging.getLogger("tinydistill")


@dataclass
class GenConfig:
    data: str
    teacher: str
    out: str
    k: int = 10
    epochs: tuple[int, int] = (0, 1)  # [start, stop)
    total_epochs: int | None = None  # store size when several jobs fill one store
    teacher_weights: str | None = None
    teacher_input_size: int | None = None  # override the teacher's pretrained input size
    seed: int = 0
    batch_size: int = 64
    workers: int = 4
    device: str = "cpu"
    amp: str = "none"
    spec: AugSpec = AugSpec()
    overwrite: bool = False
    skip_bad: bool = False
    compile: bool = False
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    shard_rows: int | None = None
    progress: bool = True


def parse_epochs(text: str) -> tuple[int, int]:
    """``"E"`` -> (0, E); ``"A:B"`` -> (A, B)."""
    try:
        if ":" in str(text):
            a, b = (int(x) for x in str(text).split(":"))
        else:
            a, b = 0, int(text)
    except ValueError:
        raise TinydistillError(f"--epochs {text}: expected a count E or a range A:B") from None
    if not 0 <= a < b:
        raise TinydistillError(f"--epochs {text}: need 0 <= A < B")
    return a, b


# ---- store set-up --------------------------------------------------------------------------------

def _mismatch(store: LogitStore, cfg: GenConfig, teacher, source) -> str | None:
    a = store.attrs
    t = a.get("teacher", {})
    checks = [
        ("teacher", t.get("name"), teacher.name),
        ("teacher weights", t.get("weights_digest"), teacher.weights_digest),
        ("K", a.get("k"), cfg.k),
        ("num_classes", a.get("num_classes"), teacher.num_classes),
        ("augmentation spec hash", a.get("spec_hash"), cfg.spec.hash),
        ("dataset fingerprint", a.get("dataset_fingerprint"), source.fingerprint),
        ("seed", a.get("base_seed"), cfg.seed),
    ]
    if cfg.total_epochs is not None:
        checks.append(("total epochs", a.get("epochs"), cfg.total_epochs))
    for what, old, new in checks:
        if old != new:
            short = (lambda v: v[:16] + "..." if isinstance(v, str) and len(v) > 19 else v)
            return (f"{cfg.out}: existing store has {what} {short(old)!r}, this run has {short(new)!r}; "
                    "pass --overwrite to replace it, or another --out")
    if cfg.epochs[1] > store.epochs:
        return f"{cfg.out}: store holds {store.epochs} epochs, --epochs asks for up to {cfg.epochs[1]}"
    return None


def _prepare_store(cfg: GenConfig, teacher, source, rank: int) -> LogitStore:
    err = None
    if rank == 0:
        try:
            existing = None
            if not cfg.overwrite:
                try:
                    existing = open_store(cfg.out, mode="r+")
                except NotAStoreError:
                    if os.path.isdir(cfg.out) and os.listdir(cfg.out):
                        raise
            if existing is not None:
                err = _mismatch(existing, cfg, teacher, source)
                if err is None:
                    check_replay(existing, source)  # same views as the run that started it
                    log.info("resuming %s: %d of %d units complete", cfg.out,
                             int(existing.complete_mask().sum()), existing.complete_mask().size)
            else:
                names = source.class_names if source.num_classes == teacher.num_classes else teacher.class_names
                create_view_store(
                    cfg.out, source, cfg.spec, base_seed=cfg.seed, epochs=cfg.total_epochs or cfg.epochs[1],
                    k=cfg.k, num_classes=teacher.num_classes, teacher=teacher.describe(),
                    chunk_rows=cfg.chunk_rows, shard_rows=cfg.shard_rows, overwrite=cfg.overwrite,
                    attrs={"class_names_source": "data" if names is source.class_names else "teacher"},
                )
                if names is not None and names is not source.class_names:
                    import zarr

                    zarr.open_group(cfg.out, mode="r+").attrs["class_names"] = list(names)
                log.info("created %s", cfg.out)
        except TinydistillError as e:
            err = str(e)
    dist.broadcast_error(err)
    return open_store(cfg.out, mode="r+")


# ---- the run -------------------------------------------------------------------------------------

class _ShardWriter:
    """Writes finished shards from a background thread; at most ``depth`` waiting."""

    def __init__(self, store: LogitStore, depth: int = 2):
        self.store, self.q = store, queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.written = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self.store.write_shard(*item[:5], skipped=item[5])
                    self.written += 1
                except BaseException as e:  # surfaced to the main thread on the next put/close
                    self.error = e

    def put(self, item):
        if self.error:
            raise self.error
        self.q.put(item)

    def close(self):
        self.q.put(None)
        self.thread.join()
        if self.error:
            raise self.error


@dist.keeps_threads
def gen_logits(cfg: GenConfig) -> dict[str, Any]:
    """Fill epochs [cfg.epochs) of the store at cfg.out; returns the run summary."""
    t_start = time.time()
    rank, world, device = dist.setup(cfg.device, cfg.workers)
    source = open_source(cfg.data)
    teacher = load_teacher(cfg.teacher, cfg.teacher_weights, class_names=source.class_names)
    if cfg.teacher_input_size:
        teacher.input_size = int(cfg.teacher_input_size)
    teacher.meta.update(amp=cfg.amp, device=device.type, batch_size=cfg.batch_size,
                        cpu_threads=torch.get_num_threads())
    if not 1 <= cfg.k <= teacher.num_classes:
        raise TinydistillError(f"--k {cfg.k}: must be between 1 and the teacher's {teacher.num_classes} classes")
    shard_rows = cfg.shard_rows or cfg.chunk_rows * DEFAULT_SHARD_CHUNKS
    cfg.shard_rows = shard_rows
    store = _prepare_store(cfg, teacher, source, rank)

    mask = store.complete_mask(refresh=True)
    todo = [(e, s) for e in range(*cfg.epochs) for s in range(store.num_shards) if not mask[e, s]]
    stream = ViewStream(source, cfg.spec, cfg.seed, epochs=range(*cfg.epochs), unit_rows=shard_rows,
                        units=todo, skip_bad=cfg.skip_bad, batch_size=cfg.batch_size)
    my_views = stream.rank_views(cfg.workers)
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=cfg.workers, pin_memory=device.type == "cuda",
        persistent_workers=False, prefetch_factor=4 if cfg.workers else None,
    )

    model = teacher.model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model = torch.compile(model)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)

    writer = _ShardWriter(store)
    buffers: dict[tuple[int, int], dict] = {}
    views = skipped = 0
    bar = _progress(my_views, enabled=cfg.progress and rank == 0, desc=f"gen-logits ({world} rank(s))")
    try:
        with torch.inference_mode():
            for batch in loader:
                x = batch["image"].to(device, non_blocking=True)
                x = prepare(x, teacher.input_size, teacher.mean, teacher.std, teacher.interpolation)
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = model(x)
                logp, idx = torch.log_softmax(logits.float(), dim=-1).topk(cfg.k, dim=-1)
                logp, idx = logp.cpu().numpy(), idx.cpu().numpy()
                rows, valid = batch["row"].numpy(), batch["valid"].numpy()
                # the stream never batches across units, and a unit is one (epoch, shard)
                done = _fill(buffers, store, int(batch["epoch"][0]), int(rows[0]) // shard_rows, rows, logp, idx,
                             batch["seed"].numpy().astype(np.uint64), ~valid)
                if done is not None:
                    writer.put(done)
                views += len(rows)
                skipped += int((~valid).sum())
                bar.update(len(rows))
        writer.close()
    finally:
        bar.close()
        if writer.thread.is_alive():  # an error above: stop the writer after the shards it holds
            writer.q.put(None)
            writer.thread.join()
    if buffers:
        raise StoreError(f"{cfg.out}: {len(buffers)} shard(s) did not receive all their rows")
    dist.barrier()
    views, skipped, written = (int(v) for v in dist.all_reduce([views, skipped, writer.written]))
    secs = time.time() - t_start
    return {
        "store": cfg.out, "epochs": list(cfg.epochs), "rank": rank, "world_size": world,
        "units_written": written, "views": views, "skipped_views": skipped,
        "seconds": round(secs, 2), "views_per_s": round(views / secs, 1) if secs else None,
        "complete": [round(float(f), 4) for f in store.completed()],
        "teacher": teacher.name, "k": cfg.k, "num_classes": teacher.num_classes,
    }


def _fill(buffers, store, epoch, shard, rows, logp, idx, seed, skipped):
    """Put a batch's rows into its shard buffer; return the write item once the shard is full."""
    key = (epoch, shard)
    a, b = store.shard_bounds(shard)
    buf = buffers.get(key)
    if buf is None:
        k = store.k
        buf = buffers[key] = {"logp": np.zeros((b - a, k), np.float32), "index": np.zeros((b - a, k), np.int64),
                              "seed": np.zeros(b - a, np.uint64), "skipped": np.zeros(b - a, bool), "n": 0}
    r = rows - a
    buf["logp"][r], buf["index"][r], buf["seed"][r], buf["skipped"][r] = logp, idx, seed, skipped
    buf["n"] += len(rows)
    if buf["n"] == b - a:
        del buffers[key]
        return (epoch, shard, buf["logp"], buf["index"], buf["seed"], buf["skipped"])
    return None


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="view", unit_scale=True, desc=desc, disable=not enabled,
                file=sys.stderr, dynamic_ncols=True, smoothing=0.05)


def summary_line(summary: dict) -> str:
    return json.dumps(summary, sort_keys=True)
