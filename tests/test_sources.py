"""Data sources at scale: no Python object per row in any process, ImageFolder order and class
folders, flat keys that read back as the strings they were made from."""

import gc
import io
import sys
import tarfile
import types

import numpy as np
import pytest

from tinydistill._util import keys_fingerprint
from tinydistill.flatstr import Strings
from tinydistill.sources import ImageFolderSource, open_source

PNG = None


def _png() -> bytes:
    global PNG
    if PNG is None:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.full((5, 6, 3), 90, np.uint8)).save(buf, format="PNG")
        PNG = buf.getvalue()
    return PNG


def image_folder(root, n, classes=4, long_names=False):
    for i in range(n):
        c = f"n{i % classes:08d}" if long_names else f"c{i % classes}"
        (root / c).mkdir(parents=True, exist_ok=True)
        (root / c / (f"{c}_{i:05d}.JPEG" if long_names else f"{i}.png")).write_bytes(_png())
    return str(root)


def tars(root, n, shards=2):
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(root / f"s{s}.tar", "w") as tar:
            for i in range(s, n, shards):
                for name, data in ((f"n01440764_{i:05d}.png", _png()), (f"n01440764_{i:05d}.cls", b"%d" % (i % 7))):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(root / ("s{0..%d}.tar" % (shards - 1)))


def held(obj):
    """(Python objects reachable from ``obj``, bytes they hold), numpy buffers counted by size."""
    seen, todo, nbytes = set(), [obj], 0
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)
    while todo:
        o = todo.pop()
        if id(o) in seen or isinstance(o, skip):
            continue
        seen.add(id(o))
        nbytes += o.nbytes if isinstance(o, np.ndarray) and o.base is None else sys.getsizeof(o)
        todo.extend(gc.get_referents(o))
    return len(seen), nbytes


def test_image_folder_lists_what_torchvision_lists(tmp_path):
    from torchvision.datasets.folder import find_classes, make_dataset

    root = tmp_path / "d"
    image_folder(root, 30)
    (root / "c1" / "sub" / "deeper").mkdir(parents=True)
    (root / "c1" / "sub" / "x.PNG").write_bytes(_png())
    (root / "c1" / "sub" / "deeper" / "y.png").write_bytes(_png())
    (root / "c1" / "a_sub").mkdir()
    (root / "c1" / "a_sub" / "z.jpg").write_bytes(_png())
    (root / "c2" / "notes.txt").write_text("not an image")
    src = ImageFolderSource(str(root))
    classes, idx = find_classes(str(root))
    samples = make_dataset(str(root), idx, extensions=tuple("." + e for e in ("jpg", "jpeg", "png", "webp", "ppm",
                                                                             "bmp", "pgm", "tif", "tiff")))
    order = np.random.default_rng(0).permutation(len(samples))  # the store order before flat keys
    want = [samples[i][0][len(str(root)) + 1:] for i in order]
    assert list(src.keys) == want and src.labels.tolist() == [samples[i][1] for i in order]
    assert src.class_names == classes and src.fingerprint == keys_fingerprint(want)
    assert src.path(3) == str(root / want[3]) and src.read_encoded([3]).__next__()[1] == _png()


def test_empty_class_folder_is_left_out_in_one_line(tmp_path, caplog):
    root = tmp_path / "d"
    image_folder(root, 12, classes=3)
    (root / "c0b").mkdir()  # sorts between c0 and c1: would shift every later class id
    (root / "c2" / "only-a-subfolder").mkdir()
    src = ImageFolderSource(str(root))
    assert src.class_names == ["c0", "c1", "c2"] and src.num_classes == 3 and src.ignored_classes == ["c0b"]
    assert sorted(set(src.labels.tolist())) == [0, 1, 2]
    assert all(k.split("/")[0] == src.class_names[y] for k, y in zip(src.keys, src.labels.tolist()))
    lines = [r.getMessage() for r in caplog.records if "without images" in r.getMessage()]
    assert len(lines) == 1 and "c0b" in lines[0] and "\n" not in lines[0]


def test_strings_read_back_and_hash_like_a_list():
    items = ["a", "", "ümlaut/ß", "x" * 300, "shard/key.with.dots"]
    flat = Strings.from_list(items)
    assert list(flat) == items and flat[2] == items[2] and flat[-1] == items[-1] and flat[1:3] == items[1:3]
    assert flat.fingerprint() == keys_fingerprint(items)
    order = np.array([4, 0, 3, 3, 1])
    assert list(flat.take(order)) == [items[i] for i in order]
    pre = Strings.from_joined(b"k1\0k2\0\0", prefix=np.array([1, 0, 1]), prefixes=["p/", "q/"])
    assert list(pre) == ["q/k1", "p/k2", "q/"] and pre.fingerprint() == keys_fingerprint(list(pre))
    big = Strings.from_list(f"{i:07d}" for i in range(70_000))  # more than one chunk
    assert big.fingerprint() == keys_fingerprint(f"{i:07d}" for i in range(70_000))


@pytest.mark.parametrize("kind", ["folder", "tars"])
def test_a_worker_holds_no_python_object_per_row(tmp_path, kind):
    """What a long-lived DataLoader worker holds (the source inside a view core, after rendering
    a share of the rows) has as many Python objects at 4x the rows: per-row data lives in a
    few numpy buffers, whose pages copy-on-write then leaves shared. Bytes a row stay <= 40."""
    from tinydistill.augment import AugSpec
    from tinydistill.views import Views

    counts, per_row = [], []
    for n in (200, 800):
        if kind == "folder":
            src = open_source(image_folder(tmp_path / f"d{n}", n, long_names=True))
        else:
            src = open_source(tars(tmp_path / f"t{n}", n))
        core = Views(src, AugSpec(img_size=8), base_seed=0)
        core.render(0, list(range(0, n, 7))[:24])  # a worker's share: it touched these rows
        gc.collect()
        objs, nbytes = held(core)
        counts.append(objs)
        per_row.append(nbytes)
    assert counts[1] - counts[0] < 20, counts  # a str (or int) per row would add 600
    assert (per_row[1] - per_row[0]) / 600 <= 40, per_row
