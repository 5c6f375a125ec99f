"""The logit store: a Zarr v3 group with each view's sparse top-K teacher outputs and seed.

Layout of format 2 (E epochs, N rows, K kept classes, S = ceil(N / shard_rows) shards)::

    logp       (E, N, K) float16  top-K log-probabilities at T=1 (fill NaN = never written)
    index_gap  (E, N, K) int16    class ids as gaps: slot 0 = the row's smallest id, slot j =
                                  id[j] - id[j-1]; ids = cumsum over the last axis (int32 when
                                  num_classes > 32767), fill -1 (never written or skipped)
      or index (E, N, K)          the class ids themselves (``id_layout="ids"``, ~7 % larger)
    seed       (E, N)    uint64   encoded per-view seed (fill 2**64-1 = never written,
                                  2**64-2 = view skipped: unreadable image, NaN log-probs)
    key        (N, L)    uint8    sample keys, UTF-8, zero-padded to the longest key
    label      (N,)      int32    ground-truth labels, -1 when unknown
    complete   (E, S)    uint8    1 once (epoch, shard) is durably written

Within a row the K entries are stored in ascending class-id order: sorted ids of a confident
teacher are close together, so their gaps are small numbers that compress far better than ids
in rank order. :meth:`LogitStore.topk` gives rows back as class ids in descending
log-probability order. Only codecs and data types of the Zarr v3 specification are used
(bytes, blosc, crc32c, sharding), so zarr-python, tensorstore and xarray read every array.
Format 1 (ids through numcodecs' delta filter, keys as zarr strings) still opens.

Writers always write whole (epoch, shard) units, one writer per unit, so any number of
processes or nodes can fill disjoint shards of one store at once. The ``complete`` marker of
a unit is written only after its data is written (and fsynced on local disks), so a writer
killed mid-shard leaves a unit that reads as incomplete, never one that reads as complete
but is not.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

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
    UnknownKeyError,
)

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
FORMAT_KEY = "tinydistill_format"  # group attribute that marks a finished tinydistill store
ID_LAYOUTS = ("gaps", "ids")
from .config import DEFAULT_CHUNK_ROWS, DEFAULT_SHARD_CHUNKS  # noqa: E402  (the layout's defaults)
FP16_MIN = float(np.finfo(np.float16).min)
SEED_UNSET = np.iinfo(np.uint64).max  # fill value of ``seed``: a seed that was never written
SEED_SKIPPED = SEED_UNSET - np.uint64(1)  # seed of a view whose image could not be read (--skip-bad)
# which fsspec backend package an URL scheme needs, and the extra that installs it
_EXTRAS = {"s3fs": "tinydistill[s3]", "gcsfs": "tinydistill[gcs]"}
_LISTING_CACHES = ("s3", "s3a", "gs", "gcs")  # fsspec backends that cache directory listings


def _compressors(shuffle: str = "shuffle"):
    # zstd level 5 is the knee of write speed against size; shuffle groups the bytes of each
    # element (bit-level for the seed counter); crc32c makes any flipped byte fail the read
    # instead of decoding garbage. All three are codecs of the Zarr v3 specification.
    return [BloscCodec(cname="zstd", clevel=5, shuffle=shuffle), Crc32cCodec()]


@contextlib.contextmanager
def _quiet_numcodecs():
    """Format-1 stores carry numcodecs' delta filter, which zarr warns about when it parses it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")
        yield


def _optional(module: str):
    """Import an optional notebook dependency, or fail in one line naming the package."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"this needs {module}: pip install {module} "
                          f"(or pip install 'tinydistill[notebook]')") from None


def encode_keys(keys: Sequence[str]) -> np.ndarray:
    """uint8 [N, L]: each key's UTF-8 bytes, zero-padded to the longest (L >= 1)."""
    raw = [str(k).encode("utf-8") for k in keys]
    if any(b"\0" in b for b in raw):
        raise ValueError("sample keys must not contain NUL characters")
    width = max([len(b) for b in raw] + [1])
    return np.frombuffer(b"".join(b.ljust(width, b"\0") for b in raw), np.uint8).reshape(len(raw), width)


def decode_keys(arr: np.ndarray) -> np.ndarray:
    """Object array of str from :func:`encode_keys`' uint8 [N, L]."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    if arr.ndim != 2:
        raise ValueError(f"key array must be 2-D, got shape {arr.shape}")
    fixed = arr.view(f"S{max(arr.shape[1], 1)}")[:, 0] if arr.shape[1] else np.full(len(arr), b"", "S1")
    return np.array([b.decode("utf-8") for b in fixed.tolist()], dtype=object)


def gaps_to_ids(gaps: np.ndarray) -> np.ndarray:
    """Class ids from the ``index_gap`` layout (rows of -1 stay -1: never written or skipped)."""
    gaps = np.asarray(gaps)
    ids = np.cumsum(gaps.astype(np.int64), axis=-1)
    return np.where((gaps < 0).any(-1, keepdims=True), -1, ids)


def ids_to_gaps(ids: np.ndarray) -> np.ndarray:
    """The ``index_gap`` layout of rows of ascending class ids."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.diff(ids, axis=-1, prepend=0)


def _local(path: str) -> str:
    """file:// URLs are local paths: open them with LocalStore, which can fsync."""
    return path[len("file://"):] if path.startswith("file://") else path


def _is_url(path: str) -> bool:
    return "://" in _local(path)


def _open_group(path: str, mode: str, storage_options: dict | None):
    if _is_url(path) and _local(path).split("://", 1)[0] in _LISTING_CACHES:
        # s3fs/gcsfs answer an object's size from a cached listing: an object written since the
        # listing (a unit another rank completed) would read as missing, i.e. as fill values
        storage_options = {"use_listings_cache": False, **(storage_options or {})}
    kwargs = {"storage_options": storage_options} if storage_options else {}
    return zarr.open_group(_local(path), mode=mode, zarr_format=3, **kwargs)


async def _list(store, prefix: str) -> list[str]:
    return [k async for k in store.list_prefix(prefix)]


def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}".rstrip(": ")


def _backend_missing(path: str, exc: BaseException) -> str | None:
    """The one-line message for an URL whose fsspec backend (or fsspec) is not installed."""
    if not isinstance(exc, ImportError) or not _is_url(path):
        return None
    scheme = _local(path).split("://", 1)[0]
    if getattr(exc, "name", None) == "fsspec":
        return f"{path}: {scheme}:// URLs need the fsspec package: pip install fsspec"
    try:
        from fsspec.registry import known_implementations

        cls = known_implementations.get(scheme, {}).get("class", "")
    except ImportError:
        return f"{path}: {scheme}:// URLs need the fsspec package: pip install fsspec"
    pkg = cls.split(".", 1)[0] if cls else getattr(exc, "name", None)
    if not pkg:
        return f"{path}: {scheme}:// needs a package that is not installed ({_one_line(exc)})"
    extra = f" (or pip install '{_EXTRAS[pkg]}')" if pkg in _EXTRAS else ""
    return f"{path}: {scheme}:// URLs need the {pkg} package: pip install {pkg}{extra}"


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
    id_layout: str = "gaps",
) -> "LogitStore":
    """Create an empty store and return it open for writing (rank 0 calls this; others open).

    ``teacher`` describes the teacher (name, weights digest, input size, mean/std);
    ``augmentation`` is the view spec whose hash replay checks. Both are free-form dicts.
    ``id_layout="gaps"`` (default) stores class ids as gaps within each row (array
    ``index_gap``, smallest); ``"ids"`` stores the ids themselves (array ``index``), which any
    reader sees directly, for ~7 % more bytes per view (see docs/benchmarks.md).
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
    if id_layout not in ID_LAYOUTS:
        raise StoreError(f"{path}: id_layout must be one of {', '.join(ID_LAYOUTS)}, got {id_layout!r}")
    try:
        key_bytes = encode_keys(keys)
    except ValueError as e:
        raise StoreError(f"{path}: {e}") from None
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
    index_name = "index_gap" if id_layout == "gaps" else "index"
    try:
        g = _open_group(path, "w" if overwrite else "w-", storage_options)
        common = dict(compressors=_compressors())
        view3 = dict(chunks=(1, chunk_rows, k), shards=(1, shard_rows, k), dimension_names=("epoch", "row", "slot"))
        g.create_array("logp", shape=(epochs, n, k), dtype="float16", fill_value=np.nan, **view3, **common,
                       attributes={"description": "top-K log-probabilities at T=1; the K slots of a row are in "
                                                  "ascending class-id order; NaN = never written or skipped"})
        g.create_array(index_name, shape=(epochs, n, k), dtype=index_dtype, fill_value=-1, **view3, **common,
                       attributes={"description": (
                           "class ids of the logp slots as gaps: slot 0 is the smallest id of the row, slot j "
                           "is id[j] - id[j-1]; ids = cumsum over the last axis; -1 = never written or skipped"
                           if id_layout == "gaps" else
                           "class ids of the logp slots, ascending within a row; -1 = never written or skipped")})
        g.create_array("seed", shape=(epochs, n), dtype="uint64", chunks=(1, chunk_rows),
                       shards=(1, shard_rows), fill_value=SEED_UNSET, dimension_names=("epoch", "row"),
                       compressors=_compressors("bitshuffle"),
                       attributes={"description": "encoded view seed; 2**64-1 = never written, "
                                                  "2**64-2 = view skipped (unreadable image)"})
        key_rows = max(1, min(n, 65536, (1 << 22) // key_bytes.shape[1]))
        g.create_array("key", shape=key_bytes.shape, dtype="uint8", chunks=(key_rows, key_bytes.shape[1]),
                       fill_value=0, dimension_names=("row", "key_byte"), **common,
                       attributes={"description": "sample keys in store order: UTF-8 bytes, zero-padded"})
        g.create_array("label", shape=(n,), dtype="int32", chunks=(min(n, 65536),), fill_value=-1,
                       dimension_names=("row",), **common,
                       attributes={"description": "ground-truth class id; -1 = unknown"})
        # one tiny chunk per (epoch, shard): each writer sets only its own markers
        g.create_array("complete", shape=(epochs, n_shards), dtype="uint8", chunks=(1, 1),
                       fill_value=0, compressors=None, dimension_names=("epoch", "shard"),
                       attributes={"description": "1 once the rows of (epoch, shard) are durably written"})
        g["key"][:] = key_bytes
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
            "id_layout": id_layout,
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
        raise StoreError(_backend_missing(path, e) or f"{path}: cannot create store: {_one_line(e)}") from None
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
        local = Path(_local(path))
        if not _is_url(path) and not local.exists():
            raise NotAStoreError(f"{path}: no such file or directory")
        if not _is_url(path) and not local.is_dir():
            raise NotAStoreError(f"{path}: is a file, not a store (a store is a directory)")
        try:
            group = _open_group(path, mode, storage_options)
            attrs = dict(group.attrs)
        except Exception as e:
            missing = _backend_missing(path, e)
            if missing:
                raise NotAStoreError(missing) from None
            if isinstance(e, (FileNotFoundError, zarr.errors.NodeNotFoundError)):
                raise NotAStoreError(f"{path}: not a tinydistill store (no Zarr group there)") from None
            if isinstance(e, PermissionError) and _is_url(path):
                raise StoreError(f"{path}: access denied ({_one_line(e)}); check the credentials "
                                 "(e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or anonymous access)") from None
            raise NotAStoreError(f"{path}: not a tinydistill store ({_one_line(e)})") from None
        version = attrs.get(FORMAT_KEY)
        if version is None:
            raise NotAStoreError(f"{path}: not a tinydistill store (no '{FORMAT_KEY}' attribute)")
        if version not in READABLE_FORMATS:
            raise FormatVersionError(
                f"{path}: store format version {version}, this tinydistill ({__version__}) reads versions "
                + ", ".join(map(str, READABLE_FORMATS))
            )
        self.attrs = attrs
        self.format_version = int(version)
        # format 1 and id_layout "ids" keep class ids in "index"; "gaps" keeps their gaps in "index_gap"
        self.id_layout = attrs.get("id_layout", "ids") if version >= 2 else "ids"
        self._gaps = self.id_layout == "gaps"
        self._handles = self._arrays(group)
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
        self._key_rows: dict | None = None
        self._replay: dict = {}

    def _arrays(self, group) -> tuple:
        """(pid, group, logp, index, seed, complete): the open handles of one process."""
        try:
            with _quiet_numcodecs():
                return (os.getpid(), group, group["logp"], group["index_gap" if self._gaps else "index"],
                        group["seed"], group["complete"])
        except Exception as e:
            raise CorruptStoreError(f"{self.path}: store is missing an array ({_one_line(e)})") from None

    def _handle(self, i: int):
        # a forked DataLoader worker must not use its parent's object-store connections (an
        # aiohttp session bound to the parent's event loop): it opens the group again
        if self._handles[0] != os.getpid() and _is_url(self.path):
            try:
                self._handles = self._arrays(_open_group(self.path, self.mode, self._storage_options))
            except StoreError:
                raise
            except Exception as e:
                raise NotAStoreError(f"{self.path}: cannot open store ({_one_line(e)})") from None
        return self._handles[i]

    _group = property(lambda self: self._handle(1))
    _logp = property(lambda self: self._handle(2))
    _index = property(lambda self: self._handle(3))
    _seed = property(lambda self: self._handle(4))
    _complete = property(lambda self: self._handle(5))

    def __getstate__(self):  # DataLoader workers started by spawn re-open the store by path
        return {"path": self.path, "mode": self.mode, "storage_options": self._storage_options}

    def __setstate__(self, state):
        self.__init__(state["path"], state["mode"], state["storage_options"])

    def __repr__(self) -> str:
        return (f"LogitStore({self.path!r}, epochs={self.epochs}, rows={self.num_rows}, "
                f"k={self.k}, classes={self.num_classes}, mode={self.mode!r})")

    def __len__(self) -> int:
        """Number of rows (samples); each has one view per epoch."""
        return self.num_rows

    @property
    def shape(self) -> tuple[int, int, int]:
        """(epochs, rows, K): the shape of the top-K arrays."""
        return (self.epochs, self.num_rows, self.k)

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
        """Sample keys in store order (object array of str)."""
        if self._keys is None:
            raw = self._read_meta("key")
            if self.format_version == 1:  # zarr string array
                self._keys = np.asarray(raw, dtype=object)
            else:
                self._keys = decode_keys(raw)
        return self._keys

    def row_of(self, key: str) -> int:
        """The row of a sample key (a one-line :class:`UnknownKeyError` if it is not in the store)."""
        if self._key_rows is None:
            self._key_rows = {k: i for i, k in enumerate(self.keys)}
        try:
            return self._key_rows[str(key)]
        except KeyError:
            raise UnknownKeyError(f"{self.path}: no sample with key {str(key)!r}") from None

    def rows_of(self, keys: Sequence[str]) -> np.ndarray:
        """int64 rows of sample keys, in the order given."""
        return np.array([self.row_of(k) for k in keys], dtype=np.int64)

    @property
    def labels(self) -> np.ndarray:
        if self._labels is None:
            self._labels = np.asarray(self._read_meta("label"), dtype=np.int64)
        return self._labels

    def _read_meta(self, name: str) -> np.ndarray:
        try:
            return self._group[name][:]
        except Exception as e:
            raise CorruptStoreError(f"{self.path}: cannot read '{name}' ({_one_line(e)})") from None

    @property
    def info(self) -> dict[str, Any]:
        """Summary for notebooks and ``tinydistill inspect`` (lists the store to size it)."""
        mask = self.complete_mask(refresh=True)
        views_done = int(sum(self._shard_len(s) for _, s in zip(*np.nonzero(mask))))
        nbytes = self.bytes_on_disk()
        total = sum(nbytes.values())
        return {
            "path": self.path,
            "format_version": self.format_version,
            "id_layout": self.id_layout,
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
                f"{self.path}: cannot read '{name}' epoch {epoch} ({_one_line(e)})"
            ) from None

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
        sel, _ = self._rows(epoch, rows)
        self._check_complete(epoch, sel)
        logp = self._read(self._logp, epoch, sel).astype(np.float32)
        index = self._read(self._index, epoch, sel)
        index = gaps_to_ids(index) if self._gaps else index.astype(np.int64)
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
        if names:
            table = np.array(self.class_names + [None], dtype=object)
            return logp, index, table[index]  # id -1 (skipped) -> None
        return logp, index

    def dense(self, epoch: int, rows, temperature: float = 1.0) -> np.ndarray:
        """Dense float32 [n, C] targets with TinyViT's smoothing (see :mod:`tinydistill.targets`)."""
        import torch

        from .targets import dense_targets

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

    # ---- tables for notebooks ----------------------------------------------------------------

    def _class_name_table(self) -> np.ndarray:
        return np.array(self.class_names + [None], dtype=object)  # id -1 (skipped view) -> None

    def to_pandas(self, epoch: int, rows=slice(None), k: int | None = None):
        """A pandas DataFrame, one line per (view, rank): ``epoch``, ``row``, ``key``, ``label``,
        ``label_name``, ``rank`` (0 = the teacher's top class), ``class_id``, ``class_name``,
        ``prob`` and ``logp``. ``rows`` as in :meth:`topk`; ``k`` keeps the first k ranks.
        Needs pandas (``pip install 'tinydistill[notebook]'``)."""
        pd = _optional("pandas")
        sel, _ = self._rows(epoch, rows)
        logp, ids = self.topk(epoch, sel)
        k = self.k if k is None else max(0, min(int(k), self.k))
        logp, ids = logp[:, :k], ids[:, :k]
        rows_ = np.arange(self.num_rows)[sel] if isinstance(sel, slice) else sel
        n = len(rows_)
        names = self._class_name_table()
        labels = self.labels[rows_]
        return pd.DataFrame({
            "epoch": np.full(n * k, int(epoch), np.int64),
            "row": np.repeat(rows_, k),
            "key": np.repeat(self.keys[rows_], k),
            "label": np.repeat(labels, k),
            "label_name": np.repeat(names[labels], k),
            "rank": np.tile(np.arange(k), n),
            "class_id": ids.reshape(-1),
            "class_name": names[ids.reshape(-1)],
            "prob": np.exp(logp.reshape(-1)),
            "logp": logp.reshape(-1),
        })

    def to_xarray(self, epochs=None, rows=slice(None)):
        """An in-memory xarray Dataset of the top-K outputs, dims (epoch, row, rank).

        Variables ``logp``, ``prob``, ``class_id`` and ``seed``; coordinates ``epoch``,
        ``row``, ``rank`` (0 = top class), ``key``, ``label``, ``label_name`` per row and
        ``class_name`` per (epoch, row, rank). ``epochs`` defaults to every epoch whose
        selected rows are all written. It reads everything asked for into memory: select rows
        (a slice, indices, a boolean mask or keys) for large stores. Needs xarray
        (``pip install 'tinydistill[notebook]'``).
        """
        xr = _optional("xarray")
        sel, _ = self._rows(0, rows)
        rows_ = np.arange(self.num_rows)[sel] if isinstance(sel, slice) else sel
        if epochs is None:
            shards = np.unique(rows_ // self.shard_rows)
            epochs = [e for e in range(self.epochs) if self.complete_mask(refresh=True)[e, shards].all()]
            if not epochs:
                raise IncompleteError(f"{self.path}: no epoch has all the selected rows written yet")
        epochs = [int(e) for e in np.atleast_1d(epochs)]
        logp = np.empty((len(epochs), len(rows_), self.k), np.float32)
        ids = np.empty(logp.shape, np.int64)
        seed = np.empty((len(epochs), len(rows_)), np.uint64)
        for i, e in enumerate(epochs):
            logp[i], ids[i] = self.topk(e, sel)
            seed[i] = self.seeds(e, sel)
        names = self._class_name_table()
        labels = self.labels[rows_]
        keep = ("num_classes", "k", "epochs", "num_rows", "spec_hash", "dataset_fingerprint", "base_seed",
                "created", FORMAT_KEY)
        attrs = {a: self.attrs[a] for a in keep if a in self.attrs}
        attrs["teacher"] = str(self.teacher.get("name", ""))
        attrs["store"] = self.path
        dims = ("epoch", "row", "rank")
        return xr.Dataset(
            {"logp": (dims, logp, {"description": "teacher log-probability at T=1, by rank"}),
             "prob": (dims, np.exp(logp), {"description": "teacher probability, by rank"}),
             "class_id": (dims, ids, {"description": "class id; -1 = skipped view"}),
             "seed": (("epoch", "row"), seed, {"description": "encoded view seed"})},
            coords={"epoch": epochs, "row": rows_, "rank": np.arange(self.k),
                    "key": ("row", self.keys[rows_]), "label": ("row", labels),
                    "label_name": ("row", names[labels]),
                    "class_name": (dims, names[ids])},
            attrs=attrs,
        )

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
            raise StoreError(f"{where}: write failed, unit left incomplete ({_one_line(e)})") from None
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
