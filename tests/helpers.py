"""Helpers the tests share (fixtures are in conftest.py). Also imported by name in spawned
child processes (:func:`write_units`)."""

import numpy as np
import torch

import tinydistill as td


def random_teacher(path, num_classes: int, name: str = "test_resnet") -> str:
    """A seeded random-init timm classifier's state_dict at ``path`` (for --teacher-weights)."""
    import timm

    torch.manual_seed(0)
    torch.save(timm.create_model(name, pretrained=False, num_classes=num_classes).state_dict(), path)
    return str(path)


def fake_topk(n, num_classes, k, seed):
    """Top-K log-probs (descending, fp32) and ids of a random peaky teacher."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, num_classes, generator=g) * 3
    logits[torch.arange(n), torch.randint(0, num_classes, (n,), generator=g)] += 6
    v, i = torch.log_softmax(logits, 1).topk(k, 1)
    return v.numpy(), i.numpy()


def unit_data(store, epoch, shard):
    """Deterministic contents of one (epoch, shard) unit, so any reader can check them."""
    a, b = store.shard_bounds(shard)
    logp, idx = fake_topk(b - a, store.num_classes, store.k, seed=1000 * epoch + shard)
    seed = np.arange(a, b, dtype=np.uint64) + np.uint64(epoch * store.num_rows)
    return logp, idx, seed


def fill(store, epochs=None):
    for e in range(store.epochs) if epochs is None else epochs:
        for s in range(store.num_shards):
            store.write_shard(e, s, *unit_data(store, e, s))


def per_view(batch) -> list[dict]:
    """A :class:`tinydistill.batch.Batch` as one dict per view (plain Python values, the image tensor)."""
    out = []
    for i in range(len(batch)):
        v = {k: int(getattr(batch, k)[i]) for k in ("epoch", "row", "seed", "label", "partner", "partner_label")}
        v.update(lam=float(batch.lam[i]), valid=bool(batch.valid[i]), image=batch.image[i])
        if batch.params is not None:
            v["params"] = batch.params[i]
        out.append(v)
    return out


def write_units(path, rank, world, barrier):
    st = td.open_store(path, mode="r+")
    barrier.wait()  # all writers start at once
    for e in range(st.epochs):
        for s in range(st.num_shards):
            if (e * st.num_shards + s) % world == rank:
                st.write_shard(e, s, *unit_data(st, e, s))
