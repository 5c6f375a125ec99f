"""Benchmark: the torch renderer's host dispatch cost, in top-level aten ops and host time per view.

On a GPU every top-level aten op costs ~10-13 us of host time whatever its size, so the
renderer's host cost is its op count. This script counts them on the CPU with
``torch.profiler`` (:func:`tinydistill.opcount.count_aten_ops`) for TinyViT's recipe
(``rand-m9-mstd0.5-inc1``, mixup 0.8, cutmix 1.0, re_prob 0.25) and reports:

  A. 224 px views of 500x375 photo JPEGs (``benchlib.make_photo_folder``), at 64 and 256 views
     (``--sizes``):
       encoded   ``Views(src, spec, 0).encode(0, rows)`` then ``Views.render_encoded(raw, "cpu")``:
                 the view core's device side as views.py has it (skipped with the error when
                 views.py and the renderer disagree)
       renderer  what the device side costs when the worker ships a packed batch: images decoded
                 and packed on the "worker" (``pack_numpy``), erasing fills made there
                 (``erase_fill``); timed/counted: ``Frames.from_numpy`` (one copy), ``render_base``
                 and ``mix`` of every row with its partner (two ``index_select`` + ``mix``)
  B. the same on tiny images (40x30 JPEGs rendered to ``--tiny-px`` px, default 32) at 256 and
     1,024 views (``--tiny``): op counts and microseconds per view (wall time of the call, median
     of ``--repeat`` runs after a warm-up). On a CPU even 32 px is not compute-free (each op
     touches B x 3 x 32 x 32 floats); ``--tiny-px 4`` leaves less compute. "outside aten ops" is
     the wall time minus the time torch.profiler finds inside the top-level aten ops: the Python
     and numpy work a GPU's host thread keeps (median of ``--repeat`` runs); "est. GPU host" adds
     12 us per op for dispatch.

``--impl FILE`` runs another render_torch.py in place of the package's (e.g. a copy of the old
one, to compare); an implementation without ``pack`` gets lists of tensors and no erase arrays.

    OMP_NUM_THREADS=1 .venv/bin/python pipelines/bench_render_ops.py [--sizes 64,256] [--tiny 256,1024]
        [--tiny-px 32] [--repeat 3] [--data-dir DIR] [--impl FILE] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import aug_spec, make_photo_folder, recipe, write_json  # noqa: E402

DISPATCH_US = 12.0  # host time of one top-level aten op on a GPU (~10-13 us)


def load_impl(path: str | None):
    import tinydistill
    from tinydistill import render_torch

    if not path:
        return render_torch
    spec = importlib.util.spec_from_file_location("tinydistill.render_torch", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["tinydistill.render_torch"] = mod
    spec.loader.exec_module(mod)
    tinydistill.render_torch = mod
    return mod


def encode_here(views, rows: list[int]) -> dict:
    """The batch a worker would ship, made here from the stable parts of the view core (partners,
    ``Policy.draw``), so that the renderer can be measured whatever state views.py is in: JPEG
    bytes and records of every needed image once, each row's slot and its partner's (-1: unmixed)."""
    partner = views.partners(0, rows)
    need = sorted(set(rows) | set(partner.values()))
    partner.update(views.partners(0, [q for q in need if q not in partner]))
    data, params, slot_of = [], [], {}
    for r, item, src_size in views.source.read_encoded(need):
        slot_of[r] = len(data)
        data.append(item)
        params.append(views.policy.draw(views.base_seed, 0, r, views.seed(0, r), src_size, partner[r]))
    slot = np.array([slot_of[r] for r in rows], np.int64)
    pslot = np.array([slot_of[params[s].partner] if params[s].mix != "none" else -1 for s in slot], np.int64)
    return {"data": data, "params": params, "slot": slot, "pslot": pslot}


def worker_side(rt, raw, size):
    """What a CPU worker would ship: decoded, packed images and the erasing fills (new API), or
    decoded tensors (old API)."""
    from PIL import Image

    arrays = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in raw["data"]]
    params = raw["params"]
    if not hasattr(rt, "pack_numpy"):
        return {"images": [torch.from_numpy(a.copy()).permute(2, 0, 1).contiguous() for a in arrays]}
    fills = [rt.erase_fill(p, size) for p in params]
    css = 3 * size * size
    idx = np.concatenate([f[0] + i * css for i, f in enumerate(fills)])
    val = np.concatenate([f[1] for f in fills])
    return {"packed": rt.pack_numpy(arrays), "erase": (idx, val)}


def device_side(rt, shipped, raw, size, device="cpu"):  # noqa: D401
    """The device's work for one shipped batch: move, render, mix every row with its partner."""
    params = raw["params"]
    if "packed" in shipped:
        frames = rt.Frames.from_numpy(*shipped["packed"], device=device)
        base = rt.render_base(frames, params, size, erase=shipped["erase"])
    else:
        base = rt.render_base(shipped["images"], params, size)
    slot, pslot = raw["slot"], raw["pslot"]
    sel = torch.from_numpy(np.concatenate([slot, np.where(pslot >= 0, pslot, slot)])).to(base.device)
    both = base.index_select(0, sel)
    n = len(slot)
    return rt.mix(both[:n], both[n:], [params[s] for s in slot])


def measure(rt, views, n: int, repeat: int, timed: bool) -> dict:
    from tinydistill.opcount import count_aten_ops

    rows = list(range(n))
    size = views.spec.img_size
    raw = encode_here(views, rows)
    out = {"views": n, "images": len(raw["data"])}
    shipped = worker_side(rt, raw, size)
    fns = {"renderer": lambda: device_side(rt, shipped, raw, size)}
    try:  # the view core as it is now (views.py may lag behind or lead render_torch)
        enc = views.encode(0, rows)
        fns["encoded"] = lambda: views.render_encoded(enc, "cpu")
    except Exception as e:  # noqa: BLE001
        out["encoded_error"] = f"{type(e).__name__}: {e}"
    for name, fn in fns.items():
        try:
            out[f"{name}_ops"], _ = count_aten_ops(fn)
        except Exception as e:  # noqa: BLE001
            out[f"{name}_error"] = f"{type(e).__name__}: {e}"
            continue
        if timed:
            fn()
            ts = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            out[f"{name}_us_per_view"] = statistics.median(ts) / n * 1e6
            out[f"{name}_python_us_per_view"] = statistics.median(python_share(fn) for _ in range(repeat)) / n * 1e6
            out[f"{name}_gpu_host_us_per_view"] = out[f"{name}_python_us_per_view"] + DISPATCH_US * out[f"{name}_ops"] / n
    return out


def python_share(fn) -> float:
    """Seconds of one call of ``fn`` spent outside its top-level aten ops (torch.profiler): the
    Python and numpy work a GPU's host thread keeps, to which dispatch adds ~10-13 us per op."""
    from tinydistill.opcount import time_outside_aten_ops

    return time_outside_aten_ops(fn)[0]


def line(r: dict, px: int) -> str:
    n = r["views"]
    s = f"{px:3d} px {n:5d} views:"
    for name in ("renderer", "encoded"):
        label = {"renderer": "renderer (packed)", "encoded": "Views.render_encoded"}[name]
        if f"{name}_ops" in r:
            s += f"\n    {label:22s} {r[name + '_ops']:6d} ops ({r[name + '_ops'] / n:5.1f}/view)"
            if f"{name}_us_per_view" in r:
                s += (f" {r[name + '_us_per_view']:7.1f} us/view wall, {r[name + '_python_us_per_view']:6.1f} us/view "
                      f"outside aten ops, est. GPU host {r[name + '_gpu_host_us_per_view']:6.1f} us/view")
        else:
            s += f"\n    {label:22s} {r.get(name + '_error', 'n/a')[:80]}"
    return s


def tiny_folder(root: Path, n: int) -> None:
    from PIL import Image

    from benchlib import photo_jpeg

    if (root / "done").exists():
        return
    for i in range(n):
        d = root / f"class{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        img = Image.open(io.BytesIO(photo_jpeg(0, i, (160, 120)))).resize((40, 30), Image.BICUBIC)
        img.save(d / f"{i:05d}.jpg", quality=90)
    (root / "done").touch()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="64,256", help="view counts at 224 px (500x375 JPEGs); '' to skip")
    ap.add_argument("--tiny", default="256,1024", help="view counts on 40x30 JPEGs at 32 px; '' to skip")
    ap.add_argument("--tiny-px", type=int, default=32, help="output size of the tiny views")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--data-dir", default=None, help="keeps the generated JPEG folders between runs")
    ap.add_argument("--impl", default=None, help="another render_torch.py to measure in place of the package's")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    rt = load_impl(a.impl)
    from tinydistill.sources import open_source
    from tinydistill.views import Views

    root = Path(a.data_dir) if a.data_dir else Path(tempfile.mkdtemp(prefix="bench_render_ops_"))
    results = {"impl": a.impl or "tinydistill/render_torch.py", "photo": [], "tiny": []}
    sizes = [int(s) for s in a.sizes.split(",") if s]
    if sizes:
        make_photo_folder(root / "photo", max(sizes), classes=10, procs=1)
        views = Views(open_source(str(root / "photo")), aug_spec(recipe(img_size=224, renderer="torch")), 0)
        for n in sizes:
            r = measure(rt, views, n, a.repeat, timed=False)
            results["photo"].append(r)
            print(line(r, 224), flush=True)
    tiny = [int(s) for s in a.tiny.split(",") if s]
    if tiny:
        tiny_folder(root / "tiny", max(tiny))
        views = Views(open_source(str(root / "tiny")), aug_spec(recipe(img_size=a.tiny_px, renderer="torch")), 0)
        for n in tiny:
            r = measure(rt, views, n, a.repeat, timed=True)
            results["tiny"].append(r)
            print(line(r, a.tiny_px), flush=True)
    if a.out:
        write_json(a.out, results)


if __name__ == "__main__":
    main()
