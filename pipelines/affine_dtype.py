"""Does the affine op (Rotate, Shear*, Translate*) need float64? Renders every geometric op of
many drawn records in float64 (Pillow's arithmetic) and in float32 and counts the pixels that
differ. Cited in docs/render.md.

    python pipelines/affine_dtype.py --views 2000 --size 224
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from PIL import Image

from tinydistill import render_torch as rt
from tinydistill.augment import AugSpec
from tinydistill.params import _GEOMETRIC, Policy
from tinydistill.render_torch import ops


def _photos():
    from sklearn.datasets import load_sample_images

    china, flower = (Image.fromarray(a) for a in load_sample_images().images)
    return [china, flower, china.resize((320, 240)), flower.crop((50, 20, 400, 380))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--views", type=int, default=2000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--chunk", type=int, default=64)
    args = ap.parse_args()
    photos = _photos()
    frames_of = {i: rt.Frames.from_numpy(*rt.pack_numpy([np.asarray(p)])) for i, p in enumerate(photos)}
    jobs = []  # (photo, record, geometric op)
    for aa in ("rand-m9-mstd0.5-inc1", "original", "rand-m15-n3"):
        pol = Policy(AugSpec(img_size=args.size, auto_augment=aa))
        r = 0
        while sum(j[3] == aa for j in jobs) < args.views // 3 + 1:
            i = r % len(photos)
            p = pol.draw(7, 0, r, 1000 + 7919 * r, photos[i].size)
            jobs += [(i, p, o, aa) for o in p.ops if o.name in _GEOMETRIC]
            r += 1
    jobs = jobs[:args.views]
    differ = {"views": 0, "pixels": 0, "max_abs": 0.0}
    for lo in range(0, len(jobs), args.chunk):
        part = jobs[lo:lo + args.chunk]
        x = torch.cat([rt.crop_resize(frames_of[i], [p], args.size) for i, p, _, _ in part])
        got = {}
        for dt in (torch.float64, torch.float32):
            ops.AFFINE_DTYPE = dt
            got[dt] = ops._geometric(x, [o for _, _, o, _ in part])
        ops.AFFINE_DTYPE = torch.float64
        d = (got[torch.float64] != got[torch.float32])
        differ["views"] += int(d.flatten(1).any(1).sum())
        differ["pixels"] += int(d.sum())
        differ["max_abs"] = max(differ["max_abs"], float((got[torch.float64] - got[torch.float32]).abs().max()))
    print(json.dumps({"geometric_ops": len(jobs), "size": args.size, "ops_by_name": _names(jobs),
                      "float32_differs": differ, "pixels_total": len(jobs) * 3 * args.size ** 2}))


def _names(jobs):
    out: dict[str, int] = {}
    for _, _, o, _ in jobs:
        out[o.name] = out.get(o.name, 0) + 1
    return out


if __name__ == "__main__":
    main()
