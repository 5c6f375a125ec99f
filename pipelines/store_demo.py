"""Store demo: a real teacher's top-K outputs on real data, written to a store and inspected.

What it does, on the UCI handwritten digits that scikit-learn ships (1,797 8x8 images):
  1. trains a small CNN teacher on a fixed 80 % split (a few seconds on a CPU),
  2. writes its top-K log-probabilities for every image into a logit store, one (epoch, shard)
     unit at a time, as gen-logits will,
  3. reads the store back, checks it against the teacher's fp32 outputs (ids exact, largest
     |delta log-prob| from fp16), and runs ``tinydistill inspect --plot`` on it.

Views are the un-augmented images here; replayable augmentation comes with the views module.

    python pipelines/store_demo.py --out runs/demo [--k 5] [--epochs 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

import tinydistill as td


def teacher_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo", help="directory for the store and the plot")
    ap.add_argument("--k", type=int, default=5, help="classes kept per view")
    ap.add_argument("--epochs", type=int, default=2, help="store epochs to fill")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    perm = np.random.default_rng(args.seed).permutation(len(y))  # store order: not class-sorted
    n_train = int(0.8 * len(y))
    train, val = perm[:n_train], perm[n_train:]

    t0 = time.time()
    net = teacher_net()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    for _ in range(15):
        for b in torch.randperm(n_train).split(64):
            loss = nn.functional.cross_entropy(net(x[train[b]]), y[train[b]])
            opt.zero_grad(), loss.backward(), opt.step()
    net.eval()
    with torch.inference_mode():
        acc = (net(x[val]).argmax(1) == y[val]).float().mean().item()
    print(f"teacher: small CNN, val top-1 {100 * acc:.1f}% after {time.time() - t0:.1f}s")

    keys = [f"digits/{i:04d}" for i in perm]
    st = td.create_store(
        out / "logits.zarr", num_classes=10, k=args.k, epochs=args.epochs, keys=keys,
        labels=y[perm].numpy(), class_names=[str(c) for c in range(10)],
        teacher={"name": "demo-cnn", "input_size": [1, 8, 8]}, augmentation={"views": "identity"},
        base_seed=args.seed, chunk_rows=256, shard_rows=512, overwrite=True,
    )
    ref = {}
    with torch.inference_mode():
        for e in range(args.epochs):
            for s in range(st.num_shards):
                a, b = st.shard_bounds(s)
                logp, idx = torch.log_softmax(net(x[perm[a:b]]), 1).topk(args.k, 1)
                st.write_shard(e, s, logp.numpy(), idx.numpy(), np.arange(a, b) + e * st.num_rows)
                ref[e, s] = (logp.numpy(), idx.numpy())

    rd = td.open_store(st.path)
    worst, ids_ok = 0.0, True
    for (e, s), (logp, idx) in ref.items():
        got_lp, got_ix = rd.topk(e, slice(*rd.shard_bounds(s)))
        ids_ok &= bool((np.sort(got_ix, 1) == np.sort(idx, 1)).all())
        worst = max(worst, float(np.abs(np.sort(got_lp, 1) - np.sort(logp, 1)).max()))
    print(f"round trip: ids {'exact' if ids_ok else 'DIFFER'}, largest |delta log-prob| {worst:.2e} (fp16)")
    if not ids_ok:
        sys.exit("round trip failed")
    plot = out / "inspect.png"
    subprocess.run([sys.executable, "-m", "tinydistill", "inspect", str(st.path), "--plot", str(plot)], check=True)


if __name__ == "__main__":
    main()
