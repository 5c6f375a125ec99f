"""Stored targets joined to batches in a rank's main process, each store chunk read once.

Joined in DataLoader workers, a random order makes every worker need nearly every chunk, so an
epoch's targets were read ``workers`` times per rank. Here the rank's main process reads each
chunk its batches need once per epoch (whole chunks: the store's fast path), whatever the
worker count; a few threads fetch chunks ahead in the order the batches first need them, so
the model rarely waits. Memory: at most this rank's share of one epoch's targets.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch

from .batch import Batch
from .stream import ChunkTargets, Item


class RankTargets:
    def __init__(self, store, items: Sequence[Item], threads: int = 4):
        self.chunks = ChunkTargets(store, items)
        order: dict = {}  # chunks in the order batches first need them
        for it in items:
            for c in (it.rows // store.chunk_rows).tolist():
                order.setdefault((it.epoch, c), None)
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="targets")
        self._pending = {key: self._pool.submit(self.chunks._load, *key) for key in order}

    @property
    def reads(self) -> int:
        return self.chunks.reads

    def get(self, epoch: int, rows: np.ndarray) -> dict[str, np.ndarray]:
        rows = np.asarray(rows, np.int64)
        for c in np.unique(rows // self.chunks.cr).tolist():
            fut = self._pending.pop((int(epoch), c), None)
            if fut is not None:
                self.chunks.cache[(int(epoch), c)] = fut.result()  # re-raises a read error here
        return self.chunks.get(epoch, rows)

    def join(self, batch: Batch) -> Batch:
        """The batch with its stored targets (``logp``, ``index``, and every other kind the
        store holds); views never written (skipped by gen-logits) become invalid."""
        got = self.get(int(batch.epoch[0]), batch.row.numpy())
        batch.targets = {name: torch.from_numpy(v) for name, v in got.items()}
        batch.valid = batch.valid & ~torch.isnan(batch.targets["logp"][:, 0])
        return batch

    def close(self) -> None:
        for fut in self._pending.values():
            fut.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
