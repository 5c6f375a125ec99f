"""The view stream: which rows each rank and DataLoader worker renders, in which batches.

Work is cut into *items*: rows of one epoch that one DataLoader worker renders together and
cuts into consecutive batches. Items are small and independent of how the store is laid out,
so every worker of every rank has work whatever the data size:

- gen-logits (:func:`gen_plan`): each (epoch, shard) still to do is cut into items of a few
  mix groups, aligned with the teacher's batches (every batch is a fixed shard-relative run of
  ``batch_size`` rows, so a view's teacher output never depends on workers, ranks or resume).
  Shards are taken in *rounds* of ``world`` shards; a round's items are dealt to all ranks, and
  shard j of a round is gathered and written, whole, by rank j (one writer per shard).
- training (:func:`epoch_order`, :func:`train_items`): every epoch the store's chunks are dealt
  to the ranks afresh (:func:`rank_span`), so a rank reads about 1/world of an epoch's targets;
  each rank orders its share (mix groups in random order, pairs or rows inside a group
  shuffled) and cuts it into batches, all ranks the same number (:func:`epoch_steps`); one item
  is one batch.

:class:`ViewStream` hands a rank's items to its DataLoader workers round-robin (item i to
worker i % workers), which the DataLoader returns in item order: the batches a model sees do
not depend on the worker count. Stored targets are joined in each rank's main process
(:class:`ChunkTargets`, through :mod:`tinydistill.ranktargets`), not in the workers.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from .batch import Batch, Encoded
from .params import pair_order
from .store.format import DEFAULT_CHUNK_ROWS
from .views import Views

ENCODED_RENDERERS = {"torch"}  # renderers whose pixels are made in the main process (render_device)
ITEMS_PER_WORKER = 4  # aim: at least this many items per worker per epoch
MAX_ITEM_ROWS = 4096  # items stay small on big data too: quick to hand out, cheap to lose


@dataclass(frozen=True)
class Item:
    """Rows of one (view) epoch rendered by one worker, ``render`` rows at a time (0: all at
    once; a multiple of ``batch``), and cut into consecutive batches of ``batch``."""

    epoch: int
    rows: np.ndarray
    batch: int
    render: int = 0

    @property
    def num_batches(self) -> int:
        return -(-len(self.rows) // self.batch)


# ---- gen-logits -------------------------------------------------------------------------------

@dataclass
class GenPlan:
    rounds: list[list[tuple[int, int]]]  # (epoch, shard) groups; shard j of a round is written by rank j
    items: list[Item]  # this rank's items, in order
    item_round: list[int]  # round of each item
    round_rows: list[int]  # this rank's rows in each round
    item_rows: int


def render_rows(mix_group: int, batch_size: int) -> int:
    """Rows a gen-logits worker renders at once: whole mix groups (no partner rendered twice)
    and whole teacher batches."""
    return math.lcm(int(mix_group), int(batch_size))


def item_rows(num_rows: int, mix_group: int, batch_size: int, workers: int, world: int) -> int:
    """Rows per gen-logits item: a multiple of :func:`render_rows`, small enough that each of
    the ``workers * world`` DataLoader workers gets ``ITEMS_PER_WORKER`` items of an epoch when
    the data allows it, and at most ``MAX_ITEM_ROWS`` (or one render unit) on big data."""
    unit = render_rows(mix_group, batch_size)
    want = num_rows / (ITEMS_PER_WORKER * max(workers, 1) * max(world, 1))
    return unit * max(1, min(int(want // unit), MAX_ITEM_ROWS // unit))


def gen_plan(todo: Sequence[tuple[int, int]], shard_bounds: Callable[[int], tuple[int, int]], num_rows: int,
             mix_group: int, batch_size: int, workers: int, world: int, rank: int) -> GenPlan:
    size = item_rows(num_rows, mix_group, batch_size, workers, world)
    unit = render_rows(mix_group, batch_size)
    rounds = [list(todo[i:i + world]) for i in range(0, len(todo), world)]
    items, item_round, round_rows = [], [], []
    for ri, rnd in enumerate(rounds):
        pieces = []
        for e, s in rnd:
            a, b = shard_bounds(s)
            pieces += [Item(int(e), np.arange(lo, min(lo + size, b)), batch_size, unit) for lo in range(a, b, size)]
        mine = pieces[rank::world]
        items += mine
        item_round += [ri] * len(mine)
        round_rows.append(sum(len(it.rows) for it in mine))
    return GenPlan(rounds=rounds, items=items, item_round=item_round, round_rows=round_rows, item_rows=size)


# ---- training order ---------------------------------------------------------------------------

def order_block(chunk_rows: int | None, mix_group: int) -> int:
    """Rows dealt to ranks together: the store's chunk (``DEFAULT_CHUNK_ROWS`` without a
    store), rounded up to whole mix groups."""
    return math.lcm(int(chunk_rows or DEFAULT_CHUNK_ROWS), int(mix_group))


def rank_span(num_rows: int, block: int, world: int, rank: int, order_seed: int, epoch: int
              ) -> list[tuple[int, int, int]]:
    """This rank's share of an epoch: ``(block, start, stop)`` row offsets into blocks.

    The epoch's blocks are dealt in a fresh seeded order (the same for every rank), laid end to
    end, and cut into ``world`` runs of equal rows (sizes differ by one at most): rank r takes run
    r. A rank touches at most ``ceil(num_rows / world / block) + 2`` blocks, and every row
    belongs to exactly one rank. O(blocks), not O(rows).
    """
    n_blocks = -(-num_rows // block)
    deal = np.random.default_rng([int(order_seed), 0x6465616C, int(epoch)]).permutation(n_blocks)
    sizes = np.minimum(block, num_rows - deal * block)
    ends = np.cumsum(sizes)
    lo, hi = rank * num_rows // world, (rank + 1) * num_rows // world
    first = int(np.searchsorted(ends, lo, side="right"))
    out = []
    for i in range(first, n_blocks):
        start = int(ends[i] - sizes[i])
        if start >= hi:
            break
        a, z = max(lo - start, 0), min(hi - start, int(sizes[i]))
        if z > a:
            out.append((int(deal[i]), a, z))
    return out


def epoch_order(num_rows: int, mix_group: int, mixing: bool, view_seed: int, view_epoch: int,
                order_seed: int, epoch: int, chunk_rows: int | None = None, world: int = 1,
                rank: int = 0) -> np.ndarray:
    """This rank's rows of one training epoch, in a fresh seeded order.

    Store chunks (blocks of :func:`order_block` rows) are dealt to ranks at random every epoch
    (:func:`rank_span`), so a rank reads about 1/world of an epoch's targets. Inside its share,
    mix groups come in a random order; inside a group rows are shuffled and, when the spec
    mixes, each row sits next to its mix partner (pairs shuffled), so a batch holds both views
    of a pair and renders no image twice (only the pairs cut by a share's two ends are split).
    Depends on neither the worker count nor anything but the seeds and ``epoch`` for a given
    ``world``; ``world=1`` is one order of all rows.
    """
    g = int(mix_group)
    block = order_block(chunk_rows, g)
    pieces: dict[int, tuple[np.ndarray, int]] = {}  # group -> (its rows in pair order, first offset)
    for b, a, z in rank_span(num_rows, block, world, rank, order_seed, epoch):
        base = b * block
        for grp in range((base + a) // g, (base + z - 1) // g + 1):
            members = np.arange(grp * g, min((grp + 1) * g, num_rows))
            seq = pair_order(view_seed, view_epoch, grp, members) if mixing else members
            off, end = max(base + a - grp * g, 0), min(base + z - grp * g, len(members))
            pieces[grp] = (seq[off:end], off)
    rng = np.random.default_rng([int(order_seed), 0x6F72, int(epoch), int(rank)])
    groups = sorted(pieces)
    parts = []
    for i in rng.permutation(len(groups)):
        seq, off = pieces[groups[int(i)]]
        if mixing:  # whole pairs shuffled; a row whose partner is in another share goes last
            head = off % 2
            n_pairs = (len(seq) - head) // 2
            pairs = seq[head:head + 2 * n_pairs].reshape(n_pairs, 2)[rng.permutation(n_pairs)].ravel()
            parts.append(np.concatenate([pairs, seq[:head], seq[head + 2 * n_pairs:]]))
        else:
            parts.append(seq[rng.permutation(len(seq))])
    return np.concatenate(parts).astype(np.int64, copy=False) if parts else np.zeros(0, np.int64)


def epoch_steps(num_rows: int, batch_size: int, world: int, min_rows: int = 1) -> int:
    """Steps every rank takes in an epoch (DDP: all the same): enough batches of ``batch_size``
    for the largest share, and no more than the smallest share can fill with ``min_rows`` views
    each (2 for a BatchNorm student, which cannot train on one view; 0 with fewer rows than
    that: nothing to split evenly). Depends only on the row count, batch size and world size."""
    least, most = num_rows // world, -(-num_rows // world)
    return min(-(-most // batch_size), least // max(int(min_rows), 1))


def train_items(order: np.ndarray, view_epoch: int, batch_size: int, steps: int | None = None,
                min_rows: int = 1) -> list[Item]:
    """A rank's batches of an epoch: ``order`` (its share, :func:`epoch_order`) cut into
    ``steps`` batches (default: as many as it needs), full batches first; the rows left after
    them are split evenly over the last ones, so every rank takes the same number of steps and
    every row of the share is in one batch. No batch gets fewer than ``min_rows`` rows when the
    share has them (a one-view rest of a BatchNorm student is merged into the batch before)."""
    n, b, m = len(order), int(batch_size), max(int(min_rows), 1)
    steps = -(-n // b) if steps is None else int(steps)
    steps = min(steps, max(n // m, 1))
    if steps <= 0 or n == 0:
        return []
    full = min(n // b, steps - 1)
    while full > 0 and n - full * b < (steps - full) * m:  # every batch gets at least min_rows rows
        full -= 1
    cuts = [order[t * b:(t + 1) * b] for t in range(full)] + np.array_split(order[full * b:], steps - full)
    return [Item(int(view_epoch), rows, len(rows)) for rows in cuts]


# ---- targets ----------------------------------------------------------------------------------

class ChunkTargets:
    """Stored targets (every kind the store holds) of one worker's items, reading each store
    chunk it needs once.

    When a chunk is first needed it is read whole and the rows this worker will ask for later
    are kept; rows are dropped once handed out. Memory: at most this worker's share of an
    epoch's targets.
    """

    def __init__(self, store, items: Sequence[Item]):
        self.store, self.cr = store, store.chunk_rows
        self.need: dict[tuple[int, int], list[np.ndarray]] = {}
        for it in items:
            for c in np.unique(it.rows // self.cr):
                self.need.setdefault((it.epoch, int(c)), []).append(it.rows[it.rows // self.cr == c])
        self.cache: dict[tuple[int, int], list] = {}
        self.reads = 0
        self._count = threading.Lock()  # _load may run in several threads (ranktargets)

    def get(self, epoch: int, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The stored targets of ``rows`` by field name (``logp``, ``index``, ``attention``, ...)."""
        out: dict[str, np.ndarray] = {}
        chunks = rows // self.cr
        for c in np.unique(chunks):
            key = (int(epoch), int(c))
            if key not in self.cache:
                self.cache[key] = self._load(*key)
            kept, values, left = self.cache[key]
            sel = chunks == c
            pos = np.searchsorted(kept, rows[sel])
            for name, v in values.items():
                if name not in out:
                    out[name] = np.empty((len(rows),) + v.shape[1:], v.dtype)
                out[name][sel] = v[pos]
            left -= int(sel.sum())
            if left <= 0:
                del self.cache[key]
            else:
                self.cache[key][2] = left
        return out

    def _load(self, epoch: int, chunk: int) -> list:
        want = np.unique(np.concatenate(self.need.pop((epoch, chunk))))
        lo = chunk * self.cr
        values = self.store.targets(epoch, slice(lo, min(lo + self.cr, self.store.num_rows)))
        with self._count:
            self.reads += 1
        return [want, {name: v[want - lo].copy() for name, v in values.items()}, len(want)]


# ---- the stream -------------------------------------------------------------------------------

class ViewStream(IterableDataset):
    """IterableDataset of a rank's batches of views: :class:`~tinydistill.batch.Batch` with
    pixels rendered by the workers, or, for the torch renderer, :class:`~tinydistill.batch.Encoded`
    batches that a :class:`~tinydistill.render_device.DeviceRenderer` renders in the main
    process. Their views carry ``worker`` / ``busy_s`` (which worker made them, and the seconds
    it worked on them). Use ``DataLoader(stream, batch_size=None, num_workers=W)``.
    """

    def __init__(self, core: Views, items: Sequence[Item], encoded: bool | None = None):
        self.core, self.items = core, list(items)
        # encoded batches (Views.encode: bytes + records) for a DeviceRenderer in the main
        # process; the renderer alone decides (ENCODED_RENDERERS), on every device
        self.encoded = core.spec.renderer in ENCODED_RENDERERS if encoded is None else bool(encoded)

    def __len__(self) -> int:
        return sum(it.num_batches for it in self.items)

    @property
    def num_views(self) -> int:
        return sum(len(it.rows) for it in self.items)

    def __iter__(self) -> Iterator[Batch | Encoded]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        t0 = time.perf_counter()
        for it in self.items[wid::nw]:
            step = it.render or len(it.rows)
            for start in range(0, len(it.rows), step):
                rows = it.rows[start:start + step]
                rendered = None if self.encoded else self.core.render(it.epoch, rows)
                for lo in range(0, len(rows), it.batch):
                    if self.encoded:  # bytes and records only: pixels are made on the device
                        batch = self.core.encode(it.epoch, rows[lo:lo + it.batch])
                    else:
                        batch = rendered.slice(lo, lo + it.batch)
                    views = batch.views if self.encoded else batch
                    views.worker, views.busy_s = wid, time.perf_counter() - t0
                    yield batch
                    t0 = time.perf_counter()


class Meter:
    """Where a consuming loop's time goes: each worker's views and busy seconds, and the time
    the main process waited for data (the rest is its own work: the model). It wraps what the
    model consumes (after a DeviceRenderer, if any), so waiting for the renderer counts as
    waiting; ``renderer`` adds the render thread's busy share."""

    def __init__(self, workers: int, renderer=None):
        self.renderer = renderer
        self.n = max(workers, 1)
        self.worker_views = [0] * self.n
        self.busy = [0.0] * self.n
        self.wait = 0.0
        self.t0 = time.perf_counter()

    def __call__(self, loader) -> Iterator[Batch]:
        it = iter(loader)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait += time.perf_counter() - t
            self.worker_views[batch.worker] += len(batch)
            self.busy[batch.worker] += batch.busy_s
            yield batch

    def report(self) -> dict:
        wall = max(time.perf_counter() - self.t0, 1e-9)
        out = {"wall_s": round(wall, 3), "wait_s": round(self.wait, 3),
               "main_busy_share": round(1 - self.wait / wall, 3),
               "worker_views": list(self.worker_views),
               "worker_busy_share": [round(b / wall, 3) for b in self.busy]}
        if self.renderer is not None:
            out["render_busy_share"] = round(self.renderer.busy / wall, 3)
            out["render_units"] = self.renderer.units
        return out
