"""Inspecting a store the way a notebook would: teacher outputs and the views the teacher saw.

Runnable as a script (each block is a notebook cell):

    python pipelines/notebook_example.py [STORE] [--data SRC] [--out views.png]

STORE defaults to the quickstart's store (run `tinydistill quickstart` or `make demo` first).
"""

import argparse

import numpy as np

import tinydistill as td

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("store", nargs="?", default="runs/quickstart/logits.zarr")
ap.add_argument("--data", default="digits", help="the SRC the store was made from")
ap.add_argument("--out", default="views.png")
args = ap.parse_args()

# --- open the store and look at what it holds
st = td.open_store(args.store)
info = st.info
print({k: info[k] for k in ("num_classes", "k", "epochs", "num_views", "bytes_per_view", "spec_hash")})
print("teacher:", info["teacher"]["name"], "| complete per epoch:", np.round(st.completed(), 3).tolist())

# --- top-K of a few views of epoch 0, with class names
logp, ids = st.topk(0, slice(0, 4))
for r in range(4):
    top = ", ".join(f"{st.class_names[c]}:{np.exp(lp):.3f}" for lp, c in zip(logp[r], ids[r]))
    print(f"row {r} key={st.keys[r]} label={st.class_names[st.labels[r]]} -> {top}")

# --- the dense target a student is trained against (TinyViT smoothing), at T=1 and T=4
d1, d4 = st.dense(0, 0), st.dense(0, 0, temperature=4.0)
print("dense row 0, T=1:", np.round(d1[0], 3).tolist())
print("dense row 0, T=4:", np.round(d4[0], 3).tolist())

# --- the views the teacher saw (same pixels as at gen-logits time), with its top-K beside each
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

rows = [0, 1, 2, 3]
fig, ax = plt.subplots(2, len(rows), figsize=(3 * len(rows), 5.5))
for j, r in enumerate(rows):
    v = st.view(epoch=1, row=r, data=args.data)  # checks data, spec and canary on first use
    ax[0, j].imshow(v.image.clamp(0, 1).permute(1, 2, 0).numpy())
    mixed = f"\nmixed with row {v.partner} (lam {v.lam:.2f})" if v.partner != v.row else ""
    ax[0, j].set_title(f"epoch 1, row {r}: {st.class_names[v.label]}{mixed}", fontsize=8)
    ax[0, j].axis("off")
    lp, ix = st.topk(1, r)
    ax[1, j].bar([st.class_names[c] for c in ix[0]], np.exp(lp[0]))
    ax[1, j].set_ylim(0, 1)
    ax[1, j].set_title("teacher top-K probability", fontsize=8)
fig.tight_layout()
fig.savefig(args.out, dpi=100)
print("wrote", args.out)
