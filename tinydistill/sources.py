"""Data sources, named by one string SRC: an ImageFolder directory, webdataset shards, or digits.

Every source has stable unique keys, labels, class names and a fixed *store order*: row r of
the store is ``source.keys[r]``. :meth:`Source.read` yields decoded images for rows in
ascending order; webdataset sources read each image by its byte range in the tar.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ._util import keys_fingerprint
from .errors import TinydistillError, one_line
from .flatstr import Strings, release_freed

log = logging.getLogger("tinydistill")

ORDER_SEED = 0  # the permutation that gives an ImageFolder its store order
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "pgm", "tif", "tiff")


class SourceError(TinydistillError):
    """SRC does not name a readable data source."""


class BadSampleError(TinydistillError):
    """An image that cannot be read or decoded."""


class Source:
    """Base: subclasses fill ``name``, ``keys``, ``labels``, ``class_names`` and ``_load``."""

    name: str
    keys: Strings  # flat arrays, a str per row only when asked (no object per row in a worker)
    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def fingerprint(self) -> str:
        if isinstance(self.keys, Strings):
            return self.keys.fingerprint()
        return keys_fingerprint(self.keys)

    def read(self, rows: Sequence[int]) -> Iterator[tuple[int, "object"]]:
        """Yield (row, PIL image or BadSampleError) for ascending ``rows``, decoding each once."""
        for r in rows:
            try:
                yield int(r), self._load(int(r))
            except Exception as e:  # corrupt file, truncated JPEG, vanished path ...
                yield int(r), BadSampleError(f"{self.name}: {self.keys[r]}: cannot read image ({one_line(e)})")

    def read_encoded(self, rows: Sequence[int]) -> Iterator[tuple[int, "object", tuple[int, int] | None]]:
        """Yield (row, encoded bytes or uint8 array or BadSampleError, (width, height)) for
        ascending ``rows`` without decoding pixels: what a worker ships when images are
        decoded on the GPU. The size comes from the image header."""
        for r in rows:
            try:
                data = self._encoded(int(r))
                if isinstance(data, np.ndarray):
                    yield int(r), data, (int(data.shape[1]), int(data.shape[0]))
                else:
                    yield int(r), data, _header_size(data)
            except Exception as e:
                yield int(r), BadSampleError(f"{self.name}: {self.keys[r]}: cannot read image ({one_line(e)})"), None

    def _encoded(self, row: int):
        """Encoded bytes of one image (default: the decoded pixels as a uint8 array)."""
        return np.asarray(self._load(row).convert("RGB"))

    def _load(self, row: int):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, rows={len(self)}, classes={self.num_classes})"


def _header_size(data: bytes) -> tuple[int, int]:
    """(width, height) from an image's header (PIL opens lazily: no pixels decoded)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.size


def _decode(data: bytes):
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()  # decode now, so a truncated file fails here and not inside a transform
    return img


class DigitsSource(Source):
    """The UCI handwritten digits scikit-learn ships: 1,797 8x8 grey images, 10 classes.

    Fixed split: original index i % 5 == 4 is ``val`` (359 images), the rest ``train`` (1,438).
    Store order is a seeded permutation, so chunks are not single-class.
    """

    def __init__(self, split: str = "train"):
        if split not in ("train", "val"):
            raise SourceError(f"digits:{split}: unknown split (use digits:train or digits:val)")
        images, target = _digits()
        idx = np.arange(len(target))
        chosen = idx[idx % 5 == 4] if split == "val" else idx[idx % 5 != 4]
        order = np.random.default_rng(ORDER_SEED).permutation(chosen)
        self.name = f"digits:{split}"
        self._images = np.round(images[order] * (255 / 16)).astype(np.uint8)
        self.keys = Strings.from_list(f"digits/{i:04d}" for i in order)
        self.labels = target[order].astype(np.int64)
        self.class_names = [str(c) for c in range(10)]

    def _load(self, row: int):
        from PIL import Image

        return Image.fromarray(self._images[row], mode="L")

    def _encoded(self, row: int):
        return self._images[row]


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """(images float [1797, 8, 8] in 0..16, labels [1797]) as sklearn's ``load_digits`` gives them.

    Read straight from the CSV file scikit-learn ships, found without importing scikit-learn
    (whose import takes about a second: most of a notebook's first ``view()`` on digits).
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is not None and csv.is_file():
        data = np.loadtxt(csv, delimiter=",")
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SourceError("digits needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    return d.images, d.target


class ImageFolderSource(Source):
    """A directory with one sub-folder per class. Store order: a seeded permutation of the files.

    Files are listed as torchvision's ``make_dataset`` lists them (class folders sorted,
    sub-folders walked in sorted order, file names sorted, extensions in ``IMAGE_EXTS``), one
    ``os.scandir`` per folder; keys (``class/file``) live in flat arrays (:mod:`tinydistill.flatstr`)
    and a path is ``root/key``, made when read. A class folder without images is left out
    (said in one warning line): it would add a class the data does not have.
    """

    def __init__(self, root: str):
        self.name = root
        self.root = root
        try:
            classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        except OSError as e:
            raise SourceError(f"{root}: not an ImageFolder directory ({one_line(e)})") from e
        if not classes:
            raise SourceError(f"{root}: not an ImageFolder directory (no class folders in it)")
        exts = tuple("." + e for e in IMAGE_EXTS)
        parts, dirs, counts, kept, empty = [], [], [], [], []
        for c in classes:
            n0 = len(parts)
            for rel, names in _walk(os.path.join(root, c), c, exts):
                dirs.append(rel + "/")
                counts.append(len(names))
                parts.append(("\0".join(names) + "\0").encode("utf-8", "surrogateescape") if names else b"")
            if sum(counts[n0:]):
                kept.append((c, n0, len(parts)))
            else:
                empty.append(c)
                del parts[n0:], dirs[n0:], counts[n0:]
        if empty:
            log.warning("%s: %d class folder(s) without images left out: %s", root, len(empty),
                        ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else ""))
        if not kept:
            raise SourceError(f"{root}: no images in its class folders")
        label_of_dir = np.zeros(len(dirs), np.int32)
        for i, (_, lo, hi) in enumerate(kept):
            label_of_dir[lo:hi] = i
        names = Strings.from_joined(b"".join(parts), prefix=np.repeat(np.arange(len(dirs)), counts), prefixes=dirs)
        del parts
        order = np.random.default_rng(ORDER_SEED).permutation(len(names))
        self.keys = names.take(order)
        del names, order
        self.labels = label_of_dir[self.keys.prefix]
        self.class_names = [c for c, _, _ in kept]
        self.ignored_classes = empty
        release_freed()

    def path(self, row: int) -> str:
        return os.path.join(self.root, self.keys[row])

    def _load(self, row: int):
        return _decode(Path(self.path(row)).read_bytes())

    def _encoded(self, row: int):
        return Path(self.path(row)).read_bytes()


def _walk(top: str, rel: str, exts: tuple) -> Iterator[tuple[str, list[str]]]:
    """(folder relative to the root, sorted image names) for ``top`` and its sub-folders, in
    ``sorted(os.walk(top, followlinks=True))`` order, as torchvision's ``make_dataset`` walks."""
    try:
        with os.scandir(top) as it:
            entries = list(it)
    except OSError:  # os.walk skips folders it cannot list
        return
    try:
        subs = [e.name for e in entries if e.is_dir()]
    except OSError:  # a link that cannot be followed: os.walk counts it as a file
        subs = [e.name for e in entries if _is_dir(e)]
    files = [n for n in (e.name for e in entries) if n.lower().endswith(exts)]
    if subs:
        dirs = set(subs)
        files = [n for n in files if n not in dirs]
    del entries
    files.sort()
    yield rel, files
    found = []  # every folder below, then sorted by its path as sorted(os.walk(...)) does
    for s in subs:
        found.extend(_walk(os.path.join(top, s), rel + "/" + s, exts))
    found.sort(key=lambda t: t[0])
    yield from found


def _is_dir(entry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


class WebDatasetSource(Source):
    """Webdataset tar shards (a brace pattern, or several joined with ``::``), in tar order.

    Keys are ``<shard name>/<__key__>``; labels come from a ``cls``/``cls.txt``/``label``/``class``
    member. Shards are read at random through a per-tar index (:mod:`tinydistill.tarindex`):
    opening reads only the indexes (numpy arrays: no object per sample), a batch reads only its
    own images (seeks locally, byte-range requests on s3://, gs://, http(s):// through fsspec).
    Under torchrun (``WORLD_SIZE`` > 1) a shard without an index is refused in one line naming
    ``tinydistill index-tars``, rather than scanned by every rank. ``pipe:`` shards cannot seek:
    they are listed and read by streaming the tars in order.
    """

    def __init__(self, spec: str, storage_options: dict | None = None):
        from webdataset.shardlists import expand_urls

        from . import tarindex

        self.name = spec
        self.urls = expand_urls(spec)
        self.storage_options = storage_options
        self.io = {"bytes": 0, "requests": 0}  # read by this process (benchmarks, tests)
        self.index_stats: dict = {}  # where each shard's index came from
        self._indexed = not any(u.startswith("pipe:") for u in self.urls)
        names = [_shard_name(u) for u in self.urls]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise SourceError(f"{spec}: two shards are named {dup}.tar: sample keys would not be unique")
        prefixes = [n + "/" for n in names]
        if self._indexed:
            blobs, ends, labels, offset, size, counts = [], [], [], [], [], []
            self.data_bytes, shift = 0, 0
            scan_ok = int(os.environ.get("WORLD_SIZE", 1)) <= 1  # under torchrun: index-tars first
            for url in self.urls:
                if not tarindex.is_remote(url) and not Path(tarindex._local(url)).is_file():
                    raise SourceError(f"{url}: no such shard")
                idx, nbytes = tarindex.load(url, storage_options, self.index_stats, scan_ok=scan_ok, spec=spec)
                self.data_bytes += nbytes
                blobs.append(idx.keys.blob)
                ends.append(idx.keys.ends.astype(np.int64) + shift)
                shift += len(idx.keys.blob)
                labels.append(idx.label)
                offset.append(idx.offset)
                size.append(idx.size)
                counts.append(len(idx))
            keys = Strings(_cat(blobs, np.uint8), _cat(ends, np.int64),
                           np.repeat(np.arange(len(self.urls)), counts), prefixes)
            self._shard = keys.prefix  # each row's shard: the keys' prefix ids
            offset, size = _cat(offset, np.int64), _cat(size, np.int64)
            self._has_image = None if (offset >= 0).all() else offset >= 0  # None: every sample has one
            self._offset = _narrow(offset)
            self._size = _narrow(size)
            labels = _cat(labels, np.int32)
            del blobs, ends, offset, size
        else:
            key_list, label_list, counts = [], [], []
            for url in self.urls:
                n = 0
                for sample in self._stream([url]):
                    key_list.append(f"{_shard_name(url)}/{sample['__key__']}")
                    label_list.append(_label(sample))
                    n += 1
                counts.append(n)
            if len(set(key_list)) != len(key_list):
                raise SourceError(f"{spec}: sample keys are not unique")
            keys, labels = Strings.from_list(key_list), np.array(label_list, dtype=np.int32)
            del key_list, label_list
        if not len(keys):
            raise SourceError(f"{spec}: the shards hold no samples")
        self.keys = keys
        self.labels = labels
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self.class_names = [str(c) for c in range(max(int(self.labels.max()) + 1, 1))]
        release_freed()

    def _stream(self, urls):
        import webdataset as wds

        try:
            ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
            yield from ds
        except TinydistillError:
            raise
        except Exception as e:
            raise SourceError(f"{self.name}: cannot read shards {urls[0]}... ({one_line(e)})") from e

    def _members(self, rows):
        """(row, {image extension: bytes}) for ascending rows: one read per run of neighbouring
        images of a shard (``pipe:`` shards: streamed from the first row's tar)."""
        rows = np.asarray([int(r) for r in rows], np.int64)
        if not len(rows):
            return
        if not self._indexed:
            yield from self._streamed(rows.tolist())
            return
        from . import tarindex

        for si in np.unique(self._shard[rows]):  # ascending shards hold ascending rows
            mine = rows[self._shard[rows] == si]
            ok = mine if self._has_image is None else mine[self._has_image[mine]]
            url = self.urls[int(si)]
            try:
                blobs = tarindex.read_ranges(url, [(int(self._offset[r]), int(self._offset[r]) + int(self._size[r]))
                                                   for r in ok], self.storage_options, self.io)
            except TinydistillError:
                raise
            except Exception as e:  # server down, credentials refused, shard deleted ...
                raise SourceError(f"{url}: cannot read shard ({one_line(e)})") from None
            got = dict(zip(ok.tolist(), blobs))
            for r in mine.tolist():
                yield r, ({"image": got[r]} if r in got else {})

    def _streamed(self, rows):
        first = int(np.searchsorted(self._starts, rows[0], side="right") - 1)
        last = int(np.searchsorted(self._starts, rows[-1], side="right") - 1)
        want = iter(rows)
        target = next(want)
        row = int(self._starts[first])
        for sample in self._stream(self.urls[first:last + 1]):
            if row == target:
                ext = next((e for e in IMAGE_EXTS if e in sample), None)
                yield row, ({"image": sample[ext]} if ext else {})
                target = next(want, None)
                if target is None:
                    return
            row += 1

    def _image_bytes(self, row: int, sample: dict) -> bytes:
        if "image" not in sample:
            raise BadSampleError(f"{self.name}: {self.keys[row]}: no image member ({', '.join(IMAGE_EXTS)})")
        return sample["image"]

    def read(self, rows):
        for row, sample in self._members(rows):
            try:
                item = _decode(self._image_bytes(row, sample))
            except Exception as e:
                item = BadSampleError(f"{self.name}: {self.keys[row]}: cannot read image ({one_line(e)})")
            yield row, item

    def read_encoded(self, rows):
        for row, sample in self._members(rows):
            try:
                data = self._image_bytes(row, sample)
                yield row, data, _header_size(data)
            except Exception as e:
                yield row, BadSampleError(f"{self.name}: {self.keys[row]}: cannot read image ({one_line(e)})"), None


def _cat(parts: list, dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


def _narrow(a: np.ndarray) -> np.ndarray:
    """uint32 when every value fits (negatives, meaning absent, are masked elsewhere), else int64."""
    return a.astype(np.uint32) if not len(a) or int(a.max()) < 2 ** 32 else a


def _shard_name(url: str) -> str:
    name = url.rstrip("/").split("/")[-1]
    return name[:-4] if name.endswith(".tar") else name


def _label(sample: dict) -> int:
    for k in ("cls", "cls.txt", "label", "class"):
        if k in sample:
            v = sample[k]
            return int(v.decode() if isinstance(v, bytes) else v)
    return -1


def open_source(src: str) -> Source:
    """The data source named by SRC: ``digits[:train|:val]``, a directory, or .tar shards."""
    src = str(src)
    if src == "digits" or src.startswith("digits:"):
        return DigitsSource(src.split(":", 1)[1] if ":" in src else "train")
    if ".tar" in src or "::" in src or src.startswith("pipe:"):
        return WebDatasetSource(src)
    if Path(src).is_dir():
        return ImageFolderSource(src)
    if not Path(src).exists():
        raise SourceError(f"{src}: no such directory or shards")
    raise SourceError(f"{src}: not a data source (expected an ImageFolder directory, webdataset "
                      ".tar shards, or digits[:train|:val])")
