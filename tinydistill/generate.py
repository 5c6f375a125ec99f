"""Stage 1: run a teacher once over every view and fill the logit store.

The store is created by rank 0 (or checked against this run when it exists: resume is the
default). The (epoch, shard) units still to do are cut into small items that keep every
DataLoader worker of every rank busy (:func:`tinydistill.stream.gen_plan`), top-K
log-softmax runs on the device, and each shard, once all its rows are in, is gathered on the
one rank that writes it and goes to a background writer thread, so disk I/O overlaps compute.
A killed run loses at most the shards in flight; SIGTERM (a cluster's preemption notice) or
SIGINT writes the shards already assembled and says what the store keeps. Rank 0 holds a lease
on the run's epochs in the store (:mod:`tinydistill.store.lease`), so a second run on the same
epochs is refused instead of writing every unit again.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import torch

from .augment import AugSpec
from .config import GenConfig, parse_epochs  # noqa: F401  (GenConfig is this stage's config)
from . import dist, signals
from .errors import NotAStoreError, StoreError, TinydistillError, UnfinishedStoreError
from .sources import open_source
from .replay import check_replay, run_mismatch, view_store_attrs
from .store import DEFAULT_CHUNK_ROWS, DEFAULT_SHARD_CHUNKS, LogitStore, create_store, open_store
from .store.lease import Lease, lease_at
from .batch import Batch
from .cuda import HostCopy
from .render_device import DeviceRenderer
from .stream import GenPlan, Meter, ViewStream, gen_plan
from .teachers import load_teacher
from .views import Views

log = logging.getLogger("tinydistill")


def resolve(cfg: GenConfig) -> GenConfig:
    """Defaults that depend on the machine: device, AMP dtype, renderer; epochs as a range."""
    device = cfg.device or dist.default_device()
    cuda = device.startswith("cuda")
    epochs = parse_epochs(cfg.epochs) if isinstance(cfg.epochs, (str, int)) else tuple(int(e) for e in cfg.epochs)
    if cfg.total_epochs is not None and epochs[1] > cfg.total_epochs:  # before any store is made
        raise TinydistillError(f"`epochs` {epochs[0]}:{epochs[1]} goes past `total_epochs` {cfg.total_epochs} "
                               f"(the store holds epochs 0..{cfg.total_epochs - 1})")
    return replace(cfg, device=device, amp=cfg.amp or ("bf16" if cuda else "none"), epochs=epochs,
                   spec=cfg.spec.for_device(device))


# ---- store set-up --------------------------------------------------------------------------------

def create_view_store(path, source, spec: AugSpec, *, base_seed: int, epochs: int, k: int,
                      num_classes: int | None = None, teacher: dict | None = None, device="cpu", decode="auto",
                      **kwargs):
    """Create a store for the views of ``source`` under ``spec``: keys, labels, class names,
    the spec and its hash, the base seed, the view format and the replay canary come from here."""
    spec = spec.for_device(device)  # a store always records a renderer
    chunk_rows = kwargs.pop("chunk_rows", DEFAULT_CHUNK_ROWS)
    if chunk_rows % spec.mix_group:
        raise TinydistillError(f"chunk_rows={chunk_rows} must be a multiple of mix_group={spec.mix_group}")
    num_classes = num_classes or source.num_classes
    names = kwargs.pop("class_names", None)
    if names is None:
        names = source.class_names if len(source.class_names) == num_classes else None
    attrs, arrays = view_store_attrs(source, spec, base_seed, epochs, device, decode)
    return create_store(path, num_classes=num_classes, k=k, epochs=epochs, keys=source.keys,
                        labels=source.labels, class_names=names, teacher=teacher,
                        augmentation=spec.to_dict(), base_seed=base_seed, chunk_rows=chunk_rows,
                        attrs={**attrs, **kwargs.pop("attrs", {})}, arrays=arrays, **kwargs)


def _prepare_store(cfg: GenConfig, teacher, source, rank: int, device, run: "_Run") -> LogitStore:
    """Rank 0 resumes, creates (or finishes creating) the store and takes the run's lease on
    its epochs; every rank then opens it, knowing the lease's run id."""
    err = None
    if rank == 0:
        try:
            existing, unfinished = None, False
            if not cfg.overwrite:
                try:
                    existing = open_store(cfg.out, mode="r+")
                except UnfinishedStoreError:
                    unfinished = True  # nothing was written yet: create it again
                except NotAStoreError as e:
                    if os.path.isdir(cfg.out) and os.listdir(cfg.out):
                        raise NotAStoreError(f"{e}; use `overwrite` to replace it") from None
            if existing is not None:
                err = run_mismatch(existing, out=cfg.out, teacher=teacher, k=cfg.k, spec=cfg.spec, source=source,
                                   seed=cfg.seed, epochs=cfg.epochs, total_epochs=cfg.total_epochs,
                                   attention_grid=cfg.attention_grid)
                if err is None:
                    # the views the run that started it made (its JPEGs decoded where they were then)
                    check_replay(existing, source, device=device, decode=cfg.decode)
                    run.lease = existing.lease(cfg.epochs).take()
                    log.info("resuming %s: %d of %d units complete", cfg.out,
                             int(existing.complete_mask().sum()), existing.complete_mask().size)
            else:
                old = lease_at(cfg.out, (0, 1 << 62)) if cfg.overwrite or unfinished else None
                held = old.others() if old is not None else []
                if held:  # never replace a store another run is writing
                    raise old.refusal(held[0], "cannot replace it:")
                if unfinished:
                    log.info("%s: an earlier run did not finish creating it; creating it again", cfg.out)
                run.creating = True
                from_data = source.num_classes == teacher.num_classes
                create_view_store(
                    cfg.out, source, cfg.spec, base_seed=cfg.seed, epochs=cfg.total_epochs or cfg.epochs[1], device=device,
                    decode=cfg.decode,
                    k=cfg.k, num_classes=teacher.num_classes, teacher=teacher.describe(),
                    class_names=None if from_data else teacher.class_names,
                    chunk_rows=cfg.chunk_rows, shard_rows=cfg.shard_rows, overwrite=cfg.overwrite or unfinished,
                    attrs={"class_names_source": "data" if from_data else "teacher"},
                    targets={"attention": {"grid": cfg.attention_grid}} if cfg.attention_grid else None,
                )
                run.creating = False
                run.lease = open_store(cfg.out, mode="r+").lease(cfg.epochs).take()
                log.info("created %s", cfg.out)
        except TinydistillError as e:
            err = str(e)
    dist.broadcast_error(err)
    run_id = dist.broadcast(run.lease.run if run.lease else None)
    store = open_store(cfg.out, mode="r+")
    run.store = store
    if run.lease is None:  # ranks > 0 check the lease rank 0 holds for the run
        run.lease = store.lease(cfg.epochs, run_id)
    return store


# ---- the run -------------------------------------------------------------------------------------

@dataclass
class Outputs:
    """The teacher's outputs for some rows of one epoch (or a whole shard, once assembled)."""

    epoch: int
    rows: np.ndarray  # int64 [n]
    seed: np.ndarray  # uint64 [n]
    skipped: np.ndarray  # bool [n]: unreadable image, or non-finite outputs (--skip-bad)
    targets: dict  # each target kind's values by field: logp [n, K], index [n, K], attention [n, G, G]

    @classmethod
    def cat(cls, parts: list["Outputs"]) -> "Outputs":
        cat = lambda f: np.concatenate([getattr(p, f) for p in parts])  # noqa: E731
        return cls(parts[0].epoch, cat("rows"), cat("seed"), cat("skipped"),
                   {k: np.concatenate([p.targets[k] for p in parts]) for k in parts[0].targets})

    def take(self, order: np.ndarray) -> "Outputs":
        return Outputs(self.epoch, self.rows[order], self.seed[order], self.skipped[order],
                       {k: v[order] for k, v in self.targets.items()})


class _ShardWriter:
    """Writes finished shards from a background thread; at most ``depth`` waiting."""

    def __init__(self, store: LogitStore, lease: Lease | None = None, depth: int = 2):
        self.store, self.lease, self.q = store, lease, queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.written = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            shard = self.q.get()
            if shard is None:
                return
            if self.error is None:
                try:
                    o = shard
                    unit = int(o.rows[0]) // self.store.shard_rows
                    if self.lease is not None:  # only while this run holds the store's epochs
                        self.lease.check(f"epoch {o.epoch} shard {unit}")
                    self.store.write_shard(o.epoch, unit, seed=o.seed, skipped=o.skipped, **o.targets)
                    self.written += 1
                except BaseException as e:  # surfaced to the main thread on the next put/close
                    self.error = e

    def put(self, shard: Outputs):
        if self.error:
            raise self.error
        self.q.put(shard)

    def close(self):
        self.q.put(None)
        self.thread.join()
        if self.error:
            raise self.error


class _Rounds:
    """Collects this rank's teacher outputs per round and hands each finished shard, whole,
    to the one rank that writes it (rank j writes shard j of a round)."""

    def __init__(self, plan: GenPlan, store: LogitStore, writer: _ShardWriter, rank: int, world: int):
        self.plan, self.store, self.writer, self.rank, self.world = plan, store, writer, rank, world
        self.parts: dict[tuple[int, int], list] = {}
        self.got = [0] * len(plan.rounds)
        self.next = 0  # the first round not yet exchanged
        self.round_of = {u: i for i, rnd in enumerate(plan.rounds) for u in rnd}

    def add(self, out: Outputs) -> None:
        shard = int(out.rows[0]) // self.store.shard_rows  # items never straddle shards
        self.parts.setdefault((out.epoch, shard), []).append(out)
        self.got[self.round_of[(out.epoch, shard)]] += len(out.rows)
        self.flush()

    def flush(self, final: bool = False) -> None:
        """Exchange every finished round, in order (all ranks take part in each)."""
        while self.next < len(self.plan.rounds) and (final or self.got[self.next] >= self.plan.round_rows[self.next]):
            if self.got[self.next] != self.plan.round_rows[self.next]:
                raise StoreError(f"{self.store.path}: round {self.next} received {self.got[self.next]} of "
                                 f"{self.plan.round_rows[self.next]} rows")
            for j, unit in enumerate(self.plan.rounds[self.next]):
                mine = self.parts.pop(unit, [])
                parts = dist.gather_parts(mine, dst=j)
                if self.rank == j:
                    self.writer.put(self._assemble(unit, [p for ps in parts for p in ps]))
            self.next += 1

    def _assemble(self, unit: tuple[int, int], parts: list[Outputs]) -> Outputs:
        """The whole shard, in row order."""
        epoch, shard = unit
        a, b = self.store.shard_bounds(shard)
        got = Outputs.cat(parts)
        if len(got.rows) != b - a or not np.array_equal(np.sort(got.rows), np.arange(a, b)):
            raise StoreError(f"{self.store.path}: shard {shard} of epoch {epoch} got {len(got.rows)} rows for {b - a}")
        return got.take(np.argsort(got.rows))


@dataclass
class _Run:
    """What a stopped run needs to say what it kept."""

    cfg: GenConfig
    store: LogitStore | None = None
    lease: Lease | None = None
    writer: "_ShardWriter | None" = None
    creating: bool = False
    world: int = 1

    def stopped(self, exc: BaseException) -> str:
        """The one line for a run stopped by SIGINT / SIGTERM, after it kept what it could."""
        sig, out = signals.name(signals.signum_of(exc)), self.cfg.out
        if self.store is None:
            what = "while creating it; re-run the same command to create it again" if self.creating else \
                "before it wrote anything; re-run the same command to start"
            return f"gen-logits stopped by {sig}: {out} {what}"
        a, b = self.cfg.epochs
        written = self.writer.written if self.writer else 0
        by = "this run" if self.world == 1 else "this rank"
        try:
            mask = self.store.complete_mask(refresh=True)[a:b]
            kept = f"{int(mask.sum())} of {mask.size} units of epochs {a}:{b} complete"
        except Exception:
            kept = f"every unit recorded complete (epochs {a}:{b})"
        return (f"gen-logits stopped by {sig}: {out} keeps {kept} ({written} written by {by}); units still being "
                "computed were dropped; re-run the same command to resume")


@dist.keeps_threads
def gen_logits(cfg: GenConfig, on_step: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Fill epochs [cfg.epochs) of the store at cfg.out; returns the run summary.

    ``on_step`` (optional) is called after every teacher batch with ``{"views", "seconds"}``.
    SIGTERM (a cluster's preemption notice) and SIGINT stop the run the same way: the shards
    already assembled are written, the rest dropped, and :class:`tinydistill.signals.Stopped`
    says what the store keeps.
    """
    t_start = time.time()
    cfg = resolve(cfg)
    run = _Run(cfg)
    with signals.stop_on(signal.SIGTERM):
        try:
            return _gen_logits(cfg, on_step, run, t_start)
        except KeyboardInterrupt as e:  # SIGINT, or SIGTERM (signals.Terminated)
            raise signals.Stopped(run.stopped(e), signals.signum_of(e)) from None
        finally:
            if run.lease is not None:
                run.lease.release()


def _gen_logits(cfg: GenConfig, on_step, run: _Run, t_start: float) -> dict[str, Any]:
    rank, world, device = dist.setup(cfg.device, cfg.workers)
    run.world = world
    source = open_source(cfg.data)
    teacher = load_teacher(cfg.teacher, cfg.teacher_weights, class_names=source.class_names,
                           input_size=cfg.teacher_input_size)
    teacher.meta.update(amp=cfg.amp, device=device.type, batch_size=cfg.batch_size,
                        cpu_threads=torch.get_num_threads(), compile=bool(cfg.compile))
    if not 1 <= cfg.k <= teacher.num_classes:
        raise TinydistillError(f"`k` {cfg.k}: must be between 1 and the teacher's {teacher.num_classes} classes")
    if cfg.attention_grid:  # a teacher without a map is refused before any store exists
        from .attention import AttentionTap

        AttentionTap(teacher.model, cfg.attention_grid, name=f"teacher {cfg.teacher}").remove()
    shard_rows = cfg.shard_rows or cfg.chunk_rows * DEFAULT_SHARD_CHUNKS
    cfg = replace(cfg, shard_rows=shard_rows)
    store = _prepare_store(cfg, teacher, source, rank, device, run)

    mask = store.complete_mask(refresh=True)
    todo = [(e, s) for e in range(*cfg.epochs) for s in range(store.num_shards) if not mask[e, s]]
    plan = gen_plan(todo, store.shard_bounds, store.num_rows, cfg.spec.mix_group, cfg.batch_size,
                    cfg.workers, world, rank)
    core = Views(source, cfg.spec, cfg.seed, skip_bad=cfg.skip_bad, device=device, decode=cfg.decode)
    stream = ViewStream(core, plan.items)  # the torch renderer: workers ship bytes + records
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=cfg.workers, pin_memory=device.type == "cuda",
        persistent_workers=False, prefetch_factor=4 if cfg.workers else None,
        worker_init_fn=signals.ignore_in_worker,  # the main process stops them (SIGINT / SIGTERM)
    )

    teacher.place(device, cfg.amp, compile=cfg.compile, attention_grid=cfg.attention_grid)

    writer = run.writer = _ShardWriter(store, run.lease)
    rounds = _Rounds(plan, store, writer, rank, world)
    renderer = DeviceRenderer(core, device) if stream.encoded else None
    meter = Meter(cfg.workers, renderer)
    counts = {"views": 0, "skipped": 0, "nonfinite": 0}
    bar = _progress(stream.num_views, enabled=cfg.progress and rank == 0, desc=f"gen-logits ({world} rank(s))")
    pad_to = cfg.batch_size if cfg.compile else None  # one shape for a compiled teacher, tails included
    loader_it = iter(loader)  # this run's DataLoader iterator (what renderer and meter iterate)
    batches = meter(renderer(loader_it) if renderer else loader_it)
    try:
        pending = None
        for batch in batches:
            out = teacher.targets(batch.image, store.kinds, pad_to=pad_to)
            # the copies back are queued now and waited for one batch later: the device keeps working
            done, pending = pending, _InFlight(batch, list(out), HostCopy(*out.values()))
            if done is not None:
                _store_batch(cfg, rounds, counts, done, bar, on_step, t_start)
        if pending is not None:
            _store_batch(cfg, rounds, counts, pending, bar, on_step, t_start)
        rounds.flush(final=True)
        writer.close()
    finally:
        bar.close()
        batches.close()
        shutdown = getattr(loader_it, "_shutdown_workers", None)
        if shutdown is not None:  # stop the workers now, not when a traceback that holds them is freed
            shutdown()
        if writer.thread.is_alive():  # an error or a stop above: write the shards it holds, then stop
            writer.q.put(None)
            writer.thread.join()
    load = meter.report()
    dist.barrier()
    views, skipped, nonfinite, written = (int(v) for v in dist.all_reduce(
        [counts["views"], counts["skipped"], counts["nonfinite"], writer.written]))
    if nonfinite and rank == 0:
        log.warning("%s: %d view(s) had non-finite teacher outputs and are stored as skipped (--skip-bad)",
                    cfg.out, nonfinite)
    secs = time.time() - t_start
    return {
        "store": cfg.out, "epochs": list(cfg.epochs), "rank": rank, "world_size": world,
        "units_written": written, "views": views, "skipped_views": skipped, "nonfinite_views": nonfinite,
        "seconds": round(secs, 2), "views_per_s": round(views / secs, 1) if secs else None,
        "complete": [round(float(f), 4) for f in store.completed()],
        "teacher": teacher.name, "k": cfg.k, "num_classes": teacher.num_classes, "attention_grid": cfg.attention_grid,
        "item_rows": plan.item_rows, "items": len(plan.items), "load": load,
    }


@dataclass
class _InFlight:
    """A teacher batch whose outputs are on their way back to the host."""

    batch: Batch
    fields: list  # names of the outputs' tensors
    outputs: HostCopy


def _store_batch(cfg: GenConfig, rounds: "_Rounds", counts: dict, done: _InFlight, bar, on_step, t_start) -> None:
    """Hand one teacher batch to its shard. Views whose teacher outputs are not finite (an
    fp16 teacher overflowing) are stored as skipped with ``--skip-bad`` and refused without."""
    batch = done.batch
    targets = {name: t.numpy() for name, t in zip(done.fields, done.outputs.get())}
    rows, valid = batch.row.numpy(), batch.valid.numpy()
    epoch = int(batch.epoch[0])
    finite = np.ones(len(rows), bool)
    for v in targets.values():
        if v.dtype.kind == "f":
            finite &= np.isfinite(v.reshape(len(rows), -1)).all(1)
    bad = valid & ~finite
    if bad.any():
        if not cfg.skip_bad:
            raise TinydistillError(
                f"`teacher` {cfg.teacher}: non-finite outputs for {int(bad.sum())} view(s) of epoch {epoch} "
                f"(rows {', '.join(str(r) for r in rows[bad][:5])}) with `amp` {cfg.amp}; use `amp` bf16 or none, "
                f"or `skip_bad` to store them as skipped")
        counts["nonfinite"] += int(bad.sum())
        valid = valid & ~bad
    rounds.add(Outputs(epoch, rows, batch.seed.numpy().astype(np.uint64), ~valid, targets))
    counts["views"] += len(rows)
    counts["skipped"] += int((~valid).sum())
    bar.update(len(rows))
    if on_step is not None:
        on_step({"views": len(rows), "seconds": time.time() - t_start})


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="view", unit_scale=True, desc=desc, disable=not enabled,
                file=sys.stderr, dynamic_ncols=True, smoothing=0.05)


def summary_line(summary: dict) -> str:
    return json.dumps(summary, sort_keys=True)
