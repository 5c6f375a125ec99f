"""Random access into webdataset tars: an index of each tar's samples (member names, byte
offsets, sizes), built once by a scan of the tar headers and reused, so a batch reads only its
own images (a seek on a local file, a byte-range request on object storage).

Where an index comes from, first match wins:

1. ``<shard>.tar.idx.json`` beside the shard (write it with :func:`write_beside`), used when it
   records the shard's current size and version;
2. ``$TINYDISTILL_CACHE/tarindex/<sha256 of the URL>.json`` (default ``~/.cache/tinydistill``),
   written by the first process that scans the shard (temp file + ``os.replace``, so ranks that
   scan at once never leave a torn file).

A shard's *version* is its mtime in ns (local files) or its ETag (object storage, else the
Last-Modified time): a tar that changed since it was indexed is re-indexed, never read wrong.
Grouping follows webdataset's own (``__key__`` up to the first dot of the file name, lower-case
extensions, ``__*__`` members skipped, a sample never spans tars), so keys and order are those
of a sequential ``wds.WebDataset`` pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
import tempfile
from pathlib import Path

from .errors import TinydistillError, one_line

FORMAT = 1
INDEX_SUFFIX = ".idx.json"  # beside the shard: shard-000.tar -> shard-000.tar.idx.json
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

def scan(url: str, storage_options: dict | None = None) -> list:
    """Samples of one tar as ``[key, label, [[ext, offset, size], ...]]``, grouped as webdataset
    groups them. Local tars are scanned header by header (payloads are skipped with seeks, only
    label members are read); remote tars are streamed once."""
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


def _group(tar: tarfile.TarFile, url: str, stream: bool) -> list:
    samples: list = []
    labels: dict = {}  # label members of the current sample: ext -> bytes (tiny)

    def close():
        if samples and labels:
            data = labels[next(e for e in LABEL_EXTS if e in labels)]
            try:
                samples[-1][1] = int(data.decode().strip())
            except ValueError:
                raise ShardError(f"{url}: {samples[-1][0]}: label is not an integer ({data[:20]!r})") from None
        labels.clear()

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
        if not samples or samples[-1][0] != key:
            close()
            samples.append([key, -1, []])
        members = samples[-1][2]
        if any(e == ext for e, _, _ in members):
            raise ShardError(f"{url}: {name}: duplicate file name in tar file")
        members.append([ext, int(ti.offset_data), int(ti.size)])
        if ext in LABEL_EXTS:
            labels[ext] = tar.extractfile(ti).read()
        if stream:
            tar.members = []  # keep memory flat on big tars
    close()
    return samples


# ---- the index, cached ----------------------------------------------------------------------

def _cache_path(url: str) -> Path:
    return cache_dir() / (hashlib.sha256(url.encode()).hexdigest()[:40] + ".json")


def _read_index(path: str, url: str, size: int, version: str, storage_options=None) -> list | None:
    """The samples of an index file when it describes this exact shard, else None."""
    try:
        if is_remote(path):
            fs, p = filesystem(path, storage_options)
            raw = fs.cat_file(p)
        else:
            raw = Path(_local(path)).read_bytes()
        doc = json.loads(raw)
    except Exception:  # absent, unreadable or torn: index again
        return None
    if doc.get("format") != FORMAT or doc.get("size") != size or doc.get("version") != version:
        return None
    return doc["samples"]


def _doc(url: str, size: int, version: str, samples: list) -> bytes:
    return json.dumps({"format": FORMAT, "url": url, "size": size, "version": version,
                       "samples": samples}, separators=(",", ":")).encode()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # concurrent ranks write equal files: the last rename wins, none is torn
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


def load(url: str, storage_options: dict | None = None, stats: dict | None = None) -> tuple[list, int]:
    """(samples, size) of one shard from the index beside it, the cache, or a fresh scan (then
    cached). ``stats`` counts where indexes came from (``beside``, ``cache``, ``scanned``)."""
    size, version = stat(url, storage_options)
    samples = _read_index(url + INDEX_SUFFIX, url, size, version, storage_options)
    how = "beside"
    if samples is None:
        cached = _cache_path(url)
        samples = _read_index(str(cached), url, size, version)
        how = "cache"
        if samples is None:
            samples = scan(url, storage_options)
            how = "scanned"
            try:
                _write_atomic(cached, _doc(url, size, version, samples))
            except OSError:  # a read-only home: work without a cache
                pass
    if stats is not None:
        stats[how] = stats.get(how, 0) + 1
    return samples, size


def write_beside(url: str, storage_options: dict | None = None) -> str:
    """Index a shard and write ``<shard>.tar.idx.json`` next to it (local or remote); returns its URL.
    Index shards where they will be read from: the recorded version is that copy's mtime/ETag."""
    size, version = stat(url, storage_options)
    data = _doc(url, size, version, scan(url, storage_options))
    out = url + INDEX_SUFFIX
    if is_remote(url):
        fs, p = filesystem(out, storage_options)
        fs.pipe_file(p, data)
    else:
        _write_atomic(Path(_local(out)), data)
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
