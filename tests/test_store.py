
import numpy as np
import pytest
import zarr

import tinydistill as td
from tinydistill.errors import FormatVersionError, IncompleteError, NotAStoreError, StoreError
from tinydistill._util import keys_fingerprint, spec_hash

from helpers import fake_topk, fill, unit_data


def test_round_trip_topk_desc_and_stored(small_store):
    fill(small_store)
    st = td.open_store(small_store.path)
    for e in range(2):
        for s in range(st.num_shards):
            logp, idx, seed = unit_data(st, e, s)
            a, b = st.shard_bounds(s)
            got_lp, got_ix = st.topk(e, slice(a, b))
            assert got_lp.dtype == np.float32 and got_ix.dtype == np.int64
            # descending order restored (rows where two values round to the same fp16 may swap)
            no_tie = (np.diff(got_lp, axis=1) < 0).all(1)
            assert no_tie.mean() > 0.9
            np.testing.assert_array_equal(got_ix[no_tie], idx[no_tie])
            np.testing.assert_array_equal(np.sort(got_ix, 1), np.sort(idx, 1))
            np.testing.assert_allclose(got_lp, logp, rtol=1e-3, atol=1e-4)  # fp16 rounding only
            assert (np.diff(got_lp, axis=1) <= 0).all()
            st_lp, st_ix = st.topk(e, slice(a, b), order="stored")
            assert (np.diff(st_ix, axis=1) > 0).all()  # ascending class id on disk
            np.testing.assert_array_equal(np.sort(st_ix, 1), np.sort(idx, 1))
            np.testing.assert_array_equal(st.seeds(e, slice(a, b)), seed)


def test_rows_int_slice_array_negative(small_store):
    fill(small_store, epochs=[0])
    st = td.open_store(small_store.path)
    full_lp, full_ix = st.topk(0, slice(None))
    rows = np.array([999, 3, 512, 3, 130, 0])  # unsorted, repeated, across chunks and shards
    lp, ix = st.topk(0, rows)
    np.testing.assert_array_equal(ix, full_ix[rows])
    np.testing.assert_array_equal(lp, full_lp[rows])
    lp1, ix1 = st.topk(0, 7)
    assert lp1.shape == (1, 5)
    np.testing.assert_array_equal(ix1[0], full_ix[7])
    np.testing.assert_array_equal(st.topk(0, -1)[1][0], full_ix[999])
    np.testing.assert_array_equal(st.topk(0, slice(10, 40, 3))[1], full_ix[10:40:3])
    assert st.topk(0, [])[0].shape == (0, 5)
    with pytest.raises(IndexError):
        st.topk(0, 1000)
    with pytest.raises(IndexError):
        st.topk(2, 0)


def test_metadata_and_info(small_store):
    fill(small_store, epochs=[0])
    small_store.write_shard(1, 0, *unit_data(small_store, 1, 0))
    st = td.open_store(small_store.path)
    assert list(st.keys[:2]) == ["img0000", "img0001"]
    np.testing.assert_array_equal(st.labels, np.arange(1000) % 50)
    assert st.class_names[3] == "class3"
    np.testing.assert_allclose(st.completed(), [1.0, 256 / 1000])
    info = st.info
    for key in ("num_classes", "k", "epochs", "num_views", "teacher", "spec_hash", "bytes_per_view"):
        assert key in info
    assert info["num_views"] == 2000 and info["complete_views"] == 1256
    assert info["teacher"]["name"] == "resnet18"
    assert info["spec_hash"] == spec_hash({"img_size": 32})
    assert info["bytes_per_view"] == pytest.approx(info["bytes_on_disk"] / 1256)
    attrs = dict(zarr.open_group(str(st.path), mode="r").attrs)
    assert attrs["dataset_fingerprint"] == keys_fingerprint(f"img{i:04d}" for i in range(1000))
    assert attrs["versions"]["torch"] and attrs["versions"]["timm"] and attrs["versions"]["pillow"]
    assert attrs["tinydistill_format"] == 2 and attrs["id_layout"] == "gaps" and attrs["base_seed"] == 0 and attrs["created"]
    with pytest.raises(IncompleteError, match="epoch 1 shard"):
        st.topk(1, 300)


def test_raw_zarr_arrays_readable(small_store):
    """A user opening the group with plain zarr gets ids from one cumsum over the gaps."""
    fill(small_store, epochs=[0])
    g = zarr.open_group(str(small_store.path), mode="r")
    assert g["logp"].dtype == np.float16 and g["index_gap"].dtype == np.int16 and "index" not in g
    assert g["logp"].shape == (2, 1000, 5) and g["seed"].dtype == np.uint64
    _, idx = fake_topk(256, 50, 5, seed=0)
    np.testing.assert_array_equal(np.cumsum(g["index_gap"][0, :256], axis=1), np.sort(idx, 1))
    assert (g["index_gap"][0, :256, 1:] > 0).all()
    assert g["complete"][0].tolist() == [1, 1, 1, 1] and g["complete"][1].tolist() == [0, 0, 0, 0]
    assert g["key"].dtype == np.uint8 and bytes(g["key"][3]).rstrip(b"\0") == b"img0003"
    assert g["logp"].metadata.dimension_names == ("epoch", "row", "slot")
    # only codecs and data types of the Zarr v3 core specification, so every reader decodes them
    import json
    from pathlib import Path

    def names(codecs):
        for c in codecs:
            yield c["name"]
            yield from names(c.get("configuration", {}).get("codecs", []))
            yield from names(c.get("configuration", {}).get("index_codecs", []))

    for name in ("logp", "index_gap", "seed", "key", "label", "complete"):
        meta = json.loads((Path(small_store.path) / name / "zarr.json").read_text())
        assert set(names(meta["codecs"])) <= {"sharding_indexed", "bytes", "blosc", "crc32c"}, name
        assert meta["data_type"] in {"float16", "int16", "int32", "uint8", "uint64"}, name
        assert meta["dimension_names"] and None not in meta["dimension_names"], name

def test_ids_layout_stores_class_ids(tmp_path):
    st = td.create_store(tmp_path / "ids.zarr", num_classes=50, k=5, epochs=1, id_layout="ids",
                         keys=[f"k{i}" for i in range(300)], chunk_rows=100, shard_rows=100)
    fill(st)
    g = zarr.open_group(str(st.path), mode="r")
    assert "index" in g and "index_gap" not in g
    for s in range(3):
        logp, idx, _ = unit_data(st, 0, s)
        np.testing.assert_array_equal(g["index"][0, 100 * s:100 * (s + 1)], np.sort(idx, 1))
        np.testing.assert_array_equal(td.open_store(st.path).topk(0, slice(100 * s, 100 * (s + 1)), order="stored")[1],
                                      np.sort(idx, 1))
    assert td.open_store(st.path).info["id_layout"] == "ids"
    with pytest.raises(StoreError, match="id_layout"):
        td.create_store(tmp_path / "bad.zarr", num_classes=5, k=1, epochs=1, keys=["a"], id_layout="deltas")


def test_int32_index_for_many_classes(tmp_path):
    st = td.create_store(tmp_path / "big.zarr", num_classes=40000, k=3, epochs=1, keys=["a", "b"])
    st.write_shard(0, 0, np.log([[0.5, 0.3, 0.2]] * 2), [[39999, 32768, 7], [1, 2, 3]], [0, 1])
    assert td.open_store(st.path).topk(0, 0)[1].tolist() == [[39999, 32768, 7]]
    assert zarr.open_group(str(st.path), mode="r")["index_gap"].dtype == np.int32


def test_write_shard_validates(small_store):
    logp, idx, seed = unit_data(small_store, 0, 0)
    with pytest.raises(StoreError, match="expected"):
        small_store.write_shard(0, 0, logp[:10], idx[:10], seed[:10])
    bad = idx.copy(); bad[0, 1] = bad[0, 0]
    with pytest.raises(StoreError, match="repeats"):
        small_store.write_shard(0, 0, logp, bad, seed)
    bad = idx.copy(); bad[3, 0] = 50
    with pytest.raises(StoreError, match="class ids"):
        small_store.write_shard(0, 0, logp, bad, seed)
    with pytest.raises(StoreError, match="read-only"):
        td.open_store(small_store.path).write_shard(0, 0, logp, idx, seed)
    assert not small_store.is_complete(0, 0)


def test_create_refuses_existing_and_bad_args(small_store, tmp_path):
    with pytest.raises(StoreError, match="already exists"):
        td.create_store(small_store.path, num_classes=5, k=1, epochs=1, keys=["a"])
    st = td.create_store(small_store.path, num_classes=5, k=1, epochs=1, keys=["a"], overwrite=True)
    assert st.num_classes == 5
    with pytest.raises(StoreError, match="K=6"):
        td.create_store(tmp_path / "x.zarr", num_classes=5, k=6, epochs=1, keys=["a"])
    with pytest.raises(StoreError, match="not unique"):
        td.create_store(tmp_path / "y.zarr", num_classes=5, k=1, epochs=1, keys=["a", "a"])


def test_bad_paths_and_versions(tmp_path, small_store):
    with pytest.raises(NotAStoreError, match="no such file"):
        td.open_store(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(NotAStoreError, match="not a tinydistill store") as err:
        td.open_store(tmp_path / "plain")
    assert len(str(err.value).splitlines()) == 1 and err.value.__suppress_context__  # no chained traceback
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(NotAStoreError, match="is a file"):
        td.open_store(tmp_path / "f.txt")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["foo"] = 1
    with pytest.raises(NotAStoreError, match="not a tinydistill store"):
        td.open_store(tmp_path / "other.zarr")
    g = zarr.open_group(str(small_store.path), mode="r+")
    g.attrs["tinydistill_format"] = 99
    with pytest.raises(FormatVersionError, match="version 99, .* reads versions 1, 2"):
        td.open_store(small_store.path)


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_fsspec_urls(tmp_path, scheme):
    pytest.importorskip("fsspec")
    url = f"memory://td-test/{tmp_path.name}.zarr" if scheme == "memory" else f"file://{tmp_path}/u.zarr"
    st = td.create_store(url, num_classes=50, k=5, epochs=1, keys=[f"k{i}" for i in range(300)],
                         chunk_rows=100, shard_rows=200)
    fill(st)
    r = td.open_store(url)
    assert r.completed().tolist() == [1.0]
    np.testing.assert_array_equal(r.topk(0, slice(200, 300))[1], unit_data(r, 0, 1)[1])
    assert r.info["bytes_per_view"] > 0


def test_skipped_views_are_marked_not_filled(small_store):
    logp, idx, seed = unit_data(small_store, 0, 0)
    skip = np.zeros(256, bool)
    skip[[3, 200]] = True
    small_store.write_shard(0, 0, logp, idx, seed, skipped=skip)
    st = td.open_store(small_store.path)
    lp, ix = st.topk(0, slice(0, 256))
    assert np.isnan(lp[skip]).all() and (ix[skip] == -1).all()  # no fake target for them
    np.testing.assert_array_equal(np.sort(ix[~skip], 1), np.sort(idx[~skip], 1))
    assert st.skipped(0, slice(0, 256)).nonzero()[0].tolist() == [3, 200]
    from tinydistill.summary import summarize
    stats = summarize(st)["stats"]
    assert stats["views_skipped"] == 2 and stats["views_sampled"] == 254
    assert not np.isnan(stats["mean_top1_prob"])
