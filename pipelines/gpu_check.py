"""GPU acceptance check: both stages end to end on one GPU, against the GPU renderer's targets.

One call, at most 8 minutes on an H100/H200 with 16 cores:

    python pipelines/gpu_check.py [--device cuda|cpu] [--smoke] [--out FILE.json]
    make gpu-check ARGS="--device cpu --smoke"

What runs, in this order (each stage's failure names the command and shows its stderr tail;
later stages that need it are skipped; the script then exits 1):

  data             8,192 ImageNet-like 500x375 photo JPEGs (benchlib.make_photo_folder, a
                   process pool; kept in --data-dir for the next run).
  teacher weights  `clip-vit-l14` (timm vit_large_patch14_clip_224) with random weights and a
                   21,841-class head (TinyViT's IN-22k teacher), saved for --teacher-weights.
  recipe           configs/tinyvit_in22k.yaml with only what must change: the data, the epochs,
                   the weights file; batch sizes, workers and the store path removed so the
                   CLI defaults apply (chunk sizes are not in it); --smoke also shrinks the view
                   size and swaps in a tiny teacher; on cpu, --amp none. Passed as --config.
  teacher forward  the project's Teacher.topk (load_teacher(...).place(device, amp)), eager, eager
                   with the attention maps of --attention-grid G (G = the patch grid; the hooks
                   run in every forward) and compiled (place(..., compile=True)), timed by
                   benchlib.forward_ceiling on device
                   tensors shaped like
                   gen-logits' batches ([64, 3, 224, 224] views in [0, 1]), K=100, timed with
                   cuda syncs: the ceiling gen-logits would reach if views were free.
  student step     timm create_model + create_optimizer_v2 AdamW + a soft-target CE step loop
                   on random device tensors, train-student's batch size and AMP: the ceiling
                   of training.
  gen-logits       `tinydistill gen-logits --config RECIPE --compile` (4 epochs of views, K=100;
                   the target compares it with the compiled forward; --gen-eager drops --compile).
  verify           `tinydistill verify STORE` (64 random views re-run, compiled like the store: exact).
  train offline    `tinydistill train-student --config RECIPE --logits STORE` (deit_tiny_patch16_224),
  train no-kd      ... `--no-kd --like STORE` (the same views and batches, labels only),
  train online     ... `--online-teacher clip-vit-l14 --teacher-weights W --like STORE --k 100`.
  ops per view     top-level aten ops of Views.render_encoded on one render unit (1,024 views)
                   of the recipe's views (tinydistill.opcount.count_aten_ops), per view.
  device path      in this process, on 2 x --render-rows of the photos plus a truncated
                   JPEG (good header, cut body) and a CMYK JPEG: gen-logits (1 epoch, --skip-bad,
                   --decode device: the JPEG bytes decoded in the main process) then
                   train-student offline from that store, under
                   torch.cuda.set_sync_debug_mode("warn"): host syncs per step of each loop and
                   per render unit go to the JSON (`syncs_per_step`, `syncs_per_unit`; on the CPU
                   the copies counted by render_torch.UPLOADS stand in). The truncated JPEG must
                   be skipped and counted once, the CMYK one rendered.
  cuda:1           with two GPUs or more: gen-logits (1 epoch) and verify on --device cuda:1.

--compile needs a C compiler and Python's headers (triton builds its launcher, inductor its
C++); when either is missing the check says so in one line, runs the compiled stages eager,
and records which ran in the JSON (`compile`).

Rates of the commands are steady-state, read from their progress bars: gen-logits from a
quarter of its views on, train-student over the epochs after the first, each from its first
step, so set-up (imports, model builds, compiling, worker start) is not in them; whole-loop
and whole-command figures are in the JSON too. While each command runs, threads sample the
whole machine: CPU time every 0.1 s (/proc/stat) and GPU utilisation every 0.5 s
(nvidia-smi); both are averaged over the same steady windows.

The table's targets are the GPU renderer's, for one H100/H200; they are judged with --device
cuda only (status n/a on cpu). Exit status: 0 all stages ran and every target was met; 1 a
stage failed; 2 every stage ran but a target was missed.

--smoke shrinks sizes only (512 images, 64 px views, teacher timm `test_vit`, 2 epochs, render
unit 128), never skips a stage: `--device cpu --smoke` runs on 2 CPU cores in a few minutes,
so the script cannot rot between GPU runs.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

from benchlib import (CliError, MachineSampler, bench_parser, environment, forward_ceiling, last_json, loadavg, make_photo_folder,
                      measure_rate, placed_teacher, run_cli_timed, save_random_model, sync, write_json)

ROOT = Path(__file__).resolve().parent.parent
PRESETS = {  # sizes only: --smoke runs every stage of the full check, smaller
    "full": dict(images=8192, teacher="clip-vit-l14", teacher_classes=21841, img_size=None, epochs=4,
                 student="deit_tiny_patch16_224", render_rows=1024, min_s=5.0),
    "smoke": dict(images=512, teacher="test_vit", teacher_classes=1000, img_size=64, epochs=2,
                  student="deit_tiny_patch16_224", render_rows=128, min_s=2.0),
}
MODES = ("offline", "no-kd", "online")
# the GPU renderer's targets on one H100/H200: key -> (comparison, value)
TARGETS = {"gen_vs_compiled": (">=", 0.9), "offline_img_s": (">=", 6300.0), "offline_vs_no_kd": (">=", 0.97),
           "offline_vs_online": (">=", 3.0), "cores_per_gpu": ("<=", 4.0), "ops_per_view": ("<=", 10.0),
           "wall_s": ("<=", 8 * 60.0)}


# ---- progress bars -----------------------------------------------------------------------------

_BAR = re.compile(r"^\s*(?P<desc>.*?):\s+\d+%\|[^|]*\|\s*(?P<n>[\d.]+)(?P<nu>[kMGT]?)/(?P<tot>[\d.]+)(?P<tu>[kMGT]?)"
                  r"\s*\[")
_SCALE = {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def progress(lines: list[tuple[float, str]]) -> dict[str, list[tuple[float, float, float]]]:
    """The tqdm updates in a command's stderr lines, per bar (its description), in order:
    [(arrival time, count, total)]."""
    bars: dict[str, list[tuple[float, float, float]]] = {}
    for t, text in lines:
        m = _BAR.match(text)
        if m:
            n, total = float(m["n"]) * _SCALE[m["nu"]], float(m["tot"]) * _SCALE[m["tu"]]
            bars.setdefault(m["desc"].strip(), []).append((t, n, total))
    return bars


def steady_rate(bars: dict, skip_first: bool = False, start_frac: float = 0.0,
                min_s: float = 0.5) -> tuple[float | None, list]:
    """Units/s over the bars' steady windows, and the windows; (None, []) when they span less
    than ``min_s`` seconds. A bar's window ends at the last line showing its final count (tqdm
    repeats it when the loop reads the device back and when the bar closes, so device work
    queued ahead is inside). It starts at the first update past ``start_frac`` of the bar
    (gen-logits: 0.25, so the views workers queued while the first batch waited for the
    teacher's set-up are drained first) or, with 0, at the first update after finished units,
    which must be the bar's first step or come within its first 10 % (the loop cannot have
    queued far ahead of the device yet). With ``skip_first`` the first bar (the first epoch:
    warm-up) is left out."""
    dn = dt = 0.0
    windows = []
    for pts in list(bars.values())[1 if skip_first and len(bars) > 1 else 0:]:
        pos = [p for p in pts if p[1] > 0 and p[1] >= start_frac * p[2]]
        counts = sorted({p[1] for p in pos})
        if not pos or (not start_frac and pos[0][1] > max(min([b - a for a, b in zip(counts, counts[1:])]
                                                               + counts[:1]), 0.1 * pos[0][2])):
            continue
        n0, n1 = pos[0][1], counts[-1]
        t0 = pos[0][0]
        t1 = max(p[0] for p in pos if p[1] == n1)
        if n1 > n0 and t1 > t0:
            dn, dt = dn + n1 - n0, dt + t1 - t0
            windows.append((t0, t1))
    return (dn / dt, windows) if dt >= min_s else (None, [])


# ---- the run -----------------------------------------------------------------------------------

def compile_missing() -> str | None:
    """Why torch.compile cannot build on this machine, or None: triton compiles its launcher
    (and inductor its C++) with a C compiler ($CC, else cc / gcc / clang on PATH) against
    Python's headers (Python.h)."""
    cc = os.environ.get("CC")
    names = [cc] if cc else ["cc", "gcc", "clang"]
    if not any(shutil.which(n) for n in names):
        return f"no C compiler ({', '.join(names)}) on PATH"
    inc = sysconfig.get_paths().get("include") or ""
    if not (Path(inc) / "Python.h").exists():
        return f"no Python headers ({Path(inc) / 'Python.h'} missing)"
    return None


class Check:
    """The run's options, paths and results; :meth:`stage` runs one stage and records it."""

    def __init__(self, args):
        self.args, self.t_start = args, time.perf_counter()
        self.cuda = args.device.startswith("cuda")
        self.work = Path(args.work_dir or tempfile.mkdtemp(prefix="tinydistill-gpu-check-")).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.data = str(Path(args.data_dir or f"/tmp/tinydistill-bench/photos-{args.images}").resolve())
        self.store, self.recipe = str(self.work / "store.zarr"), str(self.work / "recipe.yaml")
        self.weights: str | None = None
        self.ok: set[str] = set()
        self.res: dict = {"args": vars(args), "stages": {}}
        why = None if args.gen_eager else compile_missing()
        self.compile = not args.gen_eager and why is None
        self.res["compile"] = {"requested": not args.gen_eager, "ran": "compiled" if self.compile else "eager",
                               "why": why}
        if why:
            print(f"compile: {why}; triton cannot build its launcher, so the compiled stages run eager", flush=True)

    def stage(self, name: str, fn, *a, needs: tuple[str, ...] = ()) -> None:
        missing = [n for n in needs if n not in self.ok]
        if missing:
            print(f"\n== {name}: skipped (needs {', '.join(missing)})", flush=True)
            self.res["stages"][name] = {"ok": False, "skipped": f"needs {', '.join(missing)}"}
            return
        print(f"\n== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            fn(self, *a)
        except (Exception, SystemExit) as e:  # any stage: record it, show it, go on with those that can run
            why = str(e) if isinstance(e, CliError) else "".join(traceback.format_exception(e)[-12:]).rstrip()
            print(f"FAILED: {name}:\n{why}", file=sys.stderr, flush=True)
            self.res["stages"][name] = {"ok": False, "seconds": round(time.perf_counter() - t0, 1), "error": why}
            return
        self.ok.add(name)
        self.res["stages"][name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"   {name}: {time.perf_counter() - t0:.1f} s", flush=True)

    def cli(self, label: str, args: list[str]) -> tuple[dict, MachineSampler]:
        print("   $ python -m tinydistill " + " ".join(args), flush=True)
        first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
        with MachineSampler(gpu=self.cuda, gpu_index=int(first) if first.isdigit() else 0) as m:
            r = run_cli_timed(args, label=label, timeout_s=self.args.stage_timeout)
        return r, m

    def recipe_values(self, command: str) -> dict:
        """What the command reads from the recipe (tinydistill.options.load_recipe), CLI defaults filled in."""
        from tinydistill.config import GenConfig, TrainConfig
        from tinydistill.options import load_recipe

        cls = GenConfig if command == "gen-logits" else TrainConfig
        vals = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        return {**vals, **load_recipe(self.recipe, command)}

    def amp(self, command: str) -> str:
        return self.recipe_values(command).get("amp") or ("bf16" if self.cuda else "none")


def make_data(c: Check) -> None:
    info = make_photo_folder(c.data, c.args.images, classes=100, size=(500, 375))
    print(f"   {c.data}: {info['images']} JPEGs, {info.get('mean_kb', 0):.1f} KB on average"
          + (" (kept from an earlier run)" if info.get("cached") else f", made in {info.get('seconds')} s"))
    c.res["data"] = {"path": c.data, **info}


def make_teacher_weights(c: Check) -> None:
    from tinydistill.teachers import resolve_name

    name = resolve_name(c.args.teacher)[1]
    path = Path(c.data).parent / f"teacher-{name}-{c.args.teacher_classes}c-seed0.pth"
    if not path.exists():  # kept next to the data, for the next run
        tmp = path.with_suffix(".tmp")
        params = save_random_model(name, c.args.teacher_classes, tmp, seed=0)
        os.replace(tmp, path)
        print(f"   {path}: {name}, {params / 1e6:.1f} M parameters, random init")
    c.weights = str(path)
    c.res["teacher"] = {"name": c.args.teacher, "timm_model": name, "classes": c.args.teacher_classes,
                        "weights": c.weights}


def write_recipe(c: Check) -> None:
    """The recipe with only what must change for this run (printed and kept in the JSON)."""
    import yaml

    raw = yaml.safe_load(Path(c.args.recipe).read_text())
    changed: dict[str, object] = {}

    def put(section, key, value):  # value None: remove the key, so the CLI default applies
        d, where = (raw.setdefault(section, {}), f"{section}.{key}") if section else (raw, key)
        if value is None and key in d:
            del d[key]
            changed[where] = "(removed: CLI default)"
        elif value is not None and d.get(key) != value:
            d[key] = changed[where] = value

    put(None, "data", c.data)
    put(None, "epochs", c.args.epochs)
    put(None, "workers", None)
    if c.args.img_size:
        put("augmentation", "img_size", c.args.img_size)
    for sec in ("gen_logits", "train_student"):
        put(sec, "out", None)
        put(sec, "batch_size", None)
        if not c.cuda:
            put(sec, "amp", "none")
    put("gen_logits", "teacher", c.args.teacher)
    put("gen_logits", "teacher_weights", c.weights)
    put("train_student", "logits", None)  # given per mode: the baselines take none
    put("train_student", "student", c.args.student)
    Path(c.recipe).write_text(yaml.safe_dump(raw, sort_keys=False))
    for k, v in changed.items():
        print(f"   {k}: {v}")
    c.res["recipe"] = {"from": str(c.args.recipe), "file": c.recipe, "changed": changed}


def _rate(r: dict, batch: int) -> dict:
    """A :func:`benchlib.measure_rate` result as this check records it: items/s, calls, batch, wall and first call."""
    return {"per_s": r["views_per_s"], "calls": r["calls"], "batch": batch, "wall_s": round(r["wall_s"], 2),
            "first_call_s": round(r["first_call_s"], 2)}


def teacher_forward(c: Check) -> None:
    import torch

    g, dev = c.recipe_values("gen-logits"), torch.device(c.args.device)
    size = c.args.img_size or g.get("img_size", 224)
    teacher = placed_teacher(c.args.teacher, c.weights, dev, c.amp("gen-logits"))
    x = torch.rand(g["batch_size"], 3, size, size, device=dev)
    out = {"batch": g["batch_size"], "view_size": size, "teacher_input": teacher.input_size, "k": g["k"],
           "amp": c.amp("gen-logits")}
    grid = getattr(getattr(teacher.model, "patch_embed", None), "grid_size", (7,))[0]  # --attention-grid G
    out["attention_grid"] = int(grid)
    for mode in ("eager", "eager_maps", "compiled") if c.compile else ("eager", "eager_maps"):
        if mode != "eager":  # eager, then with its attention maps kept (hooks), then compiled in place
            teacher.place(dev, c.amp("gen-logits"), compile=mode == "compiled",
                          attention_grid=grid if mode == "eager_maps" else 0)
        r = forward_ceiling(teacher, [x], g["k"], min_s=c.args.min_s, warm=3, chunk=5, copy_back=False)
        out[mode] = _rate(r, g["batch_size"])
        print(f"   {mode}: {out[mode]['per_s']:.0f} views/s (first call {out[mode]['first_call_s']} s)")
    c.res["teacher_forward"] = out
    del teacher, x
    _free(dev)


def student_step(c: Check) -> None:
    import timm
    import torch
    from timm.optim import create_optimizer_v2

    from tinydistill.dist import amp_dtype

    t, dev = c.recipe_values("train-student"), torch.device(c.args.device)
    size, classes, batch = c.args.img_size or t.get("img_size", 224), c.args.teacher_classes, t["batch_size"]
    torch.manual_seed(0)
    model = timm.create_model(c.args.student, pretrained=False, num_classes=classes, img_size=size,
                              drop_path_rate=t.get("drop_path") or 0.0).to(dev).train()
    opt = create_optimizer_v2(model, opt=t["opt"], lr=t["lr"], weight_decay=t["weight_decay"])
    x = torch.rand(batch, 3, size, size, device=dev)
    target = torch.softmax(torch.randn(batch, classes, device=dev), dim=-1)
    dt = amp_dtype(c.amp("train-student"))

    def step():
        with torch.autocast(dev.type, dtype=dt, enabled=dt is not None):
            logits = model(x)
        loss = torch.sum(-target * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return batch

    r = _rate(measure_rate(step, dev, c.args.min_s, warm=3, chunk=5), batch)
    print(f"   {c.args.student}: {r['per_s']:.0f} img/s (batch {batch}, {classes} classes, {size} px, "
          f"amp {c.amp('train-student')})")
    c.res["student_step"] = {**r, "student": c.args.student, "classes": classes, "view_size": size,
                             "amp": c.amp("train-student"), "opt": t["opt"]}
    del model, opt, x, target
    _free(dev)


def _free(dev) -> None:
    import gc

    import torch

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _load(r: dict, m: MachineSampler, windows: list) -> dict:
    """Machine load of one command: over its steady windows (whole run when there are none)."""
    w = windows or None
    return {"cores_busy": m.cores_busy(w), "gpu_util": m.gpu_util(w), "cores_busy_run": m.cores_busy(),
            "gpu_util_run": m.gpu_util(), "steady_s": round(sum(b - a for a, b in windows), 2),
            "cli_wall_s": round(r["wall_s"], 1)}


def gen_args(c: Check) -> list[str]:
    """gen-logits' command line: --compile only when this machine can compile."""
    return ["gen-logits", "--config", c.recipe, "--out", c.store, "--overwrite", "--device", c.args.device,
            *(["--compile"] if c.compile else [])]


def gen_logits(c: Check) -> None:
    r, m = c.cli("gen-logits", gen_args(c))
    s = last_json(r["stdout"])
    rate, windows = steady_rate(progress(r["lines"]), start_frac=0.25)
    loop = s["views"] / s["load"]["wall_s"]
    c.res["gen"] = {"compile": c.compile, "views_per_s": rate or loop,
                    "rate_from": "progress" if rate else "loop", "loop_views_per_s": loop,
                    "command_views_per_s": s["views_per_s"], **_load(r, m, windows), "summary": s}
    print(f"   {s['views']} views: {rate or loop:.0f} views/s steady, {loop:.0f} loop, "
          f"{s['views_per_s']} whole command")


def verify(c: Check) -> None:
    r, _ = c.cli("verify", ["verify", c.store, "--data", c.data, "--teacher", c.args.teacher,
                            "--teacher-weights", c.weights, "--device", c.args.device])
    c.res["verify"] = s = last_json(r["stdout"])
    print(f"   {s['views_checked']} views: ids agree {100 * s['topk_id_agreement']:.1f}%, "
          f"max |d log-prob| {s['max_abs_logp_diff']:.3g}")


def train(c: Check, mode: str) -> None:
    out = c.work / f"train-{mode}"
    shutil.rmtree(out, ignore_errors=True)  # metrics.jsonl appends
    k = str(c.recipe_values("gen-logits")["k"])
    extra = {"offline": ["--logits", c.store], "no-kd": ["--no-kd", "--like", c.store],
             "online": ["--online-teacher", c.args.teacher, "--teacher-weights", c.weights, "--like", c.store,
                        "--k", k]}
    r, m = c.cli(f"train {mode}", ["train-student", "--config", c.recipe, "--out", str(out), "--device",
                                   c.args.device, *extra[mode]])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    views, steps = sum(x["views"] for x in rows), rows[-1]["step"]
    steady = rows[1:] if len(rows) > 1 else rows  # the first epoch warms up
    loop = sum(x["views"] for x in steady) / sum(x["load"]["wall_s"] for x in steady)
    rate, windows = steady_rate(progress(r["lines"]), skip_first=len(rows) > 1)
    rate = rate * views / steps if rate else None  # steps/s -> img/s
    c.res.setdefault("train", {})[mode] = {"img_per_s": rate or loop, "rate_from": "progress" if rate else "loop",
                                           "loop_img_per_s": loop, "views": views, "steps": steps,
                                           "loss": rows[-1]["train_loss"], **_load(r, m, windows),
                                           "load": rows[-1]["load"]}
    print(f"   {views} views in {steps} steps: {rate or loop:.0f} img/s steady, {loop:.0f} loop; "
          f"loss {rows[-1]['train_loss']:.3f}")


def ops_per_view(c: Check) -> None:
    import torch

    try:
        from tinydistill.opcount import count_aten_ops
    except ImportError as e:
        raise RuntimeError(f"tinydistill.opcount.count_aten_ops(fn, *args) is not in this checkout ({e})") from e
    from tinydistill.augment import AugSpec
    from tinydistill.sources import open_source
    from tinydistill.views import Views

    dev = torch.device(c.args.device)
    spec = dataclasses.replace(AugSpec.from_yaml(c.recipe), renderer="torch")
    source = open_source(c.data)
    core = Views(source, spec, c.recipe_values("gen-logits")["seed"], device=dev)  # JPEGs to the device decoder
    rows = list(range(min(c.args.render_rows, len(source))))
    t0 = time.perf_counter()
    raw = core.encode(0, rows)
    encode_s = time.perf_counter() - t0
    core.render_encoded(raw, dev)  # warm-up: decoder, kernels
    sync(dev)
    t0 = time.perf_counter()
    core.render_encoded(raw, dev)
    sync(dev)
    render_s = time.perf_counter() - t0
    n, _ = count_aten_ops(core.render_encoded, raw, dev)
    c.res["ops"] = {"rows": len(rows), "top_level_aten_ops": n, "ops_per_view": n / len(rows),
                    "encode_s": round(encode_s, 3), "render_s": round(render_s, 4),
                    "render_views_per_s": len(rows) / render_s, "spec": spec.to_dict()}
    c.res["ops_per_view"] = n / len(rows)
    print(f"   {len(rows)} views: {n} top-level aten ops ({n / len(rows):.2f} per view); "
          f"render {len(rows) / render_s:.0f} views/s, encode {len(rows) / encode_s:.0f} views/s (1 process)")


# ---- the device path: bad photos, host syncs, a second GPU ---------------------------------------

def add_bad_photos(folder: Path, good_jpeg: bytes) -> dict:
    """A truncated JPEG (its header intact, its body cut: unreadable, to be skipped) and a
    CMYK JPEG (readable: GPU decoders hand it to PIL) in ``folder``: {what: file name}."""
    import io

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zz-truncated.jpg").write_bytes(good_jpeg[:len(good_jpeg) // 2])
    with Image.open(io.BytesIO(good_jpeg)) as im:
        im.convert("CMYK").save(folder / "zz-cmyk.jpg", quality=90)
    return {"truncated": "zz-truncated.jpg", "cmyk": "zz-cmyk.jpg"}


class SyncCounter:
    """Host syncs per thread while open: on CUDA the warnings of
    ``torch.cuda.set_sync_debug_mode("warn")`` (every thread's), elsewhere the host -> device
    copies counted by ``render_torch.UPLOADS`` (``copies@THREAD``). ``count(thread)`` reads
    the running total."""

    def __init__(self, cuda: bool):
        self.cuda, self.seen = cuda, collections.Counter()

    def __enter__(self):
        import torch

        if self.cuda:
            self._cm = warnings.catch_warnings()
            self._cm.__enter__()
            warnings.filterwarnings("always", message=".*synchroniz")  # every sync, not once per place
            shown = warnings.showwarning

            def show(message, category, *a, **k):
                if "synchroniz" in str(message):
                    self.seen[threading.current_thread().name] += 1
                else:
                    shown(message, category, *a, **k)

            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
            self._cm.__exit__(*exc)

    def count(self, thread: str) -> int:
        from tinydistill import render_torch

        return self.seen[thread] if self.cuda else render_torch.UPLOADS[f"copies@{thread}"]


def _with_decode(cls, values: dict) -> dict:
    """``decode="device"`` (JPEG bytes decoded in the main process, as on a GPU) where this
    checkout has the option; recorded either way."""
    has = any(f.name == "decode" for f in dataclasses.fields(cls))
    return {**values, "decode": "device"} if has else values


def _per(marks: list[int]) -> float | None:
    """Syncs per step from the running counts at each step (the first step's set-up left out)."""
    return (marks[-1] - marks[0]) / (len(marks) - 1) if len(marks) > 1 else None


def device_path(c: Check) -> None:
    """gen-logits and train-student in this process through the device path, over photos that
    include a truncated and a CMYK JPEG, counting host syncs per step and per render unit."""
    from tinydistill.augment import AugSpec
    from tinydistill.generate import GenConfig
    from tinydistill.generate import gen_logits as run_gen
    from tinydistill.options import from_options
    from tinydistill.render_device import DeviceRenderer
    from tinydistill.train import TrainConfig, train_student

    folder = c.work / "device-path"
    shutil.rmtree(folder, ignore_errors=True)
    photos = sorted(Path(c.data).rglob("*.jpg"))[:2 * c.args.render_rows]  # 2 units at the full size
    for p in photos:
        dst = folder / p.parent.name / p.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(p, dst)
    bad = add_bad_photos(folder / photos[-1].parent.name, photos[0].read_bytes())
    spec = dataclasses.replace(AugSpec.from_yaml(c.recipe), renderer="torch")
    store, units = str(c.work / "device-path.zarr"), collections.Counter()
    render_unit = DeviceRenderer._render_unit

    def counted(self, *a, **k):
        units[threading.current_thread().name] += 1
        return render_unit(self, *a, **k)

    out, marks = {"photos": len(photos) + 2, "bad_photos": bad}, {"gen-logits": [], "train-student": []}
    DeviceRenderer._render_unit = counted
    try:
        with SyncCounter(c.cuda) as syncs:
            g = c.recipe_values("gen-logits")
            gen = run_gen(from_options(GenConfig, _with_decode(GenConfig, {
                **g, "data": str(folder), "out": store, "overwrite": True, "epochs": 1, "device": c.args.device,
                "skip_bad": True, "compile": False, "amp": c.amp("gen-logits"), "teacher": c.args.teacher,
                "teacher_weights": c.weights}), spec=spec, progress=False),
                on_step=lambda _: marks["gen-logits"].append(syncs.count("MainThread")))
            unit_syncs = {"gen-logits": (syncs.count("tinydistill-render"), units["tinydistill-render"])}
            t = c.recipe_values("train-student")
            train_student(from_options(TrainConfig, _with_decode(TrainConfig, {
                **t, "data": str(folder), "logits": store, "out": str(c.work / "device-path-train"), "epochs": 1,
                "device": c.args.device, "amp": c.amp("train-student"), "student": c.args.student}),
                progress=False), on_step=lambda _: marks["train-student"].append(syncs.count("MainThread")))
            s0, u0 = unit_syncs["gen-logits"]
            unit_syncs["train-student"] = (syncs.count("tinydistill-render") - s0, units["tinydistill-render"] - u0)
    finally:
        DeviceRenderer._render_unit = render_unit
    c.res["syncs_per_step"] = {k: _per(v) for k, v in marks.items()}
    c.res["syncs_per_unit"] = {k: n / u if u else None for k, (n, u) in unit_syncs.items()}
    c.res["syncs_counted"] = ("torch.cuda.set_sync_debug_mode('warn') warnings" if c.cuda
                              else "render_torch.UPLOADS host -> device copies (no CUDA here)")
    out.update(decode="device" if any(f.name == "decode" for f in dataclasses.fields(GenConfig)) else
               "worker (this checkout has no `decode` option)", views=gen["views"],
               skipped_views=gen["skipped_views"], steps=len(marks["train-student"]),
               units={k: u for k, (_, u) in unit_syncs.items()})
    c.res["device_path"] = out
    print(f"   {gen['views']} views, {gen['skipped_views']} skipped; syncs per step {c.res['syncs_per_step']}, "
          f"per render unit {c.res['syncs_per_unit']} ({c.res['syncs_counted']})")
    if gen["skipped_views"] != 1:
        raise RuntimeError(f"expected the truncated JPEG skipped once (--skip-bad), got {gen['skipped_views']} "
                           f"skipped views")


def second_gpu(c: Check) -> None:
    """gen-logits and verify on cuda:1 (events, streams and copies on a device that is not the current one)."""
    import torch

    if not c.cuda or torch.cuda.device_count() < 2:
        c.res["cuda1"] = {"ran": False, "why": "fewer than two GPUs" if c.cuda else "not on CUDA"}
        print(f"   not run: {c.res['cuda1']['why']}")
        return
    store = str(c.work / "cuda1.zarr")
    c.cli("gen-logits cuda:1", ["gen-logits", "--config", c.recipe, "--data", str(c.work / "device-path"), "--out",
                                store, "--overwrite", "--epochs", "1", "--skip-bad", "--device", "cuda:1"])
    r, _ = c.cli("verify cuda:1", ["verify", store, "--data", str(c.work / "device-path"), "--teacher",
                                   c.args.teacher, "--teacher-weights", c.weights, "--device", "cuda:1"])
    c.res["cuda1"] = {"ran": True, "verify": last_json(r["stdout"])}


# ---- the table ---------------------------------------------------------------------------------

def _judge(key: str | None, value, cuda: bool) -> tuple[str, str]:
    if key is None:
        return "-", ""
    op, want = TARGETS[key]
    target = f"{op} {want:,.0f}" if want >= 100 else f"{op} {want:g}"
    if not cuda:
        return target, "n/a"
    if value is None:
        return target, "FAIL"
    return target, "pass" if (value >= want if op == ">=" else value <= want) else "FAIL"


def figures(c: Check) -> list[dict]:
    """(figure, value, target, status) rows from the results; a missing figure prints as '-'."""
    res, out = c.res, []

    def get(*path):
        d = res
        for p in path:
            d = d.get(p) if isinstance(d, dict) else None
        return d

    def ratio(a, b):
        return a / b if a is not None and b else None

    def add(figure, value, fmt="{:,.0f}", key=None):
        target, status = _judge(key, value, c.cuda)
        out.append({"figure": figure, "value": value, "text": "-" if value is None else fmt.format(value),
                    "target": target, "status": status, "key": key})

    eager, comp = get("teacher_forward", "eager", "per_s"), get("teacher_forward", "compiled", "per_s")
    gen, step = get("gen", "views_per_s"), get("student_step", "per_s")
    img = {m: get("train", m, "img_per_s") for m in MODES}
    add("teacher forward, eager (views/s)", eager)
    add("teacher forward, compiled (views/s)", comp)
    add("teacher forward with attention maps / without (eager)",
        ratio(get("teacher_forward", "eager_maps", "per_s"), eager), "{:.3f}")
    add("gen-logits (views/s)", gen)
    add("gen-logits / compiled forward", ratio(gen, comp), "{:.3f}", "gen_vs_compiled")
    add("gen-logits / eager forward", ratio(gen, eager), "{:.3f}")
    v = get("verify")
    out.append({"figure": "verify (ids agree, max |d log-prob|)",
                "value": None if v is None else v["max_abs_logp_diff"],
                "text": "-" if v is None else f"{100 * v['topk_id_agreement']:.1f}%, {v['max_abs_logp_diff']:.3g}",
                "target": "exact", "status": "pass" if "verify" in c.ok else "FAIL", "key": None})
    add("student step ceiling (img/s)", step)
    for m in MODES:
        add(f"train {m} (img/s)", img[m], key="offline_img_s" if m == "offline" else None)
        add(f"train {m} / student ceiling", ratio(img[m], step), "{:.3f}")
    add("offline / no-KD", ratio(img["offline"], img["no-kd"]), "{:.3f}", "offline_vs_no_kd")
    add("offline / online", ratio(img["offline"], img["online"]), "{:.2f}", "offline_vs_online")
    runs = {"gen-logits": get("gen"), **{f"train {m}": get("train", m) for m in MODES}}
    for name, r in runs.items():
        add(f"CPU cores busy per GPU, {name}", None if r is None else r["cores_busy"], "{:.2f}", "cores_per_gpu")
    for name, r in runs.items():
        add(f"GPU utilisation %, {name}", None if r is None else r["gpu_util"], "{:.0f}")
    add("ops per view (top-level aten)", res.get("ops_per_view"), "{:.2f}", "ops_per_view")
    add("total wall time (s)", time.perf_counter() - c.t_start, "{:.0f}", "wall_s" if not c.args.smoke else None)
    return out


def print_table(rows: list[dict], cuda: bool) -> None:
    w = max(len(r["figure"]) for r in rows)
    print(f"\n{'figure':<{w}}  {'value':>14}  {'target':>9}  status")
    for r in rows:
        print(f"{r['figure']:<{w}}  {r['text']:>14}  {r['target']:>9}  {r['status']}")
    if not cuda:
        print("(targets are for one H100/H200 and are judged with --device cuda only)")


def finish(c: Check) -> int:
    rows = figures(c)
    print_table(rows, c.cuda)
    failed = [n for n, s in c.res["stages"].items() if not s["ok"]]
    missed = [r["figure"] for r in rows if r["status"] == "FAIL" and r["key"]]
    c.res.update(table=rows, failed_stages=failed, missed_targets=missed, elapsed_s=time.perf_counter() - c.t_start,
                 loadavg_at_end=loadavg())
    for k in ("ops_per_view", "syncs_per_step", "syncs_per_unit"):
        c.res.setdefault(k, None)
    write_json(c.args.out, c.res)
    if not c.args.work_dir and not c.args.keep:
        shutil.rmtree(c.work, ignore_errors=True)
    if failed:
        print(f"FAILED stages: {', '.join(failed)}", file=sys.stderr)
    if missed:
        print(f"targets missed: {'; '.join(missed)}", file=sys.stderr)
    return 1 if failed else 2 if missed else 0


# ---- main --------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = bench_parser(__doc__, epilog=__doc__)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--smoke", action="store_true", help="small sizes, every stage (e.g. on 2 CPU cores)")
    ap.add_argument("--out", default="runs/gpu_check.json", help="JSON results (default runs/gpu_check.json)")
    ap.add_argument("--recipe", default=str(ROOT / "configs" / "tinyvit_in22k.yaml"), help="the recipe (--config)")
    ap.add_argument("--data-dir", help="where the JPEGs are made and kept (default /tmp/tinydistill-bench/photos-N)")
    ap.add_argument("--work-dir", help="store and training runs (default: a temporary directory, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    ap.add_argument("--gen-eager", action="store_true", help="run gen-logits without --compile")
    ap.add_argument("--stage-timeout", type=float, default=600.0, help="seconds one command may run (default 600)")
    for k, v in PRESETS["full"].items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v) if v is not None else int, default=None,
                        help=f"default {v if v is not None else 'the recipe'} ({PRESETS['smoke'][k]} with --smoke)")
    args = ap.parse_args(argv)
    for k, v in PRESETS["smoke" if args.smoke else "full"].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not __import__("torch").cuda.is_available():
        return print(f"--device {args.device}: no CUDA device here (use --device cpu)", file=sys.stderr) or 1
    c = Check(args)
    try:
        c.res["env"] = environment(device=args.device, smoke=args.smoke)
    except Exception as e:  # a missing package shows again, with its command, in the stage that needs it
        c.res["env"] = {"error": f"{type(e).__name__}: {e}", "loadavg_at_start": loadavg()}
    print(f"gpu_check ({'smoke' if args.smoke else 'full'}, {args.device}): {json.dumps(c.res['env'])}")
    c.stage("data", make_data)
    c.stage("teacher weights", make_teacher_weights)
    c.stage("recipe", write_recipe, needs=("teacher weights",))
    c.stage("teacher forward", teacher_forward, needs=("recipe",))
    c.stage("student step", student_step, needs=("recipe",))
    c.stage("gen-logits", gen_logits, needs=("data", "recipe"))
    c.stage("verify", verify, needs=("gen-logits",))
    for mode in MODES:
        c.stage(f"train {mode}", train, mode, needs=("gen-logits",))
    c.stage("ops per view", ops_per_view, needs=("data", "recipe"))
    c.stage("device path", device_path, needs=("data", "recipe"))
    c.stage("cuda:1", second_gpu, needs=("device path",))
    return finish(c)


if __name__ == "__main__":
    sys.exit(main())
