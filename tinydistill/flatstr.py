"""Many strings as a few numpy arrays: sample keys and paths without a Python object per row.

A long-lived process (a DataLoader worker above all) that holds one ``str`` per row makes the
pages it touches private: reading a string writes its reference count, so copy-on-write copies
the page (pytorch issue 13246). :class:`Strings` keeps N strings as one UTF-8 blob and its end
offsets, optionally behind a per-row prefix from a small table (an ImageFolder's class folder,
a webdataset shard's name), and decodes a row only when asked.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Iterator, Sequence

import numpy as np

CHUNK = 1 << 16  # rows per vectorised step (bounds the temporaries)


def _small_uint(top: int):
    """The narrowest unsigned dtype that holds ``top``."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dt).max:
            return dt
    return np.int64


def release_freed() -> None:
    """Give the heap's free pages back to the OS (glibc's ``malloc_trim``): building a large
    table frees big temporaries that glibc would otherwise keep, resident, for the whole run."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def segments(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat int64 indices of the segments [starts[i], starts[i] + lengths[i]), one after the other."""
    lengths = np.asarray(lengths, np.int64)
    total = int(lengths.sum())
    if not total:
        return np.zeros(0, np.int64)
    first = np.cumsum(lengths) - lengths  # where each segment begins in the output
    return np.repeat(np.asarray(starts, np.int64) - first, lengths) + np.arange(total, dtype=np.int64)


class Strings(Sequence[str]):
    """N strings: ``prefixes[prefix[i]] + blob[start(i):ends[i]]`` decoded as UTF-8."""

    def __init__(self, blob: np.ndarray, ends: np.ndarray, prefix: np.ndarray | None = None,
                 prefixes: Sequence[str] = ("",)):
        self.blob = np.asarray(blob, np.uint8)
        self.ends = np.asarray(ends, _small_uint(len(self.blob)))
        self.prefixes = [str(p) for p in prefixes]
        self.prefix = None if prefix is None else np.asarray(prefix, _small_uint(max(len(self.prefixes) - 1, 0)))
        self._prefix_bytes = [p.encode("utf-8", "surrogateescape") for p in self.prefixes]

    @classmethod
    def from_list(cls, items: Iterable[str]) -> "Strings":
        """From Python strings (small sources, tests): the list is dropped once packed."""
        raw = [str(s).encode("utf-8", "surrogateescape") for s in items]
        ends = np.cumsum([len(b) for b in raw], dtype=np.int64) if raw else np.zeros(0, np.int64)
        return cls(np.frombuffer(b"".join(raw), np.uint8).copy(), ends)

    @classmethod
    def from_joined(cls, joined: bytes, sep: int = 0, prefix=None, prefixes=("",)) -> "Strings":
        """From strings each followed by the byte ``sep`` (NUL: never in a file name or tar key)."""
        arr = np.frombuffer(joined, np.uint8)
        at = np.flatnonzero(arr == sep)
        keep = np.ones(len(arr), bool)
        keep[at] = False
        return cls(arr[keep], at - np.arange(len(at)), prefix, prefixes)

    def __len__(self) -> int:
        return len(self.ends)

    def _starts(self, rows: np.ndarray) -> np.ndarray:
        s = self.ends[np.maximum(rows - 1, 0)].astype(np.int64)
        s[rows == 0] = 0
        return s

    def raw(self, i: int) -> bytes:
        """UTF-8 bytes of string ``i``."""
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range [0, {len(self)})")
        a = int(self.ends[i - 1]) if i else 0
        head = self._prefix_bytes[int(self.prefix[i])] if self.prefix is not None else self._prefix_bytes[0]
        return head + self.blob[a:int(self.ends[i])].tobytes()

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            return self.raw(i).decode("utf-8", "surrogateescape")
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return [self[int(j)] for j in np.asarray(i).reshape(-1)]

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other) -> bool:
        if isinstance(other, Strings):
            return len(self) == len(other) and self.fingerprint() == other.fingerprint()
        try:
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        except TypeError:
            return NotImplemented

    __hash__ = None  # mutable-looking sequence: no hash

    def index(self, key: str, *args) -> int:
        for i, k in enumerate(self):
            if k == key:
                return i
        raise ValueError(f"{key!r} is not in the keys")

    def take(self, order: np.ndarray) -> "Strings":
        """Strings ``order[0], order[1], ...`` as a new packed table (built a chunk at a time,
        with few temporaries: they would stay in the heap as garbage)."""
        order = np.asarray(order, np.int64)
        ends = np.empty(len(order), _small_uint(len(self.blob)))
        total = 0
        for a in range(0, len(order), CHUNK):
            rows = order[a:a + CHUNK]
            run = np.cumsum(self.ends[rows].astype(np.int64) - self._starts(rows)) + total
            ends[a:a + len(rows)] = run
            total = int(run[-1]) if len(run) else total
        blob = np.empty(total, np.uint8)
        for a in range(0, len(order), CHUNK):
            rows = order[a:a + CHUNK]
            s = self._starts(rows)
            n = self.ends[rows].astype(np.int64) - s
            lo = int(ends[a - 1]) if a else 0
            blob[lo:lo + int(n.sum())] = self.blob[segments(s, n)]
        prefix = None if self.prefix is None else self.prefix[order]
        return Strings(blob, ends, prefix, self.prefixes)

    def fingerprint(self) -> str:
        """sha256 of the ordered strings, equal to :func:`tinydistill._util.keys_fingerprint`
        of the same strings (each one's 4-byte little-endian UTF-8 length, then its bytes),
        computed a chunk of rows at a time."""
        h = hashlib.sha256()
        pre = np.frombuffer(b"".join(self._prefix_bytes), np.uint8)
        pre_len = np.array([len(b) for b in self._prefix_bytes], np.int64)
        pre_start = np.cumsum(pre_len) - pre_len
        for a in range(0, len(self), CHUNK):
            rows = np.arange(a, min(a + CHUNK, len(self)), dtype=np.int64)
            m = len(rows)
            s = self._starts(rows)
            n = self.ends[rows].astype(np.int64) - s
            pid = np.zeros(m, np.int64) if self.prefix is None else self.prefix[rows].astype(np.int64)
            plen = pre_len[pid]
            # one gather from [lengths as bytes | prefix table | this chunk's names (contiguous)]
            src = np.concatenate([(plen + n).astype("<u4").view(np.uint8), pre, self.blob[int(s[0]):int(s[-1] + n[-1])]])
            starts = np.stack([4 * np.arange(m), 4 * m + pre_start[pid], 4 * m + len(pre) + s - s[0]], 1).ravel()
            lens = np.stack([np.full(m, 4), plen, n], 1).ravel()
            first = np.cumsum(lens) - lens
            total = int(lens.sum())
            idx = np.repeat((starts - first).astype(np.int32), lens) + np.arange(total, dtype=np.int32)
            h.update(src[idx].tobytes())
        release_freed()
        return h.hexdigest()

    @property
    def nbytes(self) -> int:
        return self.blob.nbytes + self.ends.nbytes + (0 if self.prefix is None else self.prefix.nbytes)

    def __repr__(self) -> str:
        return f"Strings({len(self)} strings, {self.nbytes} bytes)"
