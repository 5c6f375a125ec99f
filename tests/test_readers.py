"""Other Zarr readers see the same values as tinydistill: tensorstore (zarr3 driver) and xarray.

Every array of a store is read with each reader and compared with tinydistill's own reads
(``topk``, ``seeds``, ``keys``, ``labels``, ``complete_mask``), including never-written fill
values. Also: format-1 stores (numcodecs delta, string keys) still open.
"""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

import tinydistill as td
from tinydistill.store import SEED_SKIPPED, SEED_UNSET, decode_keys

from helpers import fill, unit_data

ts = pytest.importorskip("tensorstore")
xr = pytest.importorskip("xarray")

ARRAYS = {"gaps": ("logp", "index_gap", "seed", "key", "label", "complete"),
          "ids": ("logp", "index", "seed", "key", "label", "complete")}


@pytest.fixture(params=["gaps", "ids"])
def store(request, tmp_path):
    return make_store(tmp_path, request.param)


def make_store(tmp_path, layout):
    """Epoch 0 complete (two skipped views in shard 1), epoch 1 half written, keys of uneven
    length with non-ASCII characters."""
    n = 1000
    keys = [f"train/{'é' if i % 7 == 0 else 'n'}{i % 13}/img_{i}.JPEG" for i in range(n)]
    st = td.create_store(tmp_path / "r.zarr", num_classes=50, k=5, epochs=2, keys=keys,
                         labels=np.where(np.arange(n) % 11 == 0, -1, np.arange(n) % 50),
                         class_names=[f"class {c}" for c in range(50)], chunk_rows=128, shard_rows=256,
                         id_layout=layout)
    fill(st, epochs=[0])
    skipped = np.zeros(256, bool)
    skipped[[5, 77]] = True
    st.write_shard(0, 1, *unit_data(st, 0, 1), skipped=skipped)
    for s in (0, 2):
        st.write_shard(1, s, *unit_data(st, 1, s))
    return td.open_store(st.path)


def own_reads(st):
    """Every array as tinydistill reads it, in the on-disk layout (ids ascending within a row)."""
    logp = np.full(st.shape, np.nan, np.float32)
    ids = np.full(st.shape, -1, np.int64)
    seed = np.full((st.epochs, st.num_rows), SEED_UNSET, np.uint64)
    mask = st.complete_mask()
    for e in range(st.epochs):
        for s in np.nonzero(mask[e])[0]:
            rows = slice(*st.shard_bounds(int(s)))
            logp[e, rows], ids[e, rows] = st.topk(e, rows, order="stored")
            seed[e, rows] = st.seeds(e, rows)
    return {"logp": logp, "ids": ids, "seed": seed, "keys": st.keys, "labels": st.labels,
            "complete": mask.astype(np.uint8)}


def check_same(st, raw: dict):
    """raw: array name -> numpy array as another reader returned it."""
    own = own_reads(st)
    assert raw["logp"].dtype == np.float16
    np.testing.assert_array_equal(raw["logp"].astype(np.float32), own["logp"])  # NaN == NaN here
    if "index_gap" in raw:
        gaps = raw["index_gap"]
        assert gaps.dtype == np.int16
        ids = np.where((gaps < 0).any(-1, keepdims=True), -1, np.cumsum(gaps.astype(np.int64), -1))
    else:
        ids = raw["index"].astype(np.int64)
    np.testing.assert_array_equal(ids, own["ids"])
    np.testing.assert_array_equal(raw["seed"], own["seed"])
    assert (raw["seed"] == SEED_SKIPPED).sum() == 2 and (raw["seed"] == SEED_UNSET).sum() == 1000 - 512
    assert list(decode_keys(raw["key"])) == list(own["keys"])
    np.testing.assert_array_equal(raw["label"], own["labels"])
    np.testing.assert_array_equal(raw["complete"], own["complete"])
    assert own["complete"].sum() == 4 + 2


def test_tensorstore_reads_every_array(store):
    raw = {}
    for name in ARRAYS[store.id_layout]:
        t = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{store.path}/{name}/"}},
                    open=True, read=True).result()
        raw[name] = np.asarray(t.read().result())
        meta = json.loads((Path(store.path) / name / "zarr.json").read_text())
        assert tuple(t.domain.labels) == tuple(meta["dimension_names"])
    check_same(store, raw)


def test_xarray_opens_a_labelled_dataset(store):
    ds = xr.open_zarr(store.path, consolidated=False)
    idx = "index_gap" if store.id_layout == "gaps" else "index"
    assert ds["logp"].dims == ("epoch", "row", "slot") and ds[idx].dims == ("epoch", "row", "slot")
    assert ds["seed"].dims == ("epoch", "row") and ds["label"].dims == ("row",)
    assert ds["key"].dims == ("row", "key_byte") and ds["complete"].dims == ("epoch", "shard")
    assert ds.attrs["class_names"][3] == "class 3" and ds.attrs["tinydistill_format"] == 2
    check_same(store, {name: ds[name].values for name in ARRAYS[store.id_layout]})
    tree = xr.open_datatree(store.path, engine="zarr", consolidated=False)
    np.testing.assert_array_equal(tree["label"].values, store.labels)


def test_to_xarray_has_names_as_coordinates(store):
    ds = store.to_xarray(rows=slice(0, 600))
    assert list(ds["epoch"].values) == [0]  # epoch 1 has shard 1 unwritten
    assert ds["logp"].dims == ("epoch", "row", "rank")
    lp, ids = store.topk(0, slice(0, 600))
    np.testing.assert_array_equal(ds["logp"].values[0], lp)
    np.testing.assert_array_equal(ds["class_id"].values[0], ids)
    assert ds["class_name"].values[0, 0, 0] == f"class {ids[0, 0]}"
    assert not isinstance(ds["class_name"].values[0, 256 + 5, 0], str)  # a skipped view has no classes
    assert ds["key"].values[7] == store.keys[7] and ds["label_name"].values[1] == "class 1"
    assert not isinstance(ds["label_name"].values[0], str)  # label -1: unknown
    ds1 = store.to_xarray(rows=slice(0, 256))  # both epochs are complete there
    assert list(ds1["epoch"].values) == [0, 1]
    np.testing.assert_array_equal(ds1["seed"].values[1], store.seeds(1, slice(0, 256)))


# ---- format 1 ---------------------------------------------------------------------------------


def write_format1(path, st2):
    """The layout tinydistill 0.1 wrote (format 1): numcodecs delta on index and seed, string
    keys. Same values as the format-2 store ``st2``."""
    from zarr.codecs import BloscCodec, Crc32cCodec
    from zarr.codecs.numcodecs import Delta

    own = own_reads(st2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = zarr.open_group(str(path), mode="w-", zarr_format=3)
        comp = [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"), Crc32cCodec()]
        e, n, k = st2.shape
        opts = dict(chunks=(1, st2.chunk_rows, k), shards=(1, st2.shard_rows, k), compressors=comp)
        g.create_array("logp", shape=(e, n, k), dtype="float16", fill_value=np.nan, **opts)[:] = own["logp"]
        g.create_array("index", shape=(e, n, k), dtype="int16", fill_value=-1, filters=[Delta(dtype="int16")],
                       **opts)[:] = own["ids"]
        g.create_array("seed", shape=(e, n), dtype="uint64", chunks=(1, st2.chunk_rows), shards=(1, st2.shard_rows),
                       fill_value=SEED_UNSET, filters=[Delta(dtype="uint64")], compressors=comp)[:] = own["seed"]
        g.create_array("key", shape=(n,), dtype=str, chunks=(n,), compressors=comp)[:] = np.array(own["keys"], object)
        g.create_array("label", shape=(n,), dtype="int32", chunks=(n,), fill_value=-1, compressors=comp)[:] = own["labels"]
        g.create_array("complete", shape=own["complete"].shape, dtype="uint8", chunks=(1, 1), fill_value=0,
                       compressors=None)[:] = own["complete"]
        attrs = {a: v for a, v in st2.attrs.items() if a not in ("tinydistill_format", "id_layout")}
        g.attrs.update(attrs)
        g.attrs["tinydistill_format"] = 1


def test_format1_store_still_opens(tmp_path):
    store = make_store(tmp_path, "gaps")
    write_format1(tmp_path / "v1.zarr", store)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = td.open_store(tmp_path / "v1.zarr")
        got = own_reads(old)
    assert not [w for w in caught if "Numcodecs" in str(w.message)]  # opening format 1 is quiet
    assert old.format_version == 1 and old.info["format_version"] == 1
    for name, want in own_reads(store).items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    assert old.topk(0, "train/é0/img_0.JPEG", names=True)[2][0, 0].startswith("class ")


def test_import_does_not_silence_zarr_warnings():
    import tinydistill  # noqa: F401

    td.open_store  # noqa: B018
    silenced = [f for f in warnings.filters if f[1] is not None and "Numcodecs" in f[1].pattern]
    assert not silenced  # no process-wide filter: only the opening of a format-1 store is quiet
