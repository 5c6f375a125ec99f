"""Writing a store: one whole (epoch, shard) unit at a time, then its ``complete`` marker.

Writers always write whole (epoch, shard) units, one writer per unit, so any number of
processes or nodes can fill disjoint shards of one store at once. The ``complete`` marker of
a unit is written only after its data is written (and fsynced on local disks), so a writer
killed mid-shard leaves a unit that reads as incomplete, never one that reads as complete
but is not. A writer lists the markers once and keeps the set, so writing E x S units costs
one listing, not E x S. :class:`WriteMixin` is part of :class:`tinydistill.store.LogitStore`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import zarr
from zarr.core.sync import sync

from ..errors import StoreError, one_line
from .format import SEED_SKIPPED


def _fsync_path(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriteMixin:
    """:meth:`write_shard` and the durability of what it writes."""

    def write_shard(self, epoch: int, shard: int, logp, index, seed, skipped=None, **targets) -> None:
        """Write one whole (epoch, shard) unit, then mark it complete.

        ``logp`` [n, K] are top-K log-probabilities (any order, any float dtype), ``index``
        [n, K] their class ids, ``seed`` [n] the encoded view seeds, n = the shard's rows;
        ``targets`` the values of the store's other target kinds by field name (e.g.
        ``attention`` [n, G, G]). ``skipped`` (bool [n]) marks views whose image could not be
        read: they are stored with NaN log-probs, ids -1, no map and seed ``SEED_SKIPPED``,
        whatever the values hold. One writer per unit: concurrent writers must take disjoint
        (epoch, shard) units.
        """
        if self.mode != "r+":
            raise StoreError(f"{self.path}: store is open read-only")
        if not 0 <= epoch < self.epochs:
            raise IndexError(f"{self.path}: epoch {epoch} out of range [0, {self.epochs})")
        start, stop = self.shard_bounds(shard)
        n = stop - start
        where = f"{self.path}: epoch {epoch} shard {shard}"
        seed = np.asarray(seed)
        if seed.shape != (n,):
            raise StoreError(f"{where}: expected seed [{n}], got {list(seed.shape)}")
        skip = np.zeros(n, bool) if skipped is None else np.asarray(skipped, bool)
        if skip.shape != (n,):
            raise StoreError(f"{where}: skipped must be a bool mask of {n} rows")
        seed = np.where(skip, SEED_SKIPPED, seed.astype(np.uint64))
        if (seed[~skip] >= SEED_SKIPPED).any():
            raise StoreError(f"{where}: seed values 2**64-2 and 2**64-1 are reserved")
        values = {"logp": logp, "index": index, **targets}
        fields = [f for kind in self.kinds for f in kind.fields]
        missing, extra = [f for f in fields if values.get(f) is None], sorted(set(values) - set(fields))
        if missing or extra:
            raise StoreError(f"{where}: the store holds {', '.join(fields)}; "
                             + (f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(extra)}"))
        stored = {}
        for kind in self.kinds:  # each kind's own encoding (and checks) of its values
            stored.update(kind.encode({f: values[f] for f in kind.fields}, skip, where))
        marker = self._marker_key(epoch, shard)
        arrays = [self._handle(name) for name in stored] + [self._seed]
        try:
            # rewriting: unmark first, never mark stale data. The markers are listed once, by the
            # first write (or complete_mask), and kept up to date here: no listing per unit
            if self.complete_mask()[epoch, shard]:
                sync(self._group.store.delete(marker))
                self._mask[epoch, shard] = False
            for name, data in stored.items():
                self._handle(name)[epoch, start:stop] = data.astype(self._handle(name).dtype)
            self._seed[epoch, start:stop] = seed
            self._fsync([self._shard_key(a, epoch, shard) for a in arrays])
            self._complete[epoch, shard] = 1
            self._fsync([marker])
        except Exception as e:
            raise StoreError(f"{where}: write failed, unit left incomplete ({one_line(e)})") from None
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
