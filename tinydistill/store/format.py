"""The store format: layout constants, codecs, key and class-id encodings, fp16 numerics, URLs.

Layout of format 2 (E epochs, N rows, K kept classes, S = ceil(N / shard_rows) shards)::

    logp       (E, N, K) float16  top-K log-probabilities at T=1 (fill NaN = never written)
    index_gap  (E, N, K) int16    class ids as gaps: slot 0 = the row's smallest id, slot j =
                                  id[j] - id[j-1]; ids = cumsum over the last axis (int32 when
                                  num_classes > 32767), fill -1 (never written or skipped)
      or index (E, N, K)          the class ids themselves (``id_layout="ids"``, ~7 % larger)
    attention  (E, N, G, G) uint8 the teacher's G x G attention map per view, cube-root coded
                                  (only with gen-logits --attention-grid G; see tinydistill.kinds)
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

This module imports numpy and zarr's codecs only, so :mod:`tinydistill.config` takes the
layout's defaults from here.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Sequence

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec

from ..errors import one_line

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
FORMAT_KEY = "tinydistill_format"  # group attribute that marks a finished tinydistill store
ID_LAYOUTS = ("gaps", "ids")
DEFAULT_CHUNK_ROWS = 4096  # rows per store chunk
DEFAULT_SHARD_CHUNKS = 16  # shard = 16 chunks = 65,536 rows by default
FP16_MIN = float(np.finfo(np.float16).min)
SEED_UNSET = np.iinfo(np.uint64).max  # fill value of ``seed``: a seed that was never written
SEED_SKIPPED = SEED_UNSET - np.uint64(1)  # seed of a view whose image could not be read (--skip-bad)
# which fsspec backend package an URL scheme needs, and the extra that installs it
_EXTRAS = {"s3fs": "tinydistill[s3]", "gcsfs": "tinydistill[gcs]"}


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


# ---- encodings ------------------------------------------------------------------------------

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


# ---- fp16 log-probabilities -----------------------------------------------------------------

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


# ---- paths, URLs and their errors -----------------------------------------------------------

def _local(path: str) -> str:
    """file:// URLs are local paths: open them with LocalStore, which can fsync."""
    return path[len("file://"):] if path.startswith("file://") else path


def _is_url(path: str) -> bool:
    return "://" in _local(path)


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
        return f"{path}: {scheme}:// needs a package that is not installed ({one_line(exc)})"
    extra = f" (or pip install '{_EXTRAS[pkg]}')" if pkg in _EXTRAS else ""
    return f"{path}: {scheme}:// URLs need the {pkg} package: pip install {pkg}{extra}"
