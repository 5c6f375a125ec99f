"""Writing a store: one whole (epoch, shard) unit at a time, then its ``complete`` marker.

Writers always write whole (epoch, shard) units, one writer per unit, so any number of
processes or nodes can fill disjoint shards of one store at once. The ``complete`` marker of
a unit is written only after its data is written (and fsynced on local disks), so a writer
killed mid-shard leaves a unit that reads as incomplete, never one that reads as complete
but is not. :class:`WriteMixin` is part of :class:`tinydistill.store.LogitStore`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import zarr
from zarr.core.sync import sync

from ..errors import StoreError, one_line
from .format import SEED_SKIPPED, ids_to_gaps, stored_logp


def _fsync_path(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriteMixin:
    """:meth:`write_shard` and the durability of what it writes."""

    def write_shard(self, epoch: int, shard: int, logp, index, seed, skipped=None) -> None:
        """Write one whole (epoch, shard) unit, then mark it complete.

        ``logp`` [n, K] are top-K log-probabilities (any order, any float dtype), ``index``
        [n, K] their class ids, ``seed`` [n] the encoded view seeds, n = the shard's rows.
        ``skipped`` (bool [n]) marks views whose image could not be read: they are stored with
        NaN log-probs, ids -1 and seed ``SEED_SKIPPED``, whatever ``logp``/``index`` hold.
        One writer per unit: concurrent writers must take disjoint (epoch, shard) units.
        """
        if self.mode != "r+":
            raise StoreError(f"{self.path}: store is open read-only")
        if not 0 <= epoch < self.epochs:
            raise IndexError(f"{self.path}: epoch {epoch} out of range [0, {self.epochs})")
        start, stop = self.shard_bounds(shard)
        n = stop - start
        logp = np.asarray(logp, dtype=np.float32)
        index = np.asarray(index)
        seed = np.asarray(seed)
        where = f"{self.path}: epoch {epoch} shard {shard}"
        if logp.shape != (n, self.k) or index.shape != (n, self.k) or seed.shape != (n,):
            raise StoreError(
                f"{where}: expected logp/index [{n}, {self.k}] and seed [{n}], got "
                f"{list(logp.shape)}, {list(index.shape)}, {list(seed.shape)}"
            )
        skip = np.zeros(n, bool) if skipped is None else np.asarray(skipped, bool)
        if skip.shape != (n,):
            raise StoreError(f"{where}: skipped must be a bool mask of {n} rows")
        seed = np.where(skip, SEED_SKIPPED, seed.astype(np.uint64))
        index = np.where(skip[:, None], np.arange(self.k), index)  # placeholders, replaced below
        logp = np.where(skip[:, None], 0.0, logp)
        if np.isnan(logp).any():
            raise StoreError(f"{where}: log-probabilities contain NaN")
        if (seed[~skip] >= SEED_SKIPPED).any():
            raise StoreError(f"{where}: seed values 2**64-2 and 2**64-1 are reserved")
        if ((index < 0) | (index >= self.num_classes)).any():
            raise StoreError(f"{where}: class ids outside [0, {self.num_classes})")
        order = np.argsort(index, axis=1, kind="stable")
        index = np.take_along_axis(index, order, 1)
        logp = np.take_along_axis(logp, order, 1)
        if self.k > 1 and not (np.diff(index, axis=1) > 0).all():
            raise StoreError(f"{where}: a row repeats a class id")
        logp = stored_logp(logp)
        logp[skip], index[skip] = np.nan, -1
        if self._gaps:
            index = ids_to_gaps(index)
            index[skip] = -1
        marker = self._marker_key(epoch, shard)
        try:
            if self.is_complete(epoch, shard):  # rewriting: unmark first, never mark stale data
                sync(self._group.store.delete(marker))
            self._logp[epoch, start:stop] = logp
            self._index[epoch, start:stop] = index.astype(self._index.dtype)
            self._seed[epoch, start:stop] = seed
            self._fsync([self._shard_key(a, epoch, shard) for a in (self._logp, self._index, self._seed)])
            self._complete[epoch, shard] = 1
            self._fsync([marker])
        except Exception as e:
            raise StoreError(f"{where}: write failed, unit left incomplete ({one_line(e)})") from None
        if self._mask is not None:
            self._mask[epoch, shard] = True

    @staticmethod
    def _shard_key(arr, epoch: int, shard: int) -> str:
        coords = (epoch, shard) + (0,) * (arr.ndim - 2)
        return f"{arr.basename}/{arr.metadata.encode_chunk_key(coords)}"

    def _marker_key(self, epoch: int, shard: int) -> str:
        return f"complete/{self._complete.metadata.encode_chunk_key((epoch, shard))}"

    def _fsync(self, keys: list[str]) -> None:
        """Make written objects durable on local disks (object stores are durable on PUT)."""
        root = getattr(self._group.store, "root", None)
        if root is None or not isinstance(self._group.store, zarr.storage.LocalStore):
            return
        dirs = set()
        for key in keys:
            p = Path(root) / key
            _fsync_path(p)
            dirs.add(p.parent)
        for d in dirs:
            _fsync_path(d)
