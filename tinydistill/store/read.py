"""Reading a store: rows of one epoch (by index, slice, mask or key) -> targets and seeds.

:class:`ReadMixin` is part of :class:`tinydistill.store.LogitStore`; it uses the store's
shape, target kinds, array handles and completeness.
"""

from __future__ import annotations

import numpy as np

from ..errors import CorruptStoreError, IncompleteError, StoreError, one_line
from .format import SEED_SKIPPED, SEED_UNSET


def object_sizes(zstore) -> dict[str, int]:
    """Bytes of every object of a zarr store, by key. On object storage the sizes come with the
    listing (one request per listing page, up to 1000 objects), never a request per object."""
    from zarr.core.sync import sync

    fs = getattr(zstore, "fs", None)
    if fs is not None and hasattr(fs, "_find"):  # FsspecStore (s3://, gs://, memory://, ...)
        root = zstore.path.rstrip("/")
        found = sync(fs._find(root, detail=True))
        return {p[len(root) + 1:]: int(info.get("size") or 0) for p, info in found.items()
                if p.startswith(root + "/") and info.get("type", "file") == "file"}

    async def sizes() -> dict[str, int]:  # a local store: a stat per file is cheap
        return {k: int(await zstore.getsize(k)) async for k in zstore.list_prefix("")}

    return sync(sizes())


class ReadMixin:
    """Reading rows: :meth:`targets`, :meth:`topk`, :meth:`attention`, :meth:`seeds`, :meth:`dense`,
    :meth:`skipped`, :meth:`check`."""

    def _rows(self, epoch: int, rows) -> tuple[np.ndarray | slice, int]:
        if not 0 <= int(epoch) < self.epochs:
            raise IndexError(f"{self.path}: epoch {epoch} out of range [0, {self.epochs})")
        if isinstance(rows, str):  # a sample key
            rows = self.row_of(rows)
        elif not isinstance(rows, slice):
            arr = np.asarray(rows) if not isinstance(rows, (list, tuple)) or rows else np.zeros(0, np.int64)
            if arr.dtype == bool:
                if arr.shape != (self.num_rows,):
                    raise IndexError(f"{self.path}: a boolean mask of rows needs {self.num_rows} entries, "
                                     f"got shape {arr.shape}")
                rows = np.nonzero(arr)[0]
            elif arr.dtype.kind in "UO" and arr.ndim == 1:  # sample keys
                rows = self.rows_of(arr.tolist())
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.num_rows)
            if step == 1:
                return slice(start, max(start, stop)), max(0, stop - start)
            rows = np.arange(start, stop, step)
        idx = np.atleast_1d(np.asarray(rows))
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise IndexError(f"{self.path}: rows must be an int, a slice, a 1-D integer array, a "
                             "boolean mask, or sample keys")
        idx = idx.astype(np.int64)
        idx = np.where(idx < 0, idx + self.num_rows, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_rows):
            raise IndexError(f"{self.path}: row out of range [0, {self.num_rows})")
        return idx, idx.size

    def _check_complete(self, epoch: int, sel) -> None:
        if isinstance(sel, slice):
            if sel.stop <= sel.start:
                return
            shards = np.arange(sel.start // self.shard_rows, (sel.stop - 1) // self.shard_rows + 1)
        else:
            shards = np.unique(sel // self.shard_rows)
        if not self.complete_mask()[epoch, shards].all():
            missing = shards[~self.complete_mask(refresh=True)[epoch, shards]]
            if missing.size:
                raise IncompleteError(
                    f"{self.path}: epoch {epoch} shard(s) {missing.tolist()[:8]} not written yet"
                )

    def _read(self, arr, epoch: int, sel) -> np.ndarray:
        """Rows of one epoch, reading whole chunks (a random single-row read costs ~1.5 ms)."""
        name = arr.basename
        try:
            if isinstance(sel, slice):
                return arr[epoch, sel]
            out = np.empty((sel.size,) + arr.shape[2:], dtype=arr.dtype)
            if sel.size == 0:
                return out
            chunks = np.unique(sel // self.chunk_rows)
            # coalesce runs of consecutive chunks into one read each
            breaks = np.nonzero(np.diff(chunks) != 1)[0] + 1
            for run in np.split(chunks, breaks):
                lo = int(run[0]) * self.chunk_rows
                hi = min((int(run[-1]) + 1) * self.chunk_rows, self.num_rows)
                block = arr[epoch, lo:hi]
                m = (sel >= lo) & (sel < hi)
                out[m] = block[sel[m] - lo]
            return out
        except Exception as e:
            if "checksum" in str(e).lower():
                raise CorruptStoreError(
                    f"{self.path}: corrupted bytes in '{name}' epoch {epoch} (checksum mismatch); "
                    "regenerate the affected shard"
                ) from None
            raise CorruptStoreError(
                f"{self.path}: cannot read '{name}' epoch {epoch} ({one_line(e)})"
            ) from None

    def targets(self, epoch: int, rows, kinds=None) -> dict[str, np.ndarray]:
        """Every target field of rows of one epoch, as stored (top-K in ascending class-id
        order), by field name: ``logp``, ``index`` and, when the store has maps, ``attention``.
        ``kinds`` (names) limits the read to those kinds. ``rows`` as in :meth:`topk`.
        Skipped views hold NaN log-probs, ids -1 and NaN maps."""
        sel, _ = self._rows(epoch, rows)
        self._check_complete(epoch, sel)
        out, empty = {}, None
        for kind in self.kinds:
            if kinds is not None and kind.name not in kinds:
                continue
            values, missing = kind.decode({a.name: self._read(self._handle(a.name), epoch, sel) for a in kind.arrays()})
            out.update(values)
            empty = missing if empty is None else empty | missing
        if empty is not None and empty.any():
            rows_bad = (np.arange(sel.start, sel.stop) if isinstance(sel, slice) else sel)[empty]  # the rows read only
            if not (self._read(self._seed, epoch, rows_bad) == SEED_SKIPPED).all():
                raise CorruptStoreError(
                    f"{self.path}: epoch {epoch} rows {rows_bad[:5].tolist()} are recorded complete "
                    "but hold no data (shard truncated or deleted)"
                )
            # skipped views (unreadable images) hold no targets: never a fake one
        return out

    def topk(self, epoch: int, rows, order: str = "desc", names: bool = False):
        """(log-probs float32 [n, K], class ids int64 [n, K]) for rows of one epoch.

        ``rows``: an int, a slice, an integer array (any order, repeats allowed), a boolean
        mask over all rows, a sample key or a list of keys. ``order="desc"`` sorts each row
        by descending log-probability; ``"stored"`` keeps the on-disk ascending class-id order
        (cheaper; the KD loss does not care). ``names=True`` adds a third array, the class
        names (object [n, K]; None for a skipped view).
        """
        if order not in ("desc", "stored"):
            raise ValueError(f"order must be 'desc' or 'stored', got {order!r}")
        t = self.targets(epoch, rows, kinds=("topk",))
        logp, index = t["logp"], t["index"]
        if order == "desc":
            o = np.argsort(-logp, axis=1, kind="stable")
            logp = np.take_along_axis(logp, o, 1)
            index = np.take_along_axis(index, o, 1)
        if names:
            return logp, index, self._class_name_table()[index]  # id -1 (skipped) -> None
        return logp, index

    def attention(self, epoch: int, rows) -> np.ndarray:
        """The teacher's attention maps of rows of one epoch: float32 [n, G, G], each summing to
        1 (NaN for a skipped view). A one-line error when the store holds none."""
        if self.kind("attention") is None:
            raise StoreError(f"{self.path}: holds no attention maps (made without gen-logits --attention-grid)")
        return self.targets(epoch, rows, kinds=("attention",))["attention"]

    def dense(self, epoch: int, rows, temperature: float = 1.0) -> np.ndarray:
        """Dense float32 [n, C] targets with TinyViT's smoothing (see :mod:`tinydistill.targets`)."""
        import torch

        from ..targets import dense_targets

        logp, index = self.topk(epoch, rows, order="stored")
        return dense_targets(torch.from_numpy(logp), torch.from_numpy(index), self.num_classes,
                             temperature).numpy()

    def seeds(self, epoch: int, rows) -> np.ndarray:
        """Encoded per-view seeds, uint64 [n]."""
        sel, _ = self._rows(epoch, rows)
        self._check_complete(epoch, sel)
        seed = self._read(self._seed, epoch, sel)
        if (seed == SEED_UNSET).any():
            raise CorruptStoreError(
                f"{self.path}: epoch {epoch} seeds are recorded complete but missing "
                "(shard truncated or deleted)"
            )
        return seed

    def skipped(self, epoch: int, rows) -> np.ndarray:
        """Bool [n]: views skipped because their image could not be read (``--skip-bad``)."""
        return self.seeds(epoch, rows) == SEED_SKIPPED

    def check(self, epochs=None) -> list[tuple[int, int, str]]:
        """Read every complete unit in full; return (epoch, shard, reason) for each bad one."""
        bad = []
        mask = self.complete_mask(refresh=True)
        for e in range(self.epochs) if epochs is None else epochs:
            for s in np.nonzero(mask[e])[0]:
                rows = slice(*self.shard_bounds(int(s)))
                try:
                    self.targets(e, rows)
                    self.seeds(e, rows)
                except CorruptStoreError as err:
                    bad.append((int(e), int(s), str(err)))
        return bad

    def canary_pixels(self) -> np.ndarray | None:
        """The replay canary's views as the store's renderer made them (float32 [n, 3, S, S]),
        or None for stores without them."""
        try:
            return np.asarray(self._group["canary_pixels"][...], dtype=np.float32)
        except KeyError:
            return None
