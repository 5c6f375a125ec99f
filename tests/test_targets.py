import numpy as np
import pytest
import torch

from tinydistill.targets import dense_targets


def test_matches_tinyvit_formula():
    logp = torch.log(torch.tensor([[0.6, 0.2, 0.1], [0.5, 0.3, 0.05]]))
    index = torch.tensor([[4, 0, 7], [1, 2, 3]])
    out = dense_targets(logp, index, num_classes=10)
    # top-K keep their probability, the rest (1 - sum) / (C - K) goes to each other class
    row0 = np.full(10, 0.1 / 7); row0[[4, 0, 7]] = [0.6, 0.2, 0.1]
    row1 = np.full(10, 0.15 / 7); row1[[1, 2, 3]] = [0.5, 0.3, 0.05]
    np.testing.assert_allclose(out.numpy(), np.stack([row0, row1]), rtol=1e-6)
    np.testing.assert_allclose(out.sum(1).numpy(), 1.0, rtol=1e-6)


def test_fp16_sum_above_one_is_safe():
    # fp16 rounding pushes the top-K sum over 1: no negative rest, no NaN, rows sum to 1
    p = torch.tensor([[0.7, 0.3004, 0.0004]])
    out = dense_targets(p.log().half(), torch.tensor([[0, 1, 2]]), num_classes=5)
    assert torch.isfinite(out).all() and (out >= 0).all()
    assert out[0, 3:].sum() == 0
    assert out.sum().item() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(out[0, :3].numpy(), (p / p.sum()).numpy()[0], rtol=1e-3)
    out4 = dense_targets(p.log().half(), torch.tensor([[0, 1, 2]]), num_classes=5, temperature=4.0)
    assert torch.isfinite(out4).all() and out4.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_temperature_is_power_of_smoothed_distribution():
    logp = torch.log(torch.tensor([[0.9, 0.05]]))
    q = dense_targets(logp, torch.tensor([[2, 0]]), num_classes=4)
    for t in (0.5, 2.0, 4.0):
        qt = dense_targets(logp, torch.tensor([[2, 0]]), num_classes=4, temperature=t)
        want = q ** (1 / t)
        want = want / want.sum()
        torch.testing.assert_close(qt, want)
    flat = dense_targets(logp, torch.tensor([[2, 0]]), num_classes=4, temperature=4.0)
    assert flat.max() < q.max() and flat.min() > q.min()  # a higher T flattens
    with pytest.raises(ValueError):
        dense_targets(logp, torch.tensor([[2, 0]]), num_classes=4, temperature=0)


def test_k_equals_c_normalises():
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.19]]))  # sums to 0.99 after rounding errors
    out = dense_targets(logp, torch.tensor([[2, 0, 1]]), num_classes=3)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(out[0].numpy(), np.array([0.3, 0.19, 0.5]) / 0.99, rtol=1e-5)


def test_store_dense_matches_function(small_store):
    from helpers import fill
    import tinydistill as td
    fill(small_store, epochs=[0])
    st = td.open_store(small_store.path)
    lp, ix = st.topk(0, slice(0, 50), order="stored")
    d = st.dense(0, slice(0, 50), temperature=2.0)
    assert d.shape == (50, 50) and d.dtype == np.float32
    np.testing.assert_allclose(d.sum(1), 1.0, rtol=1e-5)
    want = dense_targets(torch.from_numpy(lp), torch.from_numpy(ix), 50, 2.0).numpy()
    np.testing.assert_allclose(d, want, rtol=1e-6)


def test_store_keeps_tail_mass_of_confident_rows(tmp_path):
    """fp16 rounding must not push a top-K sum to 1 when the teacher left mass for the others."""
    import tinydistill as td
    # find confident top-3 rows (of 5 classes) whose fp16 sum reaches 1 though the exact sum does not
    rng = np.random.default_rng(0)
    tail = 10.0 ** rng.uniform(-7, -3, size=(20000, 2))
    rest = 10.0 ** rng.uniform(-7, -4, size=(20000, 1))
    p = np.concatenate([1 - tail.sum(1, keepdims=True) - rest, tail], 1)
    hits = np.exp(np.log(p).astype(np.float16).astype(np.float64)).sum(1) >= 1
    assert hits.any()
    exact_lp = np.log(p[hits][:1])
    st = td.create_store(tmp_path / "t.zarr", num_classes=5, k=3, epochs=1, keys=["a"])
    st.write_shard(0, 0, exact_lp, [[0, 1, 2]], [0])
    d = td.open_store(st.path).dense(0, 0)[0]
    assert (d[3:] > 0).all() and d.sum() == pytest.approx(1.0, abs=1e-6)
    want = dense_targets(torch.from_numpy(exact_lp).float(), torch.tensor([[0, 1, 2]]), 5).numpy()[0]
    kl = float((want * np.log(want / d)).sum())
    assert 0 <= kl < 1e-6
