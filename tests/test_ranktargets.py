"""Targets joined in a rank's main process: exact, and each store chunk read once per epoch."""

import numpy as np

from helpers import fill, unit_data
from tinydistill.batch import Batch
from tinydistill.ranktargets import RankTargets
from tinydistill.stream import ChunkTargets, epoch_order, train_items


def _batch(epoch, rows):
    n = len(rows)
    return Batch.of(epoch=[epoch] * n, row=rows, seed=rows, label=np.zeros(n), partner=rows,
                    partner_label=np.zeros(n), lam=np.ones(n), valid=np.ones(n, bool))


def test_join_is_exact_and_reads_each_chunk_once(small_store):
    fill(small_store)
    order = epoch_order(small_store.num_rows, 64, False, 0, 1, 0, 3)
    items = train_items(order, 1, 32)
    rt = RankTargets(small_store, items)
    for it in items:
        got = rt.join(_batch(it.epoch, it.rows))
        lp, ix = small_store.topk(1, it.rows, order="stored")
        np.testing.assert_array_equal(got.logp.numpy(), lp)
        np.testing.assert_array_equal(got.index.numpy(), ix)
        assert got.valid.all()
    rt.close()
    chunks = -(-small_store.num_rows // small_store.chunk_rows)
    assert rt.reads == chunks  # once per rank, whatever the DataLoader's worker count
    # what two workers joining their own items read: nearly every chunk each
    per_worker = [ChunkTargets(small_store, items[w::2]) for w in range(2)]
    for w, ct in enumerate(per_worker):
        for it in items[w::2]:
            ct.get(it.epoch, it.rows)
    assert sum(ct.reads for ct in per_worker) == 2 * chunks


def test_unwritten_rows_are_invalid(small_store):
    small_store.write_shard(0, 0, *unit_data(small_store, 0, 0), skipped=np.arange(256) == 5)
    rt = RankTargets(small_store, train_items(np.arange(256), 0, 16))
    got = rt.join(_batch(0, np.arange(16)))
    assert got.valid.tolist() == [i != 5 for i in range(16)]
    rt.close()


def test_chunk_with_a_skipped_view_is_read_without_a_store_wide_array(small_store, monkeypatch):
    """Reading a chunk that holds a skipped view works on the chunk's rows: no array of N rows."""
    small_store.write_shard(0, 0, *unit_data(small_store, 0, 0), skipped=np.arange(256) == 5)
    sizes = []
    real = np.arange
    monkeypatch.setattr(np, "arange", lambda *a, **kw: sizes.append(len(r := real(*a, **kw))) or r)
    got = small_store.targets(0, slice(0, small_store.chunk_rows))
    monkeypatch.undo()
    assert np.isnan(got["logp"][5]).all() and not np.isnan(got["logp"][4]).any()
    assert sizes and max(sizes) <= small_store.chunk_rows < small_store.num_rows
