import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import tinydistill as td
from tinydistill.errors import CorruptStoreError, IncompleteError

from helpers import fill, unit_data

HERE = Path(__file__).parent


def _check_unit(st, e, s):
    logp, idx, seed = unit_data(st, e, s)
    a, b = st.shard_bounds(s)
    lp, ix = st.topk(e, slice(a, b), order="stored")
    o = np.argsort(idx, 1)
    np.testing.assert_array_equal(ix, np.take_along_axis(idx, o, 1))
    np.testing.assert_allclose(lp, np.take_along_axis(logp, o, 1), rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(st.seeds(e, slice(a, b)), seed)


@pytest.mark.slow
def test_four_spawned_writers_lose_nothing(tmp_path):
    path = str(tmp_path / "multi.zarr")
    td.create_store(path, num_classes=30, k=4, epochs=3, keys=[f"k{i}" for i in range(1000)],
                         chunk_rows=64, shard_rows=128)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(4)
    from helpers import write_units
    procs = [ctx.Process(target=write_units, args=(path, r, 4, barrier)) for r in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    r = td.open_store(path)
    assert r.completed().tolist() == [1.0, 1.0, 1.0]
    for e in range(3):
        for s in range(r.num_shards):
            _check_unit(r, e, s)


CHILD = """
import sys, time, pathlib, zarr
sys.path.insert(0, {here!r})
import tinydistill as td
from tinydistill.store import LogitStore
from helpers import unit_data
point, flag = {point!r}, pathlib.Path({flag!r})
st = td.open_store({path!r}, mode="r+")
def stall():
    flag.write_text("x")
    time.sleep(600)
if point == "between-arrays":   # logp written, index not yet
    orig, calls = zarr.Array.__setitem__, []
    def setitem(self, key, value):
        calls.append(1)
        if len(calls) == 2:
            stall()
        return orig(self, key, value)
    zarr.Array.__setitem__ = setitem
elif point == "before-marker":  # all data written and fsynced, marker not yet
    LogitStore._fsync = lambda self, keys: stall()
st.write_shard(0, 1, *unit_data(st, 0, 1))
"""


@pytest.mark.parametrize("point,rewrite", [("between-arrays", False), ("before-marker", False),
                                           ("between-arrays", True)])
def test_writer_killed_mid_shard_leaves_it_incomplete(small_store, tmp_path, point, rewrite):
    fill(small_store, epochs=[0])
    if not rewrite:  # start from a store where shard 1 was never written
        small_store = td.create_store(small_store.path, num_classes=50, k=5, epochs=2,
                                      keys=list(small_store.keys), chunk_rows=128, shard_rows=256,
                                      overwrite=True)
        small_store.write_shard(0, 0, *unit_data(small_store, 0, 0))
    flag = tmp_path / f"flag-{point}"
    code = CHILD.format(here=str(HERE), point=point, flag=str(flag), path=str(small_store.path))
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)])
    deadline = time.time() + 120
    while not flag.exists():
        assert child.poll() is None, "writer exited before reaching the kill point"
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    st = td.open_store(small_store.path)
    assert not st.is_complete(0, 1)
    done_before = 1000 if rewrite else 256  # all of epoch 0, or shard 0 only
    assert st.completed()[0] == pytest.approx((done_before - 256 * rewrite) / 1000)
    with pytest.raises(IncompleteError):
        st.topk(0, 300)
    _check_unit(st, 0, 0)  # the neighbour is untouched
    # resuming rewrites the unit whole and marks it complete
    w = td.open_store(small_store.path, mode="r+")
    w.write_shard(0, 1, *unit_data(w, 0, 1))
    _check_unit(td.open_store(small_store.path), 0, 1)


def test_flipped_bytes_are_detected(small_store):
    fill(small_store, epochs=[0])
    for array in ("logp", "index_gap"):
        f = Path(small_store.path) / array / "c" / "0" / "2" / "0"
        b = bytearray(f.read_bytes())
        b[len(b) // 3] ^= 0x10
        f.write_bytes(bytes(b))
    st = td.open_store(small_store.path)
    with pytest.raises(CorruptStoreError, match="checksum"):
        st.topk(0, slice(512, 768))
    _check_unit(st, 0, 1)  # other shards still read
    bad = st.check()
    assert [(e, s) for e, s, _ in bad] == [(0, 2)]


def test_truncated_and_deleted_shards_are_detected(small_store):
    fill(small_store, epochs=[0])
    f = Path(small_store.path) / "index_gap" / "c" / "0" / "1" / "0"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    (Path(small_store.path) / "logp" / "c" / "0" / "3" / "0").unlink()
    (Path(small_store.path) / "seed" / "c" / "0" / "0").unlink()
    st = td.open_store(small_store.path)
    with pytest.raises(CorruptStoreError):
        st.topk(0, 300)
    with pytest.raises(CorruptStoreError, match="hold no data"):
        st.topk(0, 900)
    with pytest.raises(CorruptStoreError, match="seeds"):
        st.seeds(0, 5)
    assert sorted((e, s) for e, s, _ in st.check()) == [(0, 0), (0, 1), (0, 3)]
