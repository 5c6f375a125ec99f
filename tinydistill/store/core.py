"""The store itself: create or open one, and :class:`LogitStore` (metadata, completeness, info).

Reading rows (:mod:`.read`), writing shards (:mod:`.write`) and the notebook tables
(:mod:`.notebook`) are mixins of :class:`LogitStore`; the layout is in :mod:`.format`.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr
from zarr.core.sync import sync

from .. import __version__
from .._util import keys_fingerprint, library_versions
from ..kinds import store_kinds, targets_attr, views_hash
from ..errors import (CorruptStoreError, FormatVersionError, NotAStoreError, StoreError, UnfinishedStoreError,
                      UnknownKeyError, one_line)
from .format import (
    DEFAULT_CHUNK_ROWS,
    DEFAULT_SHARD_CHUNKS,
    FORMAT_KEY,
    FORMAT_VERSION,
    ID_LAYOUTS,
    READABLE_FORMATS,
    SEED_UNSET,
    _backend_missing,
    _compressors,
    _is_url,
    _local,
    _quiet_numcodecs,
    decode_keys,
    encode_keys,
)
from .notebook import NotebookMixin
from .read import ReadMixin, object_sizes
from .write import WriteMixin

_LISTING_CACHES = ("s3", "s3a", "gs", "gcs")  # fsspec backends that cache directory listings
# the group's first attribute while it is being created; the format marker replaces it at the end
CREATING_KEY = "tinydistill_creating"


def _open_group(path: str, mode: str, storage_options: dict | None, attributes: dict | None = None):
    if _is_url(path) and _local(path).split("://", 1)[0] in _LISTING_CACHES:
        # s3fs/gcsfs answer an object's size from a cached listing: an object written since the
        # listing (a unit another rank completed) would read as missing, i.e. as fill values
        storage_options = {"use_listings_cache": False, **(storage_options or {})}
    kwargs = {"storage_options": storage_options} if storage_options else {}
    if attributes:
        kwargs["attributes"] = attributes
    return zarr.open_group(_local(path), mode=mode, zarr_format=3, **kwargs)


async def _list(store, prefix: str) -> list[str]:
    return [k async for k in store.list_prefix(prefix)]


def _checked_args(path: str, *, num_classes: int, k: int, epochs: int, keys: list[str], labels, class_names,
                  chunk_rows: int, shard_rows: int | None, overwrite: bool, id_layout: str):
    """(key bytes, labels, class names, shard_rows) of :func:`create_store`'s arguments, or a
    one-line :class:`StoreError` naming the first bad one."""
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
    return key_bytes, labels_arr, names, shard_rows


def _create_arrays(g, *, epochs: int, n: int, kinds: list, chunk_rows: int, shard_rows: int,
                   key_bytes: np.ndarray, labels: np.ndarray, arrays: dict | None) -> None:
    """The arrays of an empty store in group ``g``: each target kind's, the seeds, keys, labels,
    completeness markers and the extra arrays."""
    common = dict(compressors=_compressors())
    for kind in kinds:  # (epoch, row, ...): one chunk per (epoch, chunk_rows rows), sharded like the seeds
        for a in kind.arrays():
            g.create_array(a.name, shape=(epochs, n) + a.tail, dtype=a.dtype, fill_value=a.fill,
                           chunks=(1, chunk_rows) + a.tail, shards=(1, shard_rows) + a.tail,
                           dimension_names=("epoch", "row") + a.dims, attributes={"description": a.description},
                           **common)
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
    g.create_array("complete", shape=(epochs, -(-n // shard_rows)), dtype="uint8", chunks=(1, 1),
                   fill_value=0, compressors=None, dimension_names=("epoch", "shard"),
                   attributes={"description": "1 once the rows of (epoch, shard) are durably written"})
    g["key"][:] = key_bytes
    g["label"][:] = labels.astype(np.int32)
    for name, (values, dims) in (arrays or {}).items():  # small extras, e.g. the canary's pixels
        values = np.asarray(values)
        g.create_array(name, shape=values.shape, dtype=values.dtype, chunks=values.shape,
                       dimension_names=dims, **common)
        g[name][...] = values


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
    targets: dict | None = None,
) -> "LogitStore":
    """Create an empty store and return it open for writing (rank 0 calls this; others open).

    ``teacher`` describes the teacher (name, weights digest, input size, mean/std);
    ``augmentation`` is the view spec whose hash replay checks. Both are free-form dicts.
    ``id_layout="gaps"`` (default) stores class ids as gaps within each row (array
    ``index_gap``, smallest); ``"ids"`` stores the ids themselves (array ``index``), which any
    reader sees directly, for ~7 % more bytes per view (see docs/benchmarks.md).
    ``arrays`` maps extra array names to (values, dimension names), written with the store.
    ``targets`` adds target kinds to the top-K, by name with their settings, e.g.
    ``{"attention": {"grid": 7}}`` (see :mod:`tinydistill.kinds`).
    """
    path = str(path)
    keys = [str(x) for x in keys]
    key_bytes, labels_arr, names, shard_rows = _checked_args(
        path, num_classes=num_classes, k=k, epochs=epochs, keys=keys, labels=labels, class_names=class_names,
        chunk_rows=chunk_rows, shard_rows=shard_rows, overwrite=overwrite, id_layout=id_layout)
    try:
        g = _open_group(path, "w" if overwrite else "w-", storage_options,
                        attributes={CREATING_KEY: {"version": __version__, "host": socket.gethostname(),
                                                   "pid": os.getpid(), "started": time.time()}})
        kinds = store_kinds({"targets": {"topk": {}, **(targets or {})}}, k, num_classes, id_layout)
        _create_arrays(g, epochs=epochs, n=len(keys), kinds=kinds, chunk_rows=chunk_rows, shard_rows=shard_rows,
                       key_bytes=key_bytes, labels=labels_arr, arrays=arrays)
        meta = {
            "num_classes": int(num_classes),
            "k": int(k),
            "epochs": int(epochs),
            "num_rows": len(keys),
            "chunk_rows": int(chunk_rows),
            "shard_rows": int(shard_rows),
            "index_order": "ascending class id within each row",
            "id_layout": id_layout,
            "class_names": names,
            "teacher": teacher or {},
            "augmentation": augmentation or {},
            "targets": targets_attr(kinds),
            "spec_hash": views_hash(augmentation or {}, targets_attr(kinds)),
            "dataset_fingerprint": keys_fingerprint(keys),
            "base_seed": int(base_seed),
            "versions": library_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(attrs or {}),
        }
        # the format marker goes in last, replacing the creation marker in one write: a creation
        # that died half way is not a store, and says so (UnfinishedStoreError)
        g.attrs.put({**meta, FORMAT_KEY: FORMAT_VERSION})
    except StoreError:
        raise
    except Exception as e:  # permission denied, disk full, existing group, bad URL ...
        raise StoreError(_backend_missing(path, e) or f"{path}: cannot create store: {one_line(e)}") from None
    return LogitStore(path, mode="r+", storage_options=storage_options)


def open_store(path: str | os.PathLike, mode: str = "r", storage_options: dict | None = None) -> "LogitStore":
    """Open a store read-only (``mode="r"``, the default) or for writing shards (``"r+"``)."""
    return LogitStore(str(path), mode=mode, storage_options=storage_options)


def _open_attrs(path: str, mode: str, storage_options: dict | None):
    """(group, attrs) of an existing store, or a one-line error saying why it does not open."""
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
            raise StoreError(f"{path}: access denied ({one_line(e)}); check the credentials "
                             "(e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or anonymous access)") from None
        raise NotAStoreError(f"{path}: not a tinydistill store ({one_line(e)})") from None
    version = attrs.get(FORMAT_KEY)
    if version is None and CREATING_KEY in attrs:
        raise UnfinishedStoreError(
            f"{path}: its creation did not finish (a full disk, or the run was killed while creating it); "
            "gen-logits creates it again when re-run (or use `overwrite`)")
    if version is None:
        raise NotAStoreError(f"{path}: not a tinydistill store (no '{FORMAT_KEY}' attribute)")
    if version not in READABLE_FORMATS:
        raise FormatVersionError(
            f"{path}: store format version {version}, this tinydistill ({__version__}) reads versions "
            + ", ".join(map(str, READABLE_FORMATS))
        )
    return group, attrs


class LogitStore(ReadMixin, WriteMixin, NotebookMixin):
    """A logit store opened from a path or fsspec URL. See :mod:`tinydistill.store.format` for
    the layout; reading, writing and the notebook tables come from the mixins."""

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
        group, attrs = _open_attrs(path, mode, storage_options)
        version = attrs[FORMAT_KEY]
        self.attrs = attrs
        self.format_version = int(version)
        # format 1 and id_layout "ids" keep class ids in "index"; "gaps" keeps their gaps in "index_gap"
        self.id_layout = attrs.get("id_layout", "ids") if version >= 2 else "ids"
        self._gaps = self.id_layout == "gaps"
        self.num_classes = int(attrs["num_classes"])
        self.k = int(attrs["k"])
        try:
            self.kinds = store_kinds(attrs, self.k, self.num_classes, self.id_layout)
        except StoreError as e:
            raise CorruptStoreError(f"{path}: {e}") from None
        self._handles = self._arrays(group)
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

    def _arrays(self, group) -> dict:
        """The open handles of one process: ``pid``, ``group``, ``seed``, ``complete`` and every
        target kind's arrays by name."""
        try:
            with _quiet_numcodecs():
                names = ["seed", "complete"] + [a.name for kind in self.kinds for a in kind.arrays()]
                return {"pid": os.getpid(), "group": group, **{n: group[n] for n in names}}
        except Exception as e:
            raise CorruptStoreError(f"{self.path}: store is missing an array ({one_line(e)})") from None

    def _handle(self, i: str):
        # a forked DataLoader worker must not use its parent's object-store connections (an
        # aiohttp session bound to the parent's event loop): it opens the group again
        if self._handles["pid"] != os.getpid() and _is_url(self.path):
            try:
                self._handles = self._arrays(_open_group(self.path, self.mode, self._storage_options))
            except StoreError:
                raise
            except Exception as e:
                raise NotAStoreError(f"{self.path}: cannot open store ({one_line(e)})") from None
        return self._handles[i]

    _group = property(lambda self: self._handle("group"))
    _logp = property(lambda self: self._handle("logp"))
    _index = property(lambda self: self._handle("index_gap" if self._gaps else "index"))
    _seed = property(lambda self: self._handle("seed"))
    _complete = property(lambda self: self._handle("complete"))

    def lease(self, epochs: tuple[int, int], run: str | None = None):
        """A writer's lease on ``epochs`` of this store (:mod:`.lease`): gen-logits takes one per run."""
        from .lease import Lease

        return Lease(self._group.store, self.path, epochs, run)

    def kind(self, name: str):
        """The store's target kind ``name`` (:mod:`tinydistill.kinds`), or None when it has none."""
        return next((k for k in self.kinds if k.name == name), None)

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

    def _class_name_table(self) -> np.ndarray:
        return np.array(self.class_names + [None], dtype=object)  # id -1 (skipped view) -> None

    @property
    def base_seed(self) -> int:
        """Base seed of every view's generator."""
        return int(self.attrs.get("base_seed", 0))

    @property
    def spec(self):
        """The augmentation spec the views were made with (:class:`tinydistill.augment.AugSpec`)."""
        from ..augment import AugSpec

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
            raise CorruptStoreError(f"{self.path}: cannot read '{name}' ({one_line(e)})") from None

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
            "targets": {kind.name: kind.settings() for kind in self.kinds},
            "bytes_on_disk": total,
            "bytes_per_view": total / views_done if views_done else None,
            "bytes_by_array": nbytes,
            "created": self.attrs.get("created"),
            "versions": self.attrs.get("versions", {}),
        }

    def bytes_on_disk(self) -> dict[str, int]:
        """Stored bytes per array (plus ``metadata`` for the zarr.json documents), sizes taken from
        the listing (:func:`~tinydistill.store.read.object_sizes`: no request per object)."""
        out: dict[str, int] = {}
        for key, size in object_sizes(self._group.store).items():
            name = key.split("/", 1)[0] if "/" in key else "metadata"
            if key.endswith("zarr.json"):
                name = "metadata"
            out[name] = out.get(name, 0) + size
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
