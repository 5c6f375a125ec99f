"""Inspecting a store the way a notebook would: teacher outputs, tables and the views the teacher saw.

Runnable as a script (each block is a notebook cell):

    python pipelines/notebook_example.py [STORE] [--data SRC] [--out views.png]

STORE defaults to the quickstart's store (run `tinydistill quickstart` or `make demo` first).
Needs pandas, xarray and matplotlib: pip install 'tinydistill[notebook]'.
"""

import argparse
import time

import numpy as np

import tinydistill as td

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("store", nargs="?", default="runs/quickstart/logits.zarr")
ap.add_argument("--data", default="digits", help="the SRC the store was made from")
ap.add_argument("--out", default="views.png")
args = ap.parse_args()

# --- open the store and look at what it holds (numpy + zarr only: no torch yet)
st = td.open_store(args.store)
print(st)
print("rows:", len(st), "shape (epochs, rows, K):", st.shape)
info = st.info
print({k: info[k] for k in ("num_classes", "k", "epochs", "num_views", "bytes_per_view", "spec_hash", "format_version")})
print("teacher:", info["teacher"]["name"], "| complete per epoch:", np.round(st.completed(), 3).tolist())

# --- top-K of a few views of epoch 0, with class names
logp, ids, names = st.topk(0, slice(0, 4), names=True)
for r in range(4):
    top = ", ".join(f"{n}:{np.exp(lp):.3f}" for lp, n in zip(logp[r], names[r]))
    print(f"row {r} key={st.keys[r]} label={st.class_names[st.labels[r]]} -> {top}")

# --- lookups: by key, by boolean mask
key = st.keys[10]
print(f"row of {key!r}:", st.row_of(key), "| its top-1:", st.topk(0, key, names=True)[2][0, 0])
mask = st.labels == st.labels[0]
lp, _ = st.topk(0, mask)
print(f"{mask.sum()} views of class {st.class_names[st.labels[0]]} in epoch 0, mean top-1 prob {np.exp(lp[:, 0]).mean():.3f}")

# --- pandas: one line per (view, rank)
df = st.to_pandas(0, slice(0, 200), k=3)
print(df.head(6).to_string())
top1 = df[df["rank"] == 0]
print("teacher top-1 wrong on", int((top1["class_id"] != top1["label"]).sum()), "of", len(top1), "views")
print(top1.groupby("label_name")["prob"].mean().round(3).to_dict())

# --- xarray: dims (epoch, row, rank), names as coordinates
ds = st.to_xarray(rows=slice(0, 200))
print(ds)
print("mean top-1 probability per epoch:", ds.prob.sel(rank=0).mean("row").round(3).values.tolist())

# --- the dense target a student is trained against (TinyViT smoothing), at T=1 and T=4
d1, d4 = st.dense(0, 0), st.dense(0, 0, temperature=4.0)
print("dense row 0, T=1:", np.round(d1[0], 3).tolist())
print("dense row 0, T=4:", np.round(d4[0], 3).tolist())

# --- the views the teacher saw (same pixels as at gen-logits time), with its top-K beside each
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import timm  # noqa: F401,E402  (imported once here, so the view timing below is the view itself)

t0 = time.perf_counter()
v = st.view(epoch=1, row=0, data=args.data)  # checks data, spec and canary on first use
print(f"first view in {time.perf_counter() - t0:.2f}s:", repr(v))
png = v._repr_png_()  # what Jupyter shows for `v`
print("its picture:", len(png), "bytes of PNG")

rows = [0, 1, 2, 3]
fig, ax = plt.subplots(2, len(rows), figsize=(3 * len(rows), 5.5))
for j, r in enumerate(rows):
    v = st.view(epoch=1, row=r, data=args.data)
    ax[0, j].imshow(v.image.clamp(0, 1).permute(1, 2, 0).numpy())
    mixed = f"\nmixed with row {v.partner} (lam {v.lam:.2f})" if v.partner != v.row else ""
    ax[0, j].set_title(f"epoch 1, row {r}: {st.class_names[v.label]}{mixed}", fontsize=8)
    ax[0, j].axis("off")
    lp, ix, nm = st.topk(1, r, names=True)
    ax[1, j].bar(nm[0], np.exp(lp[0]))
    ax[1, j].set_ylim(0, 1)
    ax[1, j].set_title("teacher top-K probability", fontsize=8)
fig.tight_layout()
fig.savefig(args.out, dpi=100)
print("wrote", args.out)
