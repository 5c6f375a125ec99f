"""The logit store: a Zarr v3 group with each view's sparse top-K teacher outputs and seed.

Layout (E epochs, N rows, K kept classes, S = ceil(N / shard_rows) shards per epoch)::

    logp      (E, N, K) float16   top-K log-probabilities at T=1 (fill NaN = never written)
    index     (E, N, K) int16     class ids (int32 when num_classes > 32767), fill -1
    seed      (E, N)    uint64    encoded per-view seed (fill 2**64-1 = never written,
                                  2**64-2 = view skipped: unreadable image, NaN log-probs)
    key       (N,)      string    sample keys, in store order
    label     (N,)      int32     ground-truth labels, -1 when unknown
    complete  (E, S)    uint8     1 once (epoch, shard) is durably written

Within a row the K entries are stored in ascending class-id order, and ``index`` carries a
delta filter: sorted ids of a confident teacher are close together, so the deltas compress
far better than ids in rank order. :meth:`LogitStore.topk` gives rows back in descending
log-probability order. Every chunk carries a crc32c checksum.

Writers always write whole (epoch, shard) units, one writer per unit, so any number of
processes or nodes can fill disjoint shards of one store at once. The ``complete`` marker of
a unit is written only after its data is written (and fsynced on local disks), so a writer
killed mid-shard leaves a unit that reads as incomplete, never one that reads as complete
but is not.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

import warnings

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.sync import sync

from . import __version__
from ._util import keys_fingerprint, library_versions, spec_hash
from .errors import (
    CorruptStoreError,
    FormatVersionError,
    IncompleteError,
    NotAStoreError,
    StoreError,
)
from .targets import dense_targets

FORMAT_VERSION = 1
FORMAT_KEY = "tinydistill_format"  # group attribute that marks a finished tinydistill store
from .config import DEFAULT_CHUNK_ROWS, DEFAULT_SHARD_CHUNKS  # noqa: E402  (the layout's defaults)
FP16_MIN = float(np.finfo(np.float16).min)
SEED_UNSET = np.iinfo(np.uint64).max  # fill value of ``seed``: a seed that was never written
SEED_SKIPPED = SEED_UNSET - np.uint64(1)  # seed of a view whose image could not be read (--skip-bad)

# the delta filter is numcodecs' (zarr-python reads it; other implementations may not)
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3", category=UserWarning)


def _compressors():
    # zstd level 5 is the knee of write speed against size; shuffle groups the bytes of
    # each element; crc32c makes any flipped byte fail the read instead of decoding garbage.
    return [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"), Crc32cCodec()]


def _delta(dtype: str):
    from zarr.codecs.numcodecs import Delta  # numcodecs' codec, wrapped for zarr v3

    return [Delta(dtype=dtype)]


def _local(path: str) -> str:
    """file:// URLs are local paths: open them with LocalStore, which can fsync."""
    return path[len("file://"):] if path.startswith("file://") else path


def _is_url(path: str) -> bool:
    return "://" in _local(path)


def _open_group(path: str, mode: str, storage_options: dict | None):
    kwargs = {"storage_options": storage_options} if storage_options else {}
    return zarr.open_group(_local(path), mode=mode, zarr_format=3, **kwargs)


async def _list(store, prefix: str) -> list[str]:
    return [k async for k in store.list_prefix(prefix)]


def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}".rstrip(": ")


def create_store(
    path: str | os.PathLike,
    *,
    num_classes: int,
    k: int,
    epochs: int,
    keys: Sequence[str],
    labels: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    teacher: dict | None = None,
    augmentation: dict | None = None,
    base_seed: int = 0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    shard_rows: int | None = None,
    attrs: dict | None = None,
    arrays: dict | None = None,
    overwrite: bool = False,
    storage_options: dict | None = None,
) -> "LogitStore":
    """Create an empty store and return it open for writing (rank 0 calls this; others open).

    ``teacher`` describes the teacher (name, weights digest, input size, mean/std);
    ``augmentation`` is the view spec whose hash replay checks. Both are free-form dicts.
    ``arrays`` maps extra array names to (values, dimension names), written with the store.
    """
    path = str(path)
    keys = [str(x) for x in keys]
    n = len(keys)
    if n < 1:
        raise StoreError(f"{path}: cannot create a store with no samples")
    if not 1 <= k <= num_classes:
        raise StoreError(f"{path}: K={k} must be between 1 and num_classes={num_classes}")
    if epochs < 1:
        raise StoreError(f"{path}: epochs must be >= 1, got {epochs}")
    if len(set(keys)) != n:
        raise StoreError(f"{path}: sample keys are not unique")
    labels_arr = np.full(n, -1, np.int32) if labels is None else np.asarray(labels, np.int64)
    if labels_arr.shape != (n,):
        raise StoreError(f"{path}: {len(labels_arr)} labels for {n} keys")
    if ((labels_arr < -1) | (labels_arr >= num_classes)).any():
        raise StoreError(f"{path}: labels must be -1 (unknown) or in [0, {num_classes})")
    names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise StoreError(f"{path}: {len(names)} class names for num_classes={num_classes}")
    shard_rows = shard_rows or chunk_rows * DEFAULT_SHARD_CHUNKS
    if chunk_rows < 1 or shard_rows % chunk_rows:
        raise StoreError(f"{path}: shard_rows={shard_rows} must be a multiple of chunk_rows={chunk_rows}")
    local = Path(_local(path))
    if not _is_url(path) and local.exists() and (not local.is_dir() or any(local.iterdir())) and not overwrite:
        raise StoreError(f"{path}: already exists and is not empty (use --overwrite to replace it)")

    n_shards = -(-n // shard_rows)
    index_dtype = "int16" if num_classes <= np.iinfo(np.int16).max + 1 else "int32"
    try:
        g = _open_group(path, "w" if overwrite else "w-", storage_options)
        common = dict(compressors=_compressors())
        g.create_array("logp", shape=(epochs, n, k), dtype="float16", chunks=(1, chunk_rows, k),
                       shards=(1, shard_rows, k), fill_value=np.nan,
                       dimension_names=("epoch", "row", "rank"), **common)
        g.create_array("index", shape=(epochs, n, k), dtype=index_dtype, chunks=(1, chunk_rows, k),
                       shards=(1, shard_rows, k), fill_value=-1, filters=_delta(index_dtype),
                       dimension_names=("epoch", "row", "rank"), **common)
        g.create_array("seed", shape=(epochs, n), dtype="uint64", chunks=(1, chunk_rows),
                       shards=(1, shard_rows), fill_value=SEED_UNSET, filters=_delta("uint64"),
                       dimension_names=("epoch", "row"), **common)
        g.create_array("key", shape=(n,), dtype=str, chunks=(min(n, 65536),), **common)
        g.create_array("label", shape=(n,), dtype="int32", chunks=(min(n, 65536),), fill_value=-1, **common)
        # one tiny chunk per (epoch, shard): each writer sets only its own markers
        g.create_array("complete", shape=(epochs, n_shards), dtype="uint8", chunks=(1, 1),
                       fill_value=0, compressors=None, dimension_names=("epoch", "shard"))
        g["key"][:] = np.array(keys, dtype=object)
        g["label"][:] = labels_arr.astype(np.int32)
        for name, (values, dims) in (arrays or {}).items():  # small extras, e.g. the canary's pixels
            values = np.asarray(values)
            g.create_array(name, shape=values.shape, dtype=values.dtype, chunks=values.shape,
                           dimension_names=dims, **common)
            g[name][...] = values
        meta = {
            "num_classes": int(num_classes),
            "k": int(k),
            "epochs": int(epochs),
            "num_rows": n,
            "chunk_rows": int(chunk_rows),
            "shard_rows": int(shard_rows),
            "index_order": "ascending class id within each row",
            "class_names": names,
            "teacher": teacher or {},
            "augmentation": augmentation or {},
            "spec_hash": spec_hash(augmentation or {}),
            "dataset_fingerprint": keys_fingerprint(keys),
            "base_seed": int(base_seed),
            "versions": library_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(attrs or {}),
        }
        # the format marker goes in last: a creation that died half way is not a store
        g.attrs.update(meta)
        g.attrs[FORMAT_KEY] = FORMAT_VERSION
    except StoreError:
        raise
    except Exception as e:  # permission denied, disk full, existing group, bad URL ...
        raise StoreError(f"{path}: cannot create store: {_one_line(e)}") from e
    return LogitStore(path, mode="r+", storage_options=storage_options)


def open_store(path: str | os.PathLike, mode: str = "r", storage_options: dict | None = None) -> "LogitStore":
    """Open a store read-only (``mode="r"``, the default) or for writing shards (``"r+"``)."""
    return LogitStore(str(path), mode=mode, storage_options=storage_options)


def _keep_tail_mass(logp: np.ndarray) -> np.ndarray:
    """fp16 log-probs whose top-K mass stays below the fp32 mass when that is below 1.

    Rounding a confident row to fp16 can push its top-K sum to 1 or more, which would leave
    nothing for the other C - K classes (an infinite KL against the exact targets). For those
    rows (~0.15 % of a peaky C=1000 teacher) the largest entry is lowered just enough.
    """
    half = logp.astype(np.float16)
    exact = np.exp(logp.astype(np.float64)).sum(1)
    stored = np.exp(half.astype(np.float64)).sum(1)
    for r in np.nonzero((stored >= 1) & (exact < 1))[0]:
        j = int(np.argmax(half[r]))
        for _ in range(64):
            others = stored[r] - np.exp(float(half[r, j]))
            target = max(exact[r] - others, 1e-30) * (1 - 1e-6)
            half[r, j] = min(np.float16(np.log(target)), np.nextafter(half[r, j], np.float16(-np.inf)))
            stored[r] = others + np.exp(float(half[r, j]))
            if stored[r] < exact[r]:
                break
    return half


def stored_logp(logp: np.ndarray) -> np.ndarray:
    """The fp16 values the store keeps for float log-probs [n, K] (what ``verify`` compares)."""
    # fp16 holds log-probs down to -65504; anything lower is probability 0 anyway
    return _keep_tail_mass(np.clip(logp, FP16_MIN, 0.0))


class LogitStore:
    """A logit store opened from a path or fsspec URL. See the module docstring for the layout."""

    def __init__(self, path: str, mode: str = "r", storage_options: dict | None = None):
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        self.path = path
        self.mode = mode
        self._storage_options = storage_options
        if not _is_url(path) and not Path(_local(path)).exists():
            raise NotAStoreError(f"{path}: no such file or directory")
        try:
            self._group = _open_group(path, mode, storage_options)
            attrs = dict(self._group.attrs)
        except Exception as e:
            raise NotAStoreError(f"{path}: not a tinydistill store ({_one_line(e)})") from e
        version = attrs.get(FORMAT_KEY)
        if version is None:
            raise NotAStoreError(f"{path}: not a tinydistill store (no '{FORMAT_KEY}' attribute)")
        if version != FORMAT_VERSION:
            raise FormatVersionError(
                f"{path}: store format version {version}, this tinydistill ({__version__}) reads version {FORMAT_VERSION}"
            )
        self.attrs = attrs
        try:
            self._logp = self._group["logp"]
            self._index = self._group["index"]
            self._seed = self._group["seed"]
            self._complete = self._group["complete"]
        except Exception as e:
            raise CorruptStoreError(f"{path}: store is missing an array ({_one_line(e)})") from e
        self.num_classes = int(attrs["num_classes"])
        self.k = int(attrs["k"])
        self.epochs = int(attrs["epochs"])
        self.num_rows = int(attrs["num_rows"])
        self.chunk_rows = int(attrs["chunk_rows"])
        self.shard_rows = int(attrs["shard_rows"])
        self.num_shards = -(-self.num_rows // self.shard_rows)
        self._mask: np.ndarray | None = None
        self._keys: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        self._replay: dict = {}

    def __getstate__(self):  # DataLoader workers started by spawn re-open the store by path
        return {"path": self.path, "mode": self.mode, "storage_options": self._storage_options}

    def __setstate__(self, state):
        self.__init__(state["path"], state["mode"], state["storage_options"])

    def __repr__(self) -> str:
        return (f"LogitStore({self.path!r}, epochs={self.epochs}, rows={self.num_rows}, "
                f"k={self.k}, classes={self.num_classes}, mode={self.mode!r})")

    # ---- metadata ---------------------------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs["class_names"])

    @property
    def base_seed(self) -> int:
        """Base seed of every view's generator."""
        return int(self.attrs.get("base_seed", 0))

    @property
    def spec(self):
        """The augmentation spec the views were made with (:class:`tinydistill.augment.AugSpec`)."""
        from .augment import AugSpec

        return AugSpec.from_dict(self.attrs.get("augmentation", {}), source=f"{self.path} augmentation")

    @property
    def teacher(self) -> dict:
        return dict(self.attrs.get("teacher", {}))

    @property
    def keys(self) -> np.ndarray:
        if self._keys is None:
            self._keys = np.asarray(self._read_meta("key"), dtype=object)
        return self._keys

    @property
    def labels(self) -> np.ndarray:
        if self._labels is None:
            self._labels = np.asarray(self._read_meta("label"), dtype=np.int64)
        return self._labels

    def _read_meta(self, name: str) -> np.ndarray:
        try:
            return self._group[name][:]
        except Exception as e:
            raise CorruptStoreError(f"{self.path}: cannot read '{name}' ({_one_line(e)})") from e

    @property
    def info(self) -> dict[str, Any]:
        """Summary for notebooks and ``tinydistill inspect`` (lists the store to size it)."""
        mask = self.complete_mask(refresh=True)
        views_done = int(sum(self._shard_len(s) for _, s in zip(*np.nonzero(mask))))
        nbytes = self.bytes_on_disk()
        total = sum(nbytes.values())
        return {
            "path": self.path,
            "format_version": FORMAT_VERSION,
            "num_classes": self.num_classes,
            "k": self.k,
            "epochs": self.epochs,
            "num_rows": self.num_rows,
            "num_views": self.epochs * self.num_rows,
            "complete_views": views_done,
            "chunk_rows": self.chunk_rows,
            "shard_rows": self.shard_rows,
            "teacher": self.teacher,
            "spec_hash": self.attrs.get("spec_hash"),
            "dataset_fingerprint": self.attrs.get("dataset_fingerprint"),
            "base_seed": self.base_seed,
            "index_dtype": str(self._index.dtype),
            "bytes_on_disk": total,
            "bytes_per_view": total / views_done if views_done else None,
            "bytes_by_array": nbytes,
            "created": self.attrs.get("created"),
            "versions": self.attrs.get("versions", {}),
        }

    def bytes_on_disk(self) -> dict[str, int]:
        """Stored bytes per array (plus ``metadata`` for the zarr.json documents)."""
        store = self._group.store
        out: dict[str, int] = {}
        for key in sync(_list(store, "")):
            name = key.split("/", 1)[0] if "/" in key else "metadata"
            if key.endswith("zarr.json"):
                name = "metadata"
            out[name] = out.get(name, 0) + int(sync(store.getsize(key)))
        return out

    # ---- completeness -----------------------------------------------------------------------

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        """Rows [start, stop) of a shard."""
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"{self.path}: shard {shard} out of range [0, {self.num_shards})")
        start = shard * self.shard_rows
        return start, min(start + self.shard_rows, self.num_rows)

    def _shard_len(self, shard: int) -> int:
        a, b = self.shard_bounds(int(shard))
        return b - a

    def complete_mask(self, refresh: bool = False) -> np.ndarray:
        """Bool [E, S]: which (epoch, shard) units are durably written. Listed, not read."""
        if self._mask is None or refresh:
            mask = np.zeros((self.epochs, self.num_shards), bool)
            for key in sync(_list(self._group.store, "complete/c/")):
                parts = key.split("/")
                try:
                    e, s = int(parts[-2]), int(parts[-1])
                except (ValueError, IndexError):
                    continue
                if e < self.epochs and s < self.num_shards:
                    mask[e, s] = True
            self._mask = mask
        return self._mask

    def is_complete(self, epoch: int, shard: int) -> bool:
        return bool(self.complete_mask(refresh=True)[epoch, shard])

    def completed(self) -> np.ndarray:
        """Per epoch, the fraction of rows whose shard is complete (float [E])."""
        mask = self.complete_mask(refresh=True)
        sizes = np.array([self._shard_len(s) for s in range(self.num_shards)], np.float64)
        return (mask * sizes).sum(1) / self.num_rows

    # ---- reading ----------------------------------------------------------------------------

    def _rows(self, epoch: int, rows) -> tuple[np.ndarray | slice, int]:
        if not 0 <= int(epoch) < self.epochs:
            raise IndexError(f"{self.path}: epoch {epoch} out of range [0, {self.epochs})")
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.num_rows)
            if step == 1:
                return slice(start, max(start, stop)), max(0, stop - start)
            rows = np.arange(start, stop, step)
        idx = np.atleast_1d(np.asarray(rows))
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise IndexError(f"{self.path}: rows must be an int, a slice or a 1-D integer array")
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
                ) from e
            raise CorruptStoreError(
                f"{self.path}: cannot read '{name}' epoch {epoch} ({_one_line(e)})"
            ) from e

    def topk(self, epoch: int, rows, order: str = "desc") -> tuple[np.ndarray, np.ndarray]:
        """(log-probs float32 [n, K], class ids int64 [n, K]) for rows of one epoch.

        ``order="desc"`` sorts each row by descending log-probability; ``"stored"`` keeps
        the on-disk ascending class-id order (cheaper; the KD loss does not care).
        """
        sel, _ = self._rows(epoch, rows)
        self._check_complete(epoch, sel)
        logp = self._read(self._logp, epoch, sel).astype(np.float32)
        index = self._read(self._index, epoch, sel).astype(np.int64)
        bad = np.isnan(logp).any(1) | (index < 0).any(1)
        if bad.any():
            rows_bad = (np.arange(self.num_rows)[sel] if isinstance(sel, slice) else sel)[bad]
            if not (self._read(self._seed, epoch, rows_bad) == SEED_SKIPPED).all():
                raise CorruptStoreError(
                    f"{self.path}: epoch {epoch} rows {rows_bad[:5].tolist()} are recorded complete "
                    "but hold no data (shard truncated or deleted)"
                )
            # skipped views (unreadable images) keep NaN log-probs and id -1: never a fake target
        if order == "desc":
            o = np.argsort(-logp, axis=1, kind="stable")
            logp = np.take_along_axis(logp, o, 1)
            index = np.take_along_axis(index, o, 1)
        elif order != "stored":
            raise ValueError(f"order must be 'desc' or 'stored', got {order!r}")
        return logp, index

    def dense(self, epoch: int, rows, temperature: float = 1.0) -> np.ndarray:
        """Dense float32 [n, C] targets with TinyViT's smoothing (see :mod:`tinydistill.targets`)."""
        import torch

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

    def check(self, epochs=None) -> list[tuple[int, int, str]]:
        """Read every complete unit in full; return (epoch, shard, reason) for each bad one."""
        bad = []
        mask = self.complete_mask(refresh=True)
        for e in range(self.epochs) if epochs is None else epochs:
            for s in np.nonzero(mask[e])[0]:
                rows = slice(*self.shard_bounds(int(s)))
                try:
                    self.topk(e, rows, order="stored")
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

    def view(self, epoch: int, row: int, data):
        """The view (epoch, row) as the teacher saw it: a :class:`tinydistill.views.View`,
        with its parameter record in ``.params``.

        ``data`` is the SRC string (or an opened source) the store was made from; the first
        call checks it and the replay canary, and refuses if the views no longer match.
        """
        from .replay import check_replay
        from .sources import Source, open_source
        from .views import Views

        self._rows(epoch, row)  # bounds
        name = data.name if isinstance(data, Source) else str(data)
        if name not in self._replay:
            source = data if isinstance(data, Source) else open_source(name)
            self._replay[name] = Views(source, check_replay(self, source), self.base_seed, skip_bad=True)
        return self._replay[name].view(epoch, int(row))

    # ---- writing ----------------------------------------------------------------------------

    def skipped(self, epoch: int, rows) -> np.ndarray:
        """Bool [n]: views skipped because their image could not be read (``--skip-bad``)."""
        return self.seeds(epoch, rows) == SEED_SKIPPED

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
            raise StoreError(f"{where}: write failed, unit left incomplete ({_one_line(e)})") from e
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
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            dirs.add(p.parent)
        for d in dirs:
            fd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
