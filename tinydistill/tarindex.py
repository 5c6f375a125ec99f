"""Random access into webdataset tars: an index of each tar's samples (keys, labels, the image
member's byte offset and size) as flat arrays in one binary file, built once by a scan of the
tar headers and reused, so a batch reads only its own images (a seek on a local file, a
byte-range request on object storage) and opening a source parses no per-member objects.

Where an index comes from, first match wins:

1. ``<shard>.tar.idx`` beside the shard (``tinydistill index-tars SRC``, or
   :func:`write_beside`), used when it records the shard's current size and version;
2. ``$TINYDISTILL_CACHE/tarindex/<sha256 of the URL>.idx`` (default ``~/.cache/tinydistill``),
   written by the one process that scans the shard (temp file + ``os.replace``: never torn).

A shard's *version* is its mtime in ns (local files) or its ETag (object storage, else the
Last-Modified time): a tar that changed since it was indexed is re-indexed, never read wrong.
A local tar rewritten with the same size and mtime is caught by a content check: a hash of a
few samples' header blocks and first bytes, recorded in the index and compared on every open.
Grouping follows webdataset's own (``__key__`` up to the first dot of the file name, lower-case
extensions, ``__*__`` members skipped, a sample never spans tars), so keys and order are those
of a sequential ``wds.WebDataset`` pass.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from .errors import TinydistillError, one_line
from .flatstr import Strings

log = logging.getLogger("tinydistill")
FORMAT = 2  # 1 was JSON (.idx.json), parsed into Python objects per member: no longer read
INDEX_SUFFIX = ".idx"  # beside the shard: shard-000.tar -> shard-000.tar.idx
MAGIC = b"TDTARIDX"
LABEL_EXTS = ("cls", "cls.txt", "label", "class")
_SKIP_META = re.compile(r"__[^/]*__($|/)")
_BASE_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


class ShardError(TinydistillError):
    """A shard that cannot be listed, indexed or read."""


def cache_dir() -> Path:
    return Path(os.environ.get("TINYDISTILL_CACHE") or Path.home() / ".cache" / "tinydistill") / "tarindex"


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _local(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


# ---- filesystems: one per process ----------------------------------------------------------

_FS: dict = {}


def filesystem(url: str, storage_options: dict | None = None):
    """(fsspec filesystem, path) for a remote URL, made in *this* process: an aiohttp session
    made before a fork fails in the child ("attached to a different loop"), so a DataLoader
    worker opens its own."""
    from fsspec.core import url_to_fs

    proto = url.split("://", 1)[0]
    key = (os.getpid(), proto, json.dumps(storage_options or {}, sort_keys=True, default=str))
    if key not in _FS:
        if any(k[0] != os.getpid() for k in _FS):  # inherited from a parent: never use them
            _FS.clear()
        _FS[key] = url_to_fs(url, skip_instance_cache=True, **(storage_options or {}))[0]
    fs = _FS[key]
    return fs, fs._strip_protocol(url)


def stat(url: str, storage_options: dict | None = None) -> tuple[int, str]:
    """(size in bytes, version) of a shard: mtime_ns locally, the ETag (or Last-Modified) remotely."""
    try:
        if not is_remote(url):
            st = os.stat(_local(url))
            return int(st.st_size), f"mtime:{st.st_mtime_ns}"
        fs, path = filesystem(url, storage_options)
        info = fs.info(path)
    except TinydistillError:
        raise
    except Exception as e:
        raise ShardError(f"{url}: cannot read shard ({one_line(e)})") from None
    return int(info.get("size") or 0), _remote_version(info)


def _remote_version(info: dict) -> str:
    for k in ("ETag", "etag", "ETAG"):
        if info.get(k):
            return f"etag:{str(info[k]).strip(chr(34))}"
    for k in ("LastModified", "last_modified", "mtime", "Last-Modified"):
        if info.get(k):
            return f"mtime:{info[k]}"
    return ""


# ---- scanning -------------------------------------------------------------------------------

class TarIndex:
    """One tar's samples as arrays: ``keys`` (:class:`~tinydistill.flatstr.Strings`), ``label``
    (int32, -1 without a label member), and the image member's data ``offset`` (int64, -1 when
    the sample has no image) and ``size``. ``meta`` records the tar it describes (size, version,
    and the content check)."""

    def __init__(self, keys, label, offset, size, meta: dict | None = None):
        self.keys, self.meta = keys, dict(meta or {})
        self.label = np.asarray(label, np.int32)
        self.offset = np.asarray(offset, np.int64)
        self.size = np.asarray(size, np.int64)

    def __len__(self) -> int:
        return len(self.label)

    ARRAYS = ("key_blob", "key_end", "label", "offset", "size")

    def to_bytes(self) -> bytes:
        """``MAGIC``, the header's length (uint32), a JSON header (``meta`` and each array's
        dtype and length), then the arrays' bytes: one read and no parsing per sample to load."""
        arrays = dict(zip(self.ARRAYS, (self.keys.blob, self.keys.ends.astype(np.int64), self.label,
                                        self.offset, self.size)))
        head = json.dumps({"meta": self.meta, "arrays": [[k, a.dtype.str, len(a)] for k, a in arrays.items()]},
                          separators=(",", ":")).encode()
        return b"".join([MAGIC, len(head).to_bytes(4, "little"), head] + [a.tobytes() for a in arrays.values()])

    @classmethod
    def from_bytes(cls, raw: bytes) -> "TarIndex":
        if raw[:len(MAGIC)] != MAGIC:
            raise ValueError("not a tinydistill tar index")
        at = len(MAGIC) + 4
        end = at + int.from_bytes(raw[len(MAGIC):at], "little")
        head = json.loads(raw[at:end])
        arrays = {}
        for name, dt, n in head["arrays"]:
            arrays[name] = np.frombuffer(raw, np.dtype(dt), n, end)
            end += arrays[name].nbytes
        return cls(Strings(arrays["key_blob"], arrays["key_end"]), arrays["label"], arrays["offset"],
                   arrays["size"], head["meta"])


def scan(url: str, storage_options: dict | None = None) -> TarIndex:
    """The index of one tar, grouped as webdataset groups samples. Local tars are scanned header
    by header (payloads are skipped with seeks, only label members are read); remote tars are
    streamed once."""
    try:
        if is_remote(url):
            fs, path = filesystem(url, storage_options)
            with fs.open(path, "rb", block_size=8 << 20) as f:
                return _group(tarfile.open(fileobj=f, mode="r|"), url, stream=True)
        with open(_local(url), "rb") as f:
            return _group(tarfile.open(fileobj=f, mode="r:"), url, stream=False)
    except TinydistillError:
        raise
    except Exception as e:
        raise ShardError(f"{url}: cannot index shard ({one_line(e)})") from None


def _group(tar: tarfile.TarFile, url: str, stream: bool) -> TarIndex:
    from .sources import IMAGE_EXTS

    rank = {e: i for i, e in enumerate(IMAGE_EXTS)}
    keys: list[str] = []  # while scanning one tar only
    label, offset, size, best = [], [], [], []
    exts: set = set()
    labels: dict = {}  # label members of the current sample: ext -> bytes (tiny)

    def close():
        if keys and labels:
            data = labels[next(e for e in LABEL_EXTS if e in labels)]
            try:
                label[-1] = int(data.decode().strip())
            except ValueError:
                raise ShardError(f"{url}: {keys[-1]}: label is not an integer ({data[:20]!r})") from None
        labels.clear()
        exts.clear()

    for ti in tar:
        if not ti.isreg() or ti.name is None:
            continue
        name = ti.name
        if ("/" not in name and name.startswith("__") and name.endswith("__")) or _SKIP_META.match(name):
            continue
        m = _BASE_EXT.match(name)
        if not m:
            continue
        key, ext = m.group(1), m.group(2).lower()
        if not keys or keys[-1] != key:
            close()
            keys.append(key)
            label.append(-1)
            offset.append(-1)
            size.append(0)
            best.append(len(IMAGE_EXTS))
        if ext in exts:
            raise ShardError(f"{url}: {name}: duplicate file name in tar file")
        exts.add(ext)
        if rank.get(ext, len(IMAGE_EXTS)) < best[-1]:  # the image member IMAGE_EXTS prefers
            best[-1], offset[-1], size[-1] = rank[ext], int(ti.offset_data), int(ti.size)
        if ext in LABEL_EXTS:
            labels[ext] = tar.extractfile(ti).read()
        if stream:
            tar.members = []  # keep memory flat on big tars
    close()
    if len(set(keys)) != len(keys):
        dup = next(k for k, c in Counter(keys).items() if c > 1)
        raise ShardError(f"{url}: sample key {dup!r} occurs twice (its members are not next to each other)")
    return TarIndex(Strings.from_list(keys), label, offset, size)


# ---- the content check: a tar rewritten with the same size and mtime --------------------------

CHECK_SAMPLES = 4  # samples whose tar header block and first data bytes are hashed
CHECK_HEAD = 64


def _check_ranges(idx: TarIndex) -> tuple[np.ndarray, list[tuple[int, int]]]:
    has = np.flatnonzero(idx.offset >= 512)
    rows = np.unique(has[np.linspace(0, len(has) - 1, CHECK_SAMPLES).astype(np.int64)]) if len(has) else has
    return rows, [(int(idx.offset[r]) - 512, int(idx.offset[r] + min(int(idx.size[r]), CHECK_HEAD))) for r in rows]


def content_hash(url: str, idx: TarIndex, storage_options=None) -> str:
    """sha256 of a few samples' tar header blocks (name, size, mtime, checksum) and their first
    data bytes: the same tar gives the same hash; a rewritten one almost surely does not."""
    _, ranges = _check_ranges(idx)
    h = hashlib.sha256()
    try:
        for blob in read_ranges(url, ranges, storage_options):
            h.update(blob)
    except (OSError, ShardError):
        return ""
    return h.hexdigest()


# ---- the index, cached ----------------------------------------------------------------------

def _cache_path(url: str) -> Path:
    return cache_dir() / (hashlib.sha256(url.encode()).hexdigest()[:40] + ".idx")


def _read_index(path: str, size: int, version: str, storage_options=None) -> TarIndex | None:
    """The index in file ``path`` when it describes a tar of this size and version, else None."""
    try:
        if is_remote(path):
            fs, p = filesystem(path, storage_options)
            idx = TarIndex.from_bytes(fs.cat_file(p))
        else:
            idx = TarIndex.from_bytes(Path(_local(path)).read_bytes())
    except Exception:  # absent, unreadable, torn or an older format: index again
        return None
    m = idx.meta
    if m.get("format") != FORMAT or m.get("size") != size or m.get("version") != version:
        return None
    return idx


def build(url: str, storage_options: dict | None = None) -> TarIndex:
    """Scan a tar and record what it describes: size, version, and (local tars, whose version
    is only an mtime) the content check."""
    size, version = stat(url, storage_options)
    idx = scan(url, storage_options)
    idx.meta = {"format": FORMAT, "url": url, "size": size, "version": version}
    if not is_remote(url):
        idx.meta["check"] = content_hash(url, idx)
    return idx


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # concurrent writers write equal files: the last rename wins, none is torn
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


def missing_hint(spec: str) -> str:
    return f"build the indexes once with `tinydistill index-tars '{spec}'` (torchrun splits the work over ranks)"


def load(url: str, storage_options: dict | None = None, stats: dict | None = None,
         scan_ok: bool = True, spec: str | None = None) -> tuple[TarIndex, int]:
    """(index, size) of one shard from the index beside it, the cache, or a fresh scan (then
    cached). ``stats`` counts where indexes came from (``beside``, ``cache``, ``scanned``, and
    ``stale``: a local index whose content check failed). With ``scan_ok`` False a shard
    without a valid index is a one-line :class:`ShardError` naming ``index-tars``."""
    size, version = stat(url, storage_options)
    idx, how = None, "beside"
    for how, path in (("beside", url + INDEX_SUFFIX), ("cache", str(_cache_path(url)))):
        idx = _read_index(path, size, version, storage_options if how == "beside" else None)
        if idx is not None and not is_remote(url) and idx.meta.get("check") != content_hash(url, idx):
            log.warning("%s: changed since it was indexed (same size and mtime, other content): "
                        "its index %s is stale", url, path)
            stats_add(stats, "stale")
            if not scan_ok:
                raise ShardError(f"{url}: changed since it was indexed (same size and mtime, other content); "
                                 + missing_hint(spec or url))
            idx = None
        if idx is not None:
            break
    if idx is None:
        if not scan_ok:
            raise ShardError(f"{url}: no index; every rank would scan it; " + missing_hint(spec or url))
        idx, how = build(url, storage_options), "scanned"
        try:
            _write_atomic(_cache_path(url), idx.to_bytes())
        except OSError:  # a read-only home: work without a cache
            pass
    stats_add(stats, how)
    return idx, size


def stats_add(stats: dict | None, how: str) -> None:
    if stats is not None:
        stats[how] = stats.get(how, 0) + 1


def write_beside(url: str, storage_options: dict | None = None) -> str:
    """Index a shard and write ``<shard>.tar.idx`` next to it (local or remote); returns its URL.
    Index shards where they will be read from: the recorded version is that copy's mtime/ETag."""
    data = build(url, storage_options).to_bytes()
    out = url + INDEX_SUFFIX
    if is_remote(url):
        fs, p = filesystem(out, storage_options)
        fs.pipe_file(p, data)
    else:
        _write_atomic(Path(_local(out)), data)
    return out


def write_cached(url: str, storage_options: dict | None = None) -> str:
    """Index a shard into the cache directory (for tars in a folder this user cannot write)."""
    path = _cache_path(url)
    _write_atomic(path, build(url, storage_options).to_bytes())
    return str(path)


def index_tars(urls: list[str], rank: int = 0, world: int = 1, beside: bool = True,
               storage_options: dict | None = None) -> dict:
    """Index this rank's share of ``urls`` (shards ``rank, rank + world, ...``), skipping those
    whose index is already valid: what ``tinydistill index-tars`` runs on every rank."""
    out = {"indexed": 0, "valid": 0}
    for url in urls[rank::world]:
        size, version = stat(url, storage_options)
        where = url + INDEX_SUFFIX if beside else str(_cache_path(url))
        idx = _read_index(where, size, version, storage_options if beside else None)
        if idx is not None and (is_remote(url) or idx.meta.get("check") == content_hash(url, idx)):
            out["valid"] += 1
            continue
        (write_beside if beside else write_cached)(url, storage_options)
        out["indexed"] += 1
    return out


# ---- reading --------------------------------------------------------------------------------

GAP = 16 << 10  # read neighbours in one request when at most this many bytes lie between them


def read_ranges(url: str, ranges: list[tuple[int, int]], storage_options: dict | None = None,
                io: dict | None = None) -> list[bytes]:
    """Bytes of [start, end) ``ranges`` (ascending) of one shard. Neighbours closer than ``GAP``
    are merged into one read; remote runs are fetched concurrently with fsspec ``cat_ranges``."""
    runs: list[list[int]] = []  # [start, end, first range, last range]
    for i, (a, b) in enumerate(ranges):
        if runs and a - runs[-1][1] <= GAP and a >= runs[-1][1]:
            runs[-1][1], runs[-1][3] = b, i
        else:
            runs.append([a, b, i, i])
    if is_remote(url):
        fs, path = filesystem(url, storage_options)
        blobs = fs.cat_ranges([path] * len(runs), [r[0] for r in runs], [r[1] for r in runs])
        for b in blobs:
            if isinstance(b, BaseException):
                raise b
    else:
        blobs = []
        with open(_local(url), "rb", buffering=0) as f:
            for a, b, _, _ in runs:
                f.seek(a)
                blobs.append(f.read(b - a))
    out = []
    for (a, _, i, j), blob in zip(runs, blobs):
        for s, e in ranges[i:j + 1]:
            if e - a > len(blob):
                raise ShardError(f"{url}: shard is shorter than its index (changed while open?)")
            out.append(bytes(blob[s - a:e - a]))
    if io is not None:
        io["requests"] = io.get("requests", 0) + len(runs)
        io["bytes"] = io.get("bytes", 0) + sum(len(b) for b in blobs)
    return out
