"""Benchmark: what the logit store costs on disk, what it loses, and how fast blocks read back.

Everything goes through the real store API (``create_store`` + ``write_shard``, then
``open_store``), with the store's own codecs, into a temporary directory. Measured in one run:

  1. Size. Bytes on disk per view for (C=1000, K=10) and (C=21841, K=100): the per-view arrays
     ``logp`` + ``index_gap`` (or ``index`` with ``--id-layout ids``) + ``seed`` (sum of their
     shard files, shard indexes included), each
     one separately, and the whole store (plus ``key``, ``label``, ``complete`` and the zarr.json
     documents) divided by the number of views. Compared with TinyViT's raw record of 4K+4 bytes
     per view (int32 seed + K int16 ids + K fp16 probabilities): the ratio ours / TinyViT.
     Seeds are the project's counter, ``tinydistill.seeds.encode_seed(epoch, row, N)``.
  2. Fidelity. Per view, KL(p || q) where p = ``dense_targets`` of the exact fp32 top-K
     log-probabilities and ids (rank order, as the teacher gives them), and q = ``dense_targets``
     of what ``store.topk`` returns (same TinyViT smoothing on both sides), at T=1 and T=4, over
     the first ``--kl-views`` views; mean, p99 and max, summed in float64. Both dense rows are
     uniform outside the view's K ids, so the sum runs over the K id columns plus (C-K) times
     one other column (checked against the full C-column sum). Also reported: views whose
     fp16 top-K sum rounds above 1, so that q gives the other C-K classes nothing where p gives
     them something (KL is infinite there; "tail lost", with the largest mass lost), the KL over
     the other views, and a float32 floor: the KL between ``dense_targets`` of the same fp32
     values given in rank order and in id order.
  3. Reads. Views/s of ``store.topk(epoch, slice(...))`` over a whole chunk (4096 rows) and a
     whole shard, with ``order="stored"`` and ``order="desc"``, against single random rows
     (``store.topk(epoch, int)``), and the ratio block / single. Variants take turns within each
     round (the order rotates), so drift on a shared machine hits all of them alike; figures are
     medians over rounds, ratios are per-round ratios. Files are in the page cache (local disk,
     warm): this is decode cost, not disk or network latency.

Simulated teachers (no model or data set is downloaded). Classes are the leaves of a random
tree (2-12 children per node, uneven sizes) of about WordNet's depth. A view of a sample of
class c gets logits ``A * exp(-d(c, j) / tau) + sigma * noise``, where d is the number of tree
levels from c up to its common ancestor with class j (0 for c itself): the teacher hesitates
between siblings and cousins, not between random classes. ``tau`` varies per view (lognormal),
which gives confident and unsure views; 30 % of the views also show a second object (a random
class at 30-90 % of the first one's strength), as mixup/cutmix views and busy photos do.
``log_softmax`` then ``topk(K)`` in fp32, in batches, with fixed seeds. Two id layouts of the
same outputs:

  clustered    ids in depth-first order of the tree (ImageNet's WordNet-id order puts groups of
               similar classes next to each other, e.g. the 118 dog breeds), with 10 % of the
               classes moved to random ids, as WordNet's order is not a perfect depth-first walk;
  unclustered  the worst case: ids are a random permutation, so confusable classes are far apart.

Values are identical in both layouts, so fidelity is measured on the clustered stores.

``--encodings`` adds a comparison of on-disk encodings of the same clustered outputs (written
with zarr directly into memory, same chunks and shards): format 1's numcodecs delta filter,
spec-only codecs with ids, gaps, rank order, transposed chunks and bitshuffle. It reports
bytes per view of logp + ids for each; only the store's own encoding goes through the store. Store
order is a random permutation of samples (as tinydistill's sources use), so a chunk holds many
classes. Defaults: 65,536 views per case (2 epochs x 32,768 rows), chunks of 4096 rows, shards
of 4 chunks (16,384 rows). About 1-3 minutes on 2 shared CPU cores. No timing is asserted.

    .venv/bin/python pipelines/bench_store.py [--views N] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import tinydistill as td
from tinydistill.seeds import encode_seed
from tinydistill import open_store
from tinydistill.store import create_store
from tinydistill.targets import dense_targets

# (name, C, K, median tau): tau is tuned so that the mean top-1 probability lands where a strong
# teacher's does (IN-1k teacher ~0.7-0.8; CLIP ViT-L/14 on IN-22k ~0.4-0.6)
CASES = [("C=1000 K=10", 1000, 10, 3.0), ("C=21841 K=100", 21841, 100, 6.0)]
A = 18.0  # logit gap between the class shown and unrelated classes
SIGMA = 1.5  # per-class logit noise
TAU_SD = 0.6  # sd of log(tau) across views
P_SECOND = 0.3  # fraction of views that also show a second object


def tinyvit_bytes(k: int) -> int:
    return 4 * k + 4  # int32 seed + K int16 ids + K fp16 probabilities, raw


# ---- simulated teacher ----------------------------------------------------------------------


class Teacher:
    """Classes as leaves of a random tree, numbered depth-first ("semantic" positions)."""

    def __init__(self, num_classes: int, tau: float, seed: int, displaced: float, sigma: float = SIGMA):
        rng = np.random.default_rng(seed)
        c = num_classes
        lo, hi = [np.zeros(c, np.int64)], [np.full(c, c, np.int64)]
        depth = np.zeros(c, np.int64)
        bounds, level = [(0, c)], 0
        while any(b - a > 1 for a, b in bounds):
            level += 1
            new = []
            for a, b in bounds:
                n = b - a
                if n == 1:
                    new.append((a, b))
                    continue
                k = int(min(n, rng.integers(2, 13)))
                cuts = np.round(np.cumsum(rng.dirichlet(np.full(k, 2.0)))[:-1] * n).astype(int)
                edges = [0, *np.unique(np.clip(cuts, 1, n - 1)).tolist(), n]
                new += [(a + edges[i], a + edges[i + 1]) for i in range(len(edges) - 1)]
            bounds = new
            lo_l, hi_l = np.empty(c, np.int64), np.empty(c, np.int64)
            for a, b in bounds:
                lo_l[a:b], hi_l[a:b] = a, b
                if b - a == 1 and depth[a] == 0:
                    depth[a] = level
            lo.append(lo_l)
            hi.append(hi_l)
        self.num_classes = c
        self.tau = tau
        self.sigma = sigma
        self.lo, self.hi = torch.from_numpy(np.stack(lo)), torch.from_numpy(np.stack(hi))
        self.depth = torch.from_numpy(depth)
        self.max_depth = len(lo) - 1
        # id layouts: semantic position -> class id
        clustered = np.arange(c)
        moved = rng.choice(c, size=int(round(displaced * c)), replace=False)
        clustered[moved] = rng.permutation(moved)
        self.ids = {"clustered": torch.from_numpy(clustered),
                    "unclustered": torch.from_numpy(rng.permutation(c))}

    def _add_signal(self, diff: torch.Tensor, cls: torch.Tensor, amp: torch.Tensor, tau: torch.Tensor) -> None:
        """Add amp * exp(-d(cls, j) / tau) to the difference array ``diff`` [B, C+1] (its
        cumsum over classes is the signal): each ancestor level of cls adds its share of the
        kernel over its interval of ids, O(B * depth) here and one O(B * C) cumsum after."""
        d = self.depth[cls][:, None]
        levels = torch.arange(self.max_depth + 1)[None]
        kern = lambda x: torch.exp(-x.clamp_min(0) / tau)  # noqa: E731
        w = kern(d - levels) - kern(d - levels + 1)  # level L adds its share of the kernel
        w = torch.where((levels >= 1) & (levels <= d), w, torch.zeros(())) * amp
        diff.scatter_add_(1, self.lo[:, cls].T.contiguous(), w)
        diff.scatter_add_(1, self.hi[:, cls].T.contiguous(), -w)

    def topk(self, cls: torch.Tensor, k: int, gen: torch.Generator):
        """fp32 top-K log-probs [B, K] and semantic positions [B, K] of views of classes cls."""
        b = cls.shape[0]
        tau = self.tau * torch.exp(TAU_SD * torch.randn(b, 1, generator=gen))
        noise = torch.randn(b, self.num_classes, generator=gen)
        second = torch.randint(0, self.num_classes, (b,), generator=gen)
        strength = torch.empty(b, 1).uniform_(0.3, 0.9, generator=gen)
        has = (torch.rand(b, 1, generator=gen) < P_SECOND).float()
        diff = torch.zeros(b, self.num_classes + 1)
        self._add_signal(diff, cls, torch.full((b, 1), A), tau)
        self._add_signal(diff, second, A * strength * has, tau)
        z = diff.cumsum(1)[:, : self.num_classes]
        z.add_(noise, alpha=self.sigma)
        return torch.log_softmax(z, 1).topk(k, 1)


# ---- the three measurements -----------------------------------------------------------------


def write_case(root: Path, name: str, c: int, k: int, tau: float, args) -> dict:
    teacher = Teacher(c, tau, seed=args.seed, displaced=args.displaced, sigma=args.sigma)
    rows = args.views // args.epochs
    rng = np.random.default_rng(args.seed + 1)
    sem_labels = rng.integers(0, c, rows)  # store order: a random permutation of samples
    offsets = np.sort(rng.choice(10**8, size=c, replace=False))
    wnids = [f"n{o:08d}" for o in offsets]  # class names like ImageNet's WordNet ids
    gen = torch.Generator().manual_seed(args.seed)
    stores = {}
    for layout, ids in teacher.ids.items():
        labels = ids[torch.from_numpy(sem_labels)].numpy()
        keys = [f"train/{wnids[y]}/{wnids[y]}_{r}.JPEG" for r, y in enumerate(labels)]
        stores[layout] = create_store(
            root / f"{c}-{layout}.zarr", num_classes=c, k=k, epochs=args.epochs, keys=keys,
            labels=labels, class_names=wnids, chunk_rows=args.chunk_rows,
            shard_rows=args.chunk_rows * args.shard_chunks, id_layout=args.id_layout)
    st0 = stores["clustered"]
    ref_logp = np.empty((args.epochs, rows, k), np.float32)  # exact fp32 top-K, clustered ids
    ref_index = np.empty((args.epochs, rows, k), np.int64)
    top1, mass = [], []
    t_gen = t_write = 0.0
    for e in range(args.epochs):
        for s in range(st0.num_shards):
            a, b = st0.shard_bounds(s)
            t0 = time.perf_counter()
            vals, pos = [], []
            for lo in range(a, b, args.batch):
                hi = min(lo + args.batch, b)
                v, p = teacher.topk(torch.from_numpy(sem_labels[lo:hi]), k, gen)
                vals.append(v)
                pos.append(p)
            v, p = torch.cat(vals), torch.cat(pos)
            pr = v.exp()
            top1.append(pr[:, 0].double().sum().item())
            mass.append(pr.sum(1).double().sum().item())
            seed = encode_seed(e, np.arange(a, b), rows)
            t_gen += time.perf_counter() - t0
            for layout, st in stores.items():
                index = teacher.ids[layout][p].numpy()
                t0 = time.perf_counter()
                st.write_shard(e, s, v.numpy(), index, seed)
                t_write += time.perf_counter() - t0
                if layout == "clustered":
                    ref_logp[e, a:b], ref_index[e, a:b] = v.numpy(), index
    n_views = args.epochs * rows
    out = {"name": name, "num_classes": c, "k": k, "views": n_views, "epochs": args.epochs,
           "rows": rows, "chunk_rows": args.chunk_rows, "shard_rows": st0.shard_rows,
           "tau": tau, "mean_top1": sum(top1) / n_views, "mean_topk_mass": sum(mass) / n_views,
           "tinyvit_bytes_per_view": tinyvit_bytes(k), "generate_s": t_gen, "write_s": t_write}
    for layout, st in stores.items():
        nbytes = open_store(st.path).bytes_on_disk()
        per_view = {a: nbytes.get(a, 0) / n_views for a in ("logp", "index", "seed")}
        per_view["index"] += nbytes.get("index_gap", 0) / n_views  # the ids, in either layout
        arrays = sum(per_view.values())
        total = sum(nbytes.values()) / n_views
        out[layout] = {"bytes_by_array": nbytes, "per_view": per_view, "arrays_per_view": arrays,
                       "store_per_view": total, "ratio_vs_tinyvit": arrays / tinyvit_bytes(k),
                       "store_ratio_vs_tinyvit": total / tinyvit_bytes(k),
                       "key_label_per_sample": (nbytes.get("key", 0) + nbytes.get("label", 0)) / rows}
    out["_paths"] = {layout: st.path for layout, st in stores.items()}
    out["_ref"] = (ref_logp, ref_index)
    return out


def _xlogy_ratio(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """p * log(p / q) elementwise: 0 where p = 0, inf where q = 0 < p."""
    return torch.where(p > 0, p * (p.log() - q.log()), torch.zeros((), dtype=p.dtype))


def fidelity(case: dict, args) -> dict:
    """KL(dense(fp32 top-K) || dense(store)) per view, both sides from ``dense_targets``.

    Both dense rows are uniform outside the view's K ids (the ids read back equal the fp32
    top-K ids, checked), so the KL is summed exactly in float64 over the K id columns plus
    (C - K) times one column outside them, instead of over all C columns."""
    st = open_store(case["_paths"]["clustered"])
    ref_logp, ref_index = case["_ref"]
    c, k = case["num_classes"], case["k"]
    n_kl = min(args.kl_views, st.epochs * st.num_rows)
    rows = [(e, a, min(a + args.kl_batch, st.num_rows, a + n_kl - e * st.num_rows))
            for e in range(st.epochs) for a in range(0, st.num_rows, args.kl_batch)
            if e * st.num_rows + a < n_kl]
    res = {"views": n_kl}
    same_ids = []
    max_dlogp = 0.0
    for t in args.temperatures:
        kls, floors, lost, lost_mass = [], [], [], []
        for e, a, b in rows:
            lp, ix = st.topk(e, slice(a, b), order="stored")
            rl, ri = ref_logp[e, a:b], ref_index[e, a:b]  # rank order, as the teacher gives it
            o = np.argsort(ri, axis=1, kind="stable")  # the store keeps ids ascending
            si, sl = np.take_along_axis(ri, o, 1), np.take_along_axis(rl, o, 1)
            if t == args.temperatures[0]:
                same_ids.append((ix == si).all(1))
                max_dlogp = max(max_dlogp, float(np.abs(lp - sl).max()))
            p = dense_targets(torch.from_numpy(rl), torch.from_numpy(ri), c, t)
            q = dense_targets(torch.from_numpy(lp), torch.from_numpy(ix), c, t)
            # the fp32 floor: the same exact values summed in id order instead of rank order
            f = dense_targets(torch.from_numpy(sl), torch.from_numpy(si), c, t)
            cols = torch.from_numpy(si)
            free = None
            if k < c:  # one column outside the K ids: the first id not in the row
                free = torch.ones(b - a, c, dtype=torch.bool).scatter_(1, cols, False).float().argmax(1, keepdim=True)

            def kl_of(p, q):
                kl = _xlogy_ratio(p.gather(1, cols).double(), q.gather(1, cols).double()).sum(1)
                if free is None:
                    return kl, None, None
                pr, qr = p.gather(1, free).double()[:, 0], q.gather(1, free).double()[:, 0]
                gone = (qr == 0) & (pr > 0)  # the smoothed tail vanished: stored top-K sum > 1
                return kl + (c - k) * _xlogy_ratio(pr, qr), gone, torch.where(gone, (c - k) * pr, 0.0)

            kl, gone, mass = kl_of(p, q)
            kls.append(kl)
            floors.append(kl_of(p, f)[0])
            if gone is not None:
                lost.append(gone)
                lost_mass.append(mass)
        kl = torch.cat(kls)
        finite = kl[torch.isfinite(kl)]
        floor = torch.cat(floors)
        r = {"mean": kl.mean().item(), "max": kl.max().item(),
             "mean_finite": finite.mean().item(), "max_finite": finite.max().item(),
             "p99_finite": torch.quantile(finite.float(), 0.99).item(),
             "fp32_floor_mean": floor.mean().item(), "fp32_floor_max": floor.max().item()}
        if lost:
            gone, mass = torch.cat(lost), torch.cat(lost_mass)
            r["tail_lost_frac"] = gone.double().mean().item()
            r["tail_lost_mass_max"] = mass.max().item()
        res[f"T={t:g}"] = r
    res["max_abs_dlogp"] = max_dlogp
    res["rows_with_same_ids"] = float(np.concatenate(same_ids).mean())
    return res


def reads(case: dict, args) -> dict:
    st = open_store(case["_paths"]["clustered"])
    rng = np.random.default_rng(args.seed + 2)
    n_chunks = st.num_rows // st.chunk_rows
    variants = ["chunk stored", "chunk desc", "shard stored", "shard desc", "single row"]
    for e in range(st.epochs):  # warm: page cache, zarr metadata, the completeness mask
        st.topk(e, slice(*st.shard_bounds(0)))
    rates = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            gc.collect()
            e = int(rng.integers(st.epochs))
            if v == "single row":
                picks = rng.integers(0, st.num_rows, args.singles)
                t0 = time.perf_counter()
                for row in picks:
                    st.topk(e, int(row))
                rates[v].append(args.singles / (time.perf_counter() - t0))
                continue
            mode = v.split()[1]
            if v.startswith("chunk"):
                n = 0
                t0 = time.perf_counter()
                for _ in range(args.chunk_reads):
                    a = int(rng.integers(n_chunks)) * st.chunk_rows
                    n += st.topk(e, slice(a, a + st.chunk_rows), order=mode)[0].shape[0]
            else:
                a, b = st.shard_bounds(int(rng.integers(st.num_shards)))
                t0 = time.perf_counter()
                n = st.topk(e, slice(a, b), order=mode)[0].shape[0]
            rates[v].append(n / (time.perf_counter() - t0))
    single = rates["single row"]
    out = {}
    for v in variants:
        ratios = [x / y for x, y in zip(rates[v], single)]
        out[v] = {"views_per_s": statistics.median(rates[v]), "min": min(rates[v]), "max": max(rates[v]),
                  "ratio_vs_single": statistics.median(ratios), "ratio_min": min(ratios),
                  "ratio_max": max(ratios)}
    return out


def encodings(case: dict, args) -> dict:
    """Bytes per view of logp + ids of the clustered outputs under alternative encodings.

    The values are what the store holds (fp16 log-probs after the tail-mass rule, read back
    with ``topk(order="stored")``), written with zarr into memory with the store's chunks and
    shards; each variant is read back and checked equal to what was written."""
    import warnings

    import zarr
    from zarr.codecs import BloscCodec, Crc32cCodec, TransposeCodec

    st = open_store(case["_paths"]["clustered"])
    lp = np.concatenate([st.topk(e, slice(None), order="stored")[0] for e in range(st.epochs)]).astype(np.float16)
    ids = np.concatenate([st.topk(e, slice(None), order="stored")[1] for e in range(st.epochs)])
    dt = "int16" if st.num_classes <= 32768 else "int32"
    gaps = np.diff(ids, axis=1, prepend=0)
    rank = np.argsort(-lp.astype(np.float32), axis=1, kind="stable")
    n, k = lp.shape

    def nbytes(values, dtype, shuffle="shuffle", filters=None, transpose=False):
        mem = zarr.storage.MemoryStore()
        kw = {"filters": filters} if filters else {}
        if transpose:
            kw["serializer"] = "auto"
            kw["filters"] = [TransposeCodec(order=(1, 0))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numcodecs' delta is outside the spec: zarr says so
            a = zarr.create_array(mem, shape=values.shape, dtype=dtype, chunks=(st.chunk_rows, k),
                                  shards=(st.shard_rows, k), fill_value=0,
                                  compressors=[BloscCodec(cname="zstd", clevel=5, shuffle=shuffle), Crc32cCodec()],
                                  **kw)
            a[:] = values
            assert np.array_equal(a[:], values.astype(dtype))
        return sum(len(v.to_bytes()) for key, v in mem._store_dict.items() if not key.endswith("zarr.json")) / n

    from zarr.codecs.numcodecs import Delta

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        delta = [Delta(dtype=dt)]
    lp_id, lp_rank = nbytes(lp, "float16"), nbytes(np.take_along_axis(lp, rank, 1), "float16")
    rows = {
        "format 1: ids + numcodecs delta (not spec)": (lp_id, nbytes(ids, dt, filters=delta)),
        "spec: ids ascending (id_layout ids)": (lp_id, nbytes(ids, dt)),
        "spec: gaps ascending (id_layout gaps)": (lp_id, nbytes(gaps, dt)),
        "spec: ids in rank order": (lp_rank, nbytes(np.take_along_axis(ids, rank, 1), dt)),
        "spec: gaps, transposed chunks": (nbytes(lp, "float16", transpose=True), nbytes(gaps, dt, transpose=True)),
        "spec: gaps, bitshuffle": (nbytes(lp, "float16", shuffle="bitshuffle"), nbytes(gaps, dt, shuffle="bitshuffle")),
    }
    return {name: {"logp": a, "ids": b, "total": a + b} for name, (a, b) in rows.items()}


# ---- report -------------------------------------------------------------------------------------


def report_encodings(cases: list[dict]) -> None:
    print("\n== 4. Encodings of the same clustered outputs: bytes per view (logp + ids, no seed) ==")
    print(f"{'case':<15} {'encoding':<44} {'logp':>7} {'ids':>7} {'total':>7} {'/TinyViT':>8}")
    for c in cases:
        for name, r in c.get("encodings", {}).items():
            print(f"{c['name']:<15} {name:<44} {r['logp']:>7.2f} {r['ids']:>7.2f} {r['total']:>7.2f}"
                  f" {r['total'] / c['tinyvit_bytes_per_view']:>7.3f}x")


def fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def report(cases: list[dict]) -> None:
    print("\n== 1. Bytes on disk per view (logp + index + seed; TinyViT raw = 4K+4) ==")
    print(f"{'case':<15} {'teacher ids':<12} {'top-1':>6} {'top-K':>6} {'logp':>7} {'index':>7} {'seed':>6}"
          f" {'arrays':>7} {'TinyViT':>7} {'ratio':>6} {'store':>7} {'ratio':>6}")
    for c in cases:
        for layout in ("clustered", "unclustered"):
            s = c[layout]
            pv = s["per_view"]
            print(f"{c['name']:<15} {layout:<12} {c['mean_top1']:>6.3f} {c['mean_topk_mass']:>6.3f}"
                  f" {pv['logp']:>7.2f} {pv['index']:>7.2f} {pv['seed']:>6.3f} {s['arrays_per_view']:>7.2f}"
                  f" {c['tinyvit_bytes_per_view']:>7d} {s['ratio_vs_tinyvit']:>5.3f}x"
                  f" {s['store_per_view']:>7.2f} {s['store_ratio_vs_tinyvit']:>5.3f}x")
    print("  top-1 / top-K: mean top-1 probability and mean top-K mass of the simulated teacher.")
    print("  arrays: logp+index+seed per view, ratio = arrays / TinyViT. store: every file of the store")
    c0 = cases[0]
    print(f"  (keys, labels, class names, markers) / views, with {c0['epochs']} epochs; keys+labels cost"
          + "".join(f" {c['clustered']['key_label_per_sample']:.1f} B per sample ({c['name']})" for c in cases)
          + ", spread over all epochs.")
    print("  target: arrays <= 0.6x TinyViT")

    print("\n== 2. Fidelity: KL(dense(fp32 top-K) || dense(store)) per view, TinyViT smoothing ==")
    print(f"{'case':<15} {'T':>3} {'views':>6} {'mean KL':>9} {'max KL':>9} {'tail lost':>9} {'lost mass':>9}"
          f" {'mean KL*':>9} {'p99 KL*':>9} {'max KL*':>9} {'floor':>9}")
    for c in cases:
        f = c["fidelity"]
        for t, kl in f.items():
            if not t.startswith("T="):
                continue
            print(f"{c['name']:<15} {t[2:]:>3} {f['views']:>6} {kl['mean']:>9.2e} {kl['max']:>9.2e}"
                  f" {100 * kl.get('tail_lost_frac', 0):>8.2f}% {kl.get('tail_lost_mass_max', 0):>9.2e}"
                  f" {kl['mean_finite']:>9.2e} {kl['p99_finite']:>9.2e} {kl['max_finite']:>9.2e}"
                  f" {kl['fp32_floor_mean']:>9.2e}")
        print(f"{'':<15} ids read back = fp32 top-K ids in {100 * f['rows_with_same_ids']:.1f}% of rows;"
              f" max |log-prob - fp32| = {f['max_abs_dlogp']:.2e}")
    print("  tail lost: views whose fp16 top-K sum rounds above 1, so dense_targets gives the other C-K")
    print("  classes 0 where the fp32 targets give them (lost mass, at most) > 0: KL is inf there.")
    print("  KL*: over the other views (finite KL). floor: mean KL between dense_targets of the same fp32")
    print("  values given in rank order and in id order (float32 rounding inside dense_targets).")
    print("  target: mean KL <= 1e-6 at T=1")

    print("\n== 3. Read throughput (views/s, median over rounds [min-max]; ratio = block / single row) ==")
    print(f"{'case':<15} {'read':<13} {'views/s':>9} {'range':>17} {'x single':>9} {'range':>15}")
    for c in cases:
        for v, r in c["reads"].items():
            print(f"{c['name']:<15} {v:<13} {fmt_rate(r['views_per_s']):>9} "
                  f"{'[' + fmt_rate(r['min']) + '-' + fmt_rate(r['max']) + ']':>17} {r['ratio_vs_single']:>8.0f}x"
                  f" {'[%.0f-%.0f]' % (r['ratio_min'], r['ratio_max']):>15}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--views", type=int, default=65536, help="views per case (split over --epochs)")
    ap.add_argument("--epochs", type=int, default=2, help="store epochs (seed counter runs over them)")
    ap.add_argument("--chunk-rows", type=int, default=4096)
    ap.add_argument("--shard-chunks", type=int, default=4, help="chunks per shard")
    ap.add_argument("--cases", default="1000,21841", help="which of C=1000 / C=21841 to run")
    ap.add_argument("--displaced", type=float, default=0.1,
                    help="fraction of classes moved to random ids in the clustered layout")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 4.0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the read comparison")
    ap.add_argument("--singles", type=int, default=100, help="single-row reads per round")
    ap.add_argument("--chunk-reads", type=int, default=4, help="chunk reads per round")
    ap.add_argument("--batch", type=int, default=2048, help="teacher simulation batch")
    ap.add_argument("--kl-views", type=int, default=16384, help="views per case in the KL figures")
    ap.add_argument("--kl-batch", type=int, default=1024, help="rows per dense_targets batch")
    ap.add_argument("--sigma", type=float, default=SIGMA, help="per-class logit noise of the teacher")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--id-layout", choices=["gaps", "ids"], default="gaps",
                    help="how the stores keep class ids: per-row gaps (default) or the ids themselves")
    ap.add_argument("--encodings", action="store_true",
                    help="also compare alternative on-disk encodings of the clustered outputs")
    ap.add_argument("--out", help="write the figures to this JSON file")
    args = ap.parse_args(argv)
    rows = args.views // args.epochs
    if rows < args.chunk_rows:
        ap.error(f"--views {args.views} gives {rows} rows per epoch, fewer than a chunk ({args.chunk_rows})")
    return args


def header(args) -> None:
    import zarr

    rows = args.views // args.epochs
    print(f"bench_store: tinydistill {td.__version__}, zarr {zarr.__version__}, torch {torch.__version__}, "
          f"numpy {np.__version__}, {os.cpu_count()} CPUs, {args.views} views per case "
          f"({args.epochs} epochs x {rows} rows), chunk {args.chunk_rows} rows, shard "
          f"{args.chunk_rows * args.shard_chunks} rows", flush=True)
    print(f"teacher simulation: A={A}, sigma={args.sigma}, tau " + ", ".join(f"{t:g} ({n})" for n, _, _, t in CASES)
          + f" with log-sd {TAU_SD}, {100 * P_SECOND:.0f}% of views with a second object, "
          f"{100 * args.displaced:.0f}% of classes displaced in the clustered layout, seed {args.seed}", flush=True)


def run_cases(args) -> list[dict]:
    """Each case wanted: its stores written, then fidelity, reads and (--encodings) encodings."""
    wanted = {int(x) for x in args.cases.split(",")}
    cases = []
    with tempfile.TemporaryDirectory(prefix="bench_store_") as tmp:
        for name, c, k, tau in CASES:
            if c not in wanted:
                continue
            t0 = time.perf_counter()
            case = write_case(Path(tmp), name, c, k, tau, args)
            print(f"  {name}: simulated {case['views']} views in {case['generate_s']:.1f}s, wrote 2 stores in "
                  f"{case['write_s']:.1f}s", flush=True)
            case["fidelity"] = fidelity(case, args)
            print(f"  {name}: fidelity done ({time.perf_counter() - t0:.0f}s)", flush=True)
            case["reads"] = reads(case, args)
            print(f"  {name}: reads done ({time.perf_counter() - t0:.0f}s)", flush=True)
            if args.encodings:
                case["encodings"] = encodings(case, args)
                print(f"  {name}: encodings done ({time.perf_counter() - t0:.0f}s)", flush=True)
            del case["_ref"], case["_paths"]
            cases.append(case)
            gc.collect()
    return cases


def write_doc(args, cases: list[dict], elapsed: float) -> None:
    import zarr

    doc = {"date": datetime.date.today().isoformat(), "machine": {
               "cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
           "versions": {"tinydistill": td.__version__, "zarr": zarr.__version__, "torch": torch.__version__,
                        "numpy": np.__version__},
           "args": vars(args),
           "simulation": {"A": A, "sigma": args.sigma, "tau": {n: t for n, _, _, t in CASES},
                          "tau_sd": TAU_SD, "p_second": P_SECOND, "displaced": args.displaced},
           "cases": cases, "elapsed_s": elapsed}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(f"figures written to {args.out}")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    header(args)
    t_start = time.perf_counter()
    cases = run_cases(args)
    report(cases)
    if args.encodings:
        report_encodings(cases)
    elapsed = time.perf_counter() - t_start
    print(f"\ntotal {elapsed:.0f}s")
    if args.out:
        write_doc(args, cases, elapsed)


if __name__ == "__main__":
    main()
