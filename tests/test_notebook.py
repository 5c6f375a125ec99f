"""The notebook API: lookups by key and mask, tables, short errors, light imports."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tinydistill as td
from tinydistill.errors import NotAStoreError, UnknownKeyError

from helpers import fill

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def st(small_store):
    fill(small_store, epochs=[0])
    return td.open_store(small_store.path)


def test_len_shape_and_lookup_by_key(st):
    assert len(st) == 1000 and st.shape == (2, 1000, 5)
    assert st.row_of("img0042") == 42
    np.testing.assert_array_equal(st.rows_of(["img0007", "img0003"]), [7, 3])
    full_lp, full_ix = st.topk(0, slice(None))
    lp, ix = st.topk(0, "img0042")
    np.testing.assert_array_equal(ix[0], full_ix[42])
    lp, ix = st.topk(0, ["img0900", "img0001"])
    np.testing.assert_array_equal(ix, full_ix[[900, 1]])
    with pytest.raises(UnknownKeyError, match="no sample with key 'nope'") as err:
        st.topk(0, "nope")
    assert str(err.value).count("\n") == 0 and isinstance(err.value, KeyError)


def test_boolean_masks(st):
    full_lp, full_ix = st.topk(0, slice(None))
    mask = st.labels == 7
    lp, ix = st.topk(0, mask)
    np.testing.assert_array_equal(ix, full_ix[mask])
    assert len(ix) == 20
    np.testing.assert_array_equal(st.seeds(0, mask), st.seeds(0, np.nonzero(mask)[0]))
    with pytest.raises(IndexError, match="boolean mask of rows needs 1000"):
        st.topk(0, mask[:10])


def test_topk_with_names(st):
    lp, ix, names = st.topk(0, slice(0, 3), names=True)
    assert names.shape == (3, 5)
    assert [[f"class{c}" for c in row] for row in ix] == names.tolist()


def test_to_pandas(st):
    pytest.importorskip("pandas")
    df = st.to_pandas(0, [5, 130], k=3)
    assert list(df.columns) == ["epoch", "row", "key", "label", "label_name", "rank", "class_id",
                                "class_name", "prob", "logp"]
    assert len(df) == 6 and df["row"].tolist() == [5, 5, 5, 130, 130, 130]
    lp, ix = st.topk(0, [5, 130])
    np.testing.assert_array_equal(df["class_id"].to_numpy().reshape(2, 3), ix[:, :3])
    np.testing.assert_allclose(df["prob"].to_numpy().reshape(2, 3), np.exp(lp[:, :3]))
    assert df["key"].iloc[0] == "img0005" and df["label_name"].iloc[3] == "class30"
    assert df["class_name"].iloc[0] == f"class{ix[0, 0]}"
    assert (df.groupby("row")["prob"].apply(lambda p: (np.diff(p.to_numpy()) <= 0).all())).all()


def test_missing_optional_package_is_one_line(st, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas -> ImportError
    with pytest.raises(ImportError, match=r"this needs pandas: pip install pandas") as err:
        st.to_pandas(0, 0)
    assert "\n" not in str(err.value) and err.value.__suppress_context__


def test_missing_fsspec_backend_names_the_package(tmp_path, monkeypatch):
    pytest.importorskip("fsspec")
    import importlib

    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if s3fs were not installed (import -> ImportError)
    registry = importlib.import_module("fsspec.registry")  # (fsspec.registry is a mapping, not the module)
    monkeypatch.delitem(registry._registry, "s3", raising=False)  # registered by an earlier s3:// test
    with pytest.raises(NotAStoreError, match=r"s3:// URLs need the s3fs package: pip install s3fs") as err:
        td.open_store("s3://some-bucket/logits.zarr")
    assert "\n" not in str(err.value) and "not a tinydistill store" not in str(err.value)
    with pytest.raises(td.TinydistillError, match="s3fs"):
        td.create_store("s3://some-bucket/new.zarr", num_classes=5, k=1, epochs=1, keys=["a"])


def test_open_and_read_do_not_import_torch(st):
    """Opening a store and reading targets loads neither torch nor timm (they take seconds)."""
    code = (
        "import sys, tinydistill as td\n"
        f"st = td.open_store({str(st.path)!r})\n"
        "st.topk(0, slice(0, 10)); st.seeds(0, 3); st.keys; st.labels; st.info\n"
        "bad = [m for m in ('torch', 'timm', 'torchvision', 'tinydistill.views') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr


@pytest.fixture(scope="module")
def view_store(tmp_path_factory):
    from tinydistill.augment import AugSpec
    from tinydistill.sources import open_source
    from tinydistill.generate import create_view_store

    spec = AugSpec(img_size=24, mixup=0.8, cutmix=1.0, mix_prob=0.5, mix_group=32)
    path = tmp_path_factory.mktemp("v") / "v.zarr"
    create_view_store(path, open_source("digits"), spec, base_seed=7, epochs=2, k=3, chunk_rows=64, shard_rows=128)
    return td.open_store(path)


def test_view_repr_and_png(view_store):
    from io import BytesIO

    from PIL import Image

    views = [view_store.view(1, r, "digits") for r in range(40)]
    mixed = next(v for v in views if v.partner != v.row)
    plain = next(v for v in views if v.partner == v.row)
    text = repr(mixed)
    assert "\n" not in text and len(text) < 200 and "tensor" not in text
    assert f"row={mixed.row}" in text and f"mixed with row {mixed.partner}" in text and "3x24x24" in text
    assert "mixed" not in repr(plain)
    pics = {}
    for name, v in (("mixed", mixed), ("plain", plain)):
        png = v._repr_png_()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        pic = Image.open(BytesIO(png)).convert("RGB")
        pics[name] = pic
        # the view itself, enlarged 7x (24 px -> 168 px), sits at the top of the picture
        top = np.asarray(pic)[:168]
        x0 = (pic.width - 168) // 2
        want = v.image.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(top[::7, x0:x0 + 168:7], want)
    assert pics["mixed"].height > pics["plain"].height  # one more caption line: the partner


@pytest.mark.slow
def test_first_view_imports_no_sklearn(view_store):
    """Loading digits for replay reads scikit-learn's CSV without importing scikit-learn."""
    code = ("import sys, tinydistill as td\n"
            f"v = td.open_store({str(view_store.path)!r}).view(0, 3, 'digits')\n"
            "assert v.image.shape == (3, 24, 24)\n"
            "assert 'sklearn' not in sys.modules\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
