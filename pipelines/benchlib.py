"""The benchmark scripts' one harness: the environment record, medians, ratios and their
formatting, clocks (``sync``, ``StepClock``, ``measure_rate``), TinyViT's recipe, the teacher's
forward-only ceiling (the project's own ``Teacher.topk``), synthetic photos, random-init models,
the rounds loop and the ``python -m tinydistill`` runner."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import numpy as np


def make_jpeg_folder(root: Path, n: int, classes: int = 10, seed: int = 0) -> None:
    """``n`` synthetic 320x256 'photos' (smooth random colour fields plus noise), JPEG quality 90,
    in ImageFolder layout."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        d = Path(root) / f"class{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        low = rng.integers(0, 256, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(low).resize((320, 256), Image.BICUBIC), dtype=np.float32)
        field += rng.normal(0.0, 10.0, size=field.shape)
        Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).save(d / f"{i:05d}.jpg", quality=90)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio_stats(num: list, den: list) -> dict | None:
    """Median, min and max of per-round ratios (variants measured side by side in each round)."""
    r = [a / b for a, b in zip(num, den) if a is not None and b]
    if not r:
        return None
    return {"median": statistics.median(r), "min": min(r), "max": max(r), "per_round": r}


def loadavg():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def write_json(path, res) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(res, indent=1, default=float) + "\n")
        print(f"wrote {path}")


def finish(res: dict, env: dict, t_start: float, out, summary: dict, minutes: bool = True) -> None:
    """A benchmark's last step: summary, elapsed time and load average into ``res``, a line
    saying how loaded the machine was (``minutes=False``: that and the total in seconds on two
    lines), and the JSON written to ``out``."""
    import time

    res["summary"] = summary
    res["elapsed_s"] = time.perf_counter() - t_start
    res["loadavg_at_end"] = loadavg()
    if minutes:
        print(f"\nload average (1 min) at start {env['loadavg_at_start']}, at end {res['loadavg_at_end']}; "
              f"total {res['elapsed_s'] / 60:.1f} min")
    else:
        print(f"load average (1 min) at start {env['loadavg_at_start']}, at end {res['loadavg_at_end']}")
        print(f"total {res['elapsed_s']:.0f} s")
    write_json(out, res)


def fmt_ratio(s: dict | None, digits: int = 3, span_digits: int | None = None) -> str:
    """``median [min, max]`` of a :func:`ratio_stats` result (min and max to ``span_digits``,
    default ``digits``)."""
    d = digits if span_digits is None else span_digits
    return f"{s['median']:.{digits}f} [{s['min']:.{d}f}, {s['max']:.{d}f}]" if s else "-"


def environment(**extra) -> dict:
    """Versions, cores and load: what a figure depends on besides the code."""
    import datetime
    import platform

    import PIL
    import timm
    import torch
    import zarr

    import tinydistill

    env = {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
           "tinydistill": os.path.dirname(tinydistill.__file__), "tinydistill_commit": _commit(tinydistill.__file__),
           "torch": torch.__version__, "timm": timm.__version__, "pillow": PIL.__version__,
           "zarr": zarr.__version__, "numpy": np.__version__, "cpus": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
           "loadavg_at_start": loadavg(), **extra}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def _commit(module_file: str) -> str | None:
    """The git commit of the checkout a module comes from (+ '-dirty' with local changes), or
    the COMMIT file of a snapshot made with ``git archive``."""
    import subprocess

    root = Path(module_file).resolve().parent.parent
    if (root / "COMMIT").exists():
        return (root / "COMMIT").read_text().strip()
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "tinydistill"],
                               capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


# ---- clocks ------------------------------------------------------------------------------------

def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its reaped children (DataLoader workers)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def sync(device) -> None:
    """Wait for the device's queued work (CUDA; a no-op elsewhere): put around timed GPU work."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """``on_step`` callback for ``gen_logits`` (after every teacher batch) and ``train_student``
    (after every step): the time of every call, per epoch (``times``), the views of every call,
    and the torch thread count at the first call (what the teacher or student ran with)."""

    def __init__(self):
        self.times: dict[int, list[float]] = {}
        self.views: list[int] = []
        self.threads: int | None = None

    def __call__(self, info: dict) -> None:
        import time

        import torch

        now = time.perf_counter()
        if self.threads is None:
            self.threads = torch.get_num_threads()
        self.times.setdefault(int(info.get("epoch", 0)), []).append(now)
        self.views.append(int(info.get("views", 0)))

    def steady_views_per_s(self) -> float | None:
        """Views after the first call / time from the first call to the last (None with < 2 calls)."""
        t = [x for e in sorted(self.times) for x in self.times[e]]
        return sum(self.views[1:]) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else None


def measure_rate(fn, device, min_s: float = 0.0, warm: int = 0, chunk: int = 1) -> dict:
    """Items per second of ``fn()`` (one unit of work; it returns how many items it did): ``warm``
    untimed calls first (the first one timed alone: ``first_call_s``), then chunks of ``chunk``
    calls, the device synced after each, until ``min_s`` seconds have passed (at least one
    chunk). Also the CPU seconds of this process and its reaped children."""
    import time

    first_s = None
    if warm:
        t0 = time.perf_counter()
        fn()
        sync(device)
        first_s = time.perf_counter() - t0
        for _ in range(warm - 1):
            fn()
    sync(device)
    c0, t0, calls, n = cpu_seconds(), time.perf_counter(), 0, 0
    while True:
        for _ in range(chunk):
            n += fn()
        calls += chunk
        sync(device)
        if time.perf_counter() - t0 >= min_s:
            break
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {"views": n, "calls": calls, "wall_s": wall, "cpu_s": cpu, "views_per_s": n / wall,
            "first_call_s": first_s}


# ---- TinyViT's recipe and the teacher's forward-only ceiling -------------------------------------

# Augmentation recipes as AugSpec fields (timm's names); what is not named is AugSpec's default
# (RandomResizedCrop 0.08-1, flip 0.5, colour jitter 0.4 (off under RandAugment), bicubic, mixup /
# cutmix switch 0.5, pixel-filled erasing, mix groups of 256).
RECIPES = {
    # TinyViT's: RandAugment m9, mixup 0.8 / cutmix 1.0, random erasing 0.25
    "tinyvit": dict(auto_augment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0, re_prob=0.25),
    "light": dict(color_jitter=0.4, interpolation="bicubic"),  # RandomResizedCrop + flip + jitter only
}


def recipe(name: str = "tinyvit", erasing: bool = True, **fields) -> dict:
    """A recipe of :data:`RECIPES` as AugSpec keyword arguments, ``fields`` first (e.g. img_size)
    and overriding; ``erasing=False`` leaves random erasing at its default (off)."""
    r = {**fields, **{k: v for k, v in RECIPES[name].items() if k not in fields}}
    if not erasing:
        r.pop("re_prob", None)
    return r


def aug_spec(fields: dict):
    """A :func:`recipe` as a ``tinydistill.augment.AugSpec``."""
    from tinydistill.augment import AugSpec

    return AugSpec(**fields)


def cli_options(fields: dict) -> list[str]:
    """AugSpec fields as command-line options: ``{"img_size": 224}`` -> ``["--img-size", "224"]``."""
    return [x for k, v in fields.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def placed_teacher(name: str, weights: str | None, device, amp: str | None = "none", input_size: int | None = None,
                   class_names=None, compile: bool = False):
    """The project's own teacher as gen-logits builds it: ``load_teacher(name, weights)``, its
    input size overridden when given, ``.place(device, amp, compile)``."""
    from tinydistill.teachers import load_teacher

    teacher = load_teacher(name, weights, class_names=class_names)
    if input_size:
        teacher.input_size = int(input_size)
    return teacher.place(device, amp, compile=compile)


def forward_ceiling(teacher, batches: list, k: int, threads: int | None = None, min_s: float = 0.0, warm: int = 0,
                    chunk: int | None = None, copy_back: bool = True) -> dict:
    """The teacher's forward-only ceiling: views/s of the project's ``Teacher.topk(batch, k)`` over
    ``batches`` held in memory (cycled), the top-K copied back to host numpy as gen-logits does
    (unless ``copy_back=False``), with :func:`measure_rate` (``chunk`` default: one pass over the
    batches). ``threads``: torch intra-op threads on the CPU for the measurement (restored after).
    What gen-logits would reach if rendering the views were free."""
    import gc
    import itertools

    import torch

    cycle = itertools.cycle(batches)

    def one() -> int:
        images = next(cycle)
        logp, idx = teacher.topk(images, k)
        if copy_back:
            logp.cpu().numpy(), idx.cpu().numpy()
        return len(images)

    before = torch.get_num_threads()
    if threads and teacher.device.type == "cpu":
        torch.set_num_threads(threads)
    gc.collect()
    try:
        return measure_rate(one, teacher.device, min_s, warm, chunk or len(batches))
    finally:
        torch.set_num_threads(before)


# ---- benchmark scaffolding ----------------------------------------------------------------------

def bench_parser(doc: str, presets: dict | None = None, **kw):
    """The argument parser of a benchmark: its docstring's first line as description, the rest
    shown as written; with ``presets``, a ``--preset`` option (default cpu) picking one."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 **kw)
    if presets:
        ap.add_argument("--preset", choices=sorted(presets), default="cpu",
                        help="defaults for the options below (default cpu)")
    return ap


def in_process_options(ap) -> None:
    """Options of the in-process benchmarks (bench_gen_logits, bench_train): data, recipe,
    device and rounds; their presets fill what is left unset."""
    ap.add_argument("--data", help="digits[:train|:val], synthetic-jpeg (generated in a temp dir), or any SRC")
    ap.add_argument("--images", type=int, help="how many JPEGs for --data synthetic-jpeg")
    ap.add_argument("--img-size", type=int, help="size views are rendered at (AugSpec.img_size)")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="tinyvit",
                    help="augmentation: TinyViT's (RandAugment, erasing, mixup/cutmix) or light (crop, flip, jitter)")
    ap.add_argument("--mix-group", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=["cpu", "cuda"])
    ap.add_argument("--amp", choices=["none", "bf16", "fp16"])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads in this process (default: torch's)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--out", help="also write the figures and raw rounds to this JSON file")


def apply_preset(args, preset: dict):
    """Fill the options left unset (None) from ``preset``; returns ``args``."""
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def skipped_without_cuda(device: str, res: dict, out, what: str = "--device cuda", where: str = "on this machine") -> bool:
    """True (after saying so, into ``res`` and ``out`` too) when ``device`` is CUDA and there is none."""
    import torch

    if not str(device).startswith("cuda") or torch.cuda.is_available():
        return False
    msg = f"skipped: {what} asked for, but torch.cuda.is_available() is False {where}; nothing was measured"
    print(msg)
    res["skipped"] = msg
    write_json(out, res)
    return True


def begin(name: str, args, skip_what: str) -> tuple[dict, dict, object, float]:
    """An in-process benchmark's start (bench_gen_logits, bench_train): ``--threads`` applied,
    the environment and the options printed; returns (env, res, the recipe's AugSpec, start
    time). Exits 0 when CUDA is asked for and absent (after saying so, in ``--out`` too)."""
    import time

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    env = environment()
    print(f"{name}: {env}")
    print(f"config: {config}\n")
    res: dict = {"env": env, "config": config}
    if skipped_without_cuda(args.device, res, args.out, skip_what):
        raise SystemExit(0)
    spec = aug_spec(recipe(args.recipe, img_size=args.img_size, mix_group=args.mix_group))
    return env, res, spec, time.perf_counter()


def workspace(prefix: str, args):
    """A temporary directory (removed afterwards) and the data: ``(tmp, data)``, where ``data``
    is ``--data``, or for ``synthetic-jpeg`` a folder of ``--images`` JPEGs made in ``tmp``."""
    import contextlib
    import tempfile

    @contextlib.contextmanager
    def cm():
        with tempfile.TemporaryDirectory(prefix=prefix) as d:
            yield Path(d), synthetic_or(args.data, args.images, Path(d))

    return cm()


def synthetic_or(data: str, images: int, tmp: Path) -> str:
    """``data``, or for ``synthetic-jpeg`` an ImageFolder of ``images`` synthetic 320x256 JPEGs made in ``tmp``."""
    import time

    if data != "synthetic-jpeg":
        return data
    t0 = time.perf_counter()
    make_jpeg_folder(tmp / "jpeg", images)
    print(f"data: {images} synthetic 320x256 JPEGs in {time.perf_counter() - t0:.1f} s")
    return str(tmp / "jpeg")


def gen_config(data: str, teacher: str, weights: str, out: str, spec, rows: int, **fields):
    """A ``GenConfig`` into a fresh store (overwrite, no progress bar) with chunks = shards of
    ``rows`` rows; ``fields``: the rest (k, epochs, batch_size, workers, device, ...)."""
    from tinydistill.generate import GenConfig

    return GenConfig(data=data, teacher=teacher, out=out, teacher_weights=weights, spec=spec, overwrite=True,
                     chunk_rows=rows, shard_rows=rows, progress=False, **fields)


def alternate(names: list[str], r: int) -> list[str]:
    """Round ``r``'s order: ``names``, reversed every other round (a linear drift falls on all alike)."""
    return list(names) if r % 2 == 0 else list(names)[::-1]


def run_rounds(variants: dict, rounds: int, order=None, key: str = "views_per_s", unit: str = "views/s",
               digits: int = 0, each: bool = False) -> dict[str, list[dict]]:
    """Every round runs ``variants[name](r, slot)`` (a dict of figures) for each name of
    ``order(r)`` (default :func:`alternate`), records round, slot and load average, and prints
    the round's ``key`` figures (with ``each``, every run as it ends too)."""
    import time

    runs: dict[str, list[dict]] = {n: [] for n in variants}
    for r in range(rounds):
        line = []
        for i, name in enumerate(order(r) if order else alternate(list(variants), r)):
            t0 = time.perf_counter()
            rec = variants[name](r, i)
            rec.update(round=r, slot=i, loadavg=loadavg())
            runs[name].append(rec)
            line.append(f"{name} {rec[key]:.{digits}f}")
            if each:
                print(f"  round {r + 1}/{rounds} {name}: {rec[key]:.{digits}f} {unit} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
        print(f"round {r + 1}/{rounds}: " + ", ".join(line) + f" {unit}", flush=True)
    return runs


# ---- ImageNet-like photos ----------------------------------------------------------------------

def photo_jpeg(seed: int, i: int, size: tuple[int, int] = (500, 375), quality: int = 90) -> bytes:
    """One synthetic 'photo' as JPEG bytes, a pure function of (seed, i): a smooth random colour
    field, 4-11 filled shapes, a blur, a mid-frequency texture and pixel noise. At 500x375 and
    quality 90 these come out at ~50-70 KB, like ImageNet's JPEGs, so decoding costs about what
    a real image costs."""
    import io

    from PIL import Image, ImageDraw, ImageFilter

    w, h = size
    rng = np.random.default_rng([int(seed), int(i)])
    low = rng.integers(0, 256, size=(int(rng.integers(2, 6)), int(rng.integers(2, 6)), 3), dtype=np.uint8)
    img = Image.fromarray(low).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 12))):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x0, y0 = int(rng.integers(-w // 4, w)), int(rng.integers(-h // 4, h))
        box = (x0, y0, x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2)))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        else:
            pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(int(rng.integers(3, 7)))]
            draw.polygon(pts, fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    x = np.asarray(img, dtype=np.float32)
    tex = rng.normal(0.0, float(rng.uniform(12, 20)), size=(h // 4 + 1, w // 4 + 1)).astype(np.float32)
    x += np.asarray(Image.fromarray(tex).resize((w, h), Image.BICUBIC))[..., None]
    x += rng.normal(0.0, float(rng.uniform(4, 8)), size=x.shape).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _photo_path(root, i: int, classes: int) -> Path:
    return Path(root) / f"class{i % classes:0{max(3, len(str(classes - 1)))}d}" / f"{i:06d}.jpg"


def _write_photos(job) -> int:
    root, seed, lo, hi, classes, size, quality = job
    nbytes = 0
    for i in range(lo, hi):
        data = photo_jpeg(seed, i, size, quality)
        d = _photo_path(root, i, classes).parent
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{i:06d}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, d / f"{i:06d}.jpg")
        nbytes += len(data)
    return nbytes


def make_photo_folder(root, n: int, classes: int = 100, size: tuple[int, int] = (500, 375), seed: int = 0,
                      quality: int = 90, procs: int | None = None) -> dict:
    """An ImageFolder of ``n`` :func:`photo_jpeg` images in ``classes`` folders (image i in
    class i % classes), made with a process pool, and kept: a manifest records what was made,
    and a later call asking for the same thing returns at once (anything else in ``root`` is
    refused, never deleted). When a sibling directory holds the same images under another
    class count, they are hard-linked instead of made again."""
    import multiprocessing as mp
    import time

    root = Path(root)
    want = {"images": n, "classes": classes, "size": list(size), "seed": seed, "quality": quality, "version": 1}
    manifest = root / "manifest.json"
    if manifest.exists():
        have = json.loads(manifest.read_text())
        if {k: have.get(k) for k in want} == want:
            return {**have, "cached": True}
        raise SystemExit(f"{root}: holds another data set ({have}); pass another --data-dir or remove it")
    if root.exists() and any(p.name != ".partial" for p in root.iterdir()) and not (root / ".partial").exists():
        raise SystemExit(f"{root}: exists and is not a data set made by this script; pass another --data-dir")
    root.mkdir(parents=True, exist_ok=True)
    (root / ".partial").touch()
    for other in sorted(root.parent.glob("*/manifest.json")):
        have = json.loads(other.read_text())
        if {k: have.get(k) for k in want if k != "classes"} == {k: v for k, v in want.items() if k != "classes"}:
            t0 = time.perf_counter()
            for i in range(n):
                dst = _photo_path(root, i, classes)
                dst.parent.mkdir(parents=True, exist_ok=True)
                if not dst.exists():
                    os.link(_photo_path(other.parent, i, have["classes"]), dst)
            info = {**want, "bytes": have["bytes"], "mean_kb": have["mean_kb"], "linked_from": str(other.parent),
                    "seconds": round(time.perf_counter() - t0, 1)}
            manifest.write_text(json.dumps(info) + "\n")
            (root / ".partial").unlink()
            return {**info, "cached": False}
    procs = procs or os.cpu_count() or 1
    step = 256
    jobs = [(str(root), seed, lo, min(lo + step, n), classes, tuple(size), quality) for lo in range(0, n, step)]
    t0, done, nbytes = time.perf_counter(), 0, 0
    with mp.get_context("spawn").Pool(procs) as pool:
        for b in pool.imap_unordered(_write_photos, jobs):
            done += 1
            nbytes += b
            if done % max(1, len(jobs) // 8) == 0 or done == len(jobs):
                print(f"  data: {min(done * step, n)}/{n} JPEGs, {time.perf_counter() - t0:.0f} s", flush=True)
    info = {**want, "bytes": nbytes, "mean_kb": nbytes / n / 1e3, "seconds": round(time.perf_counter() - t0, 1)}
    manifest.write_text(json.dumps(info) + "\n")
    (root / ".partial").unlink()
    return {**info, "cached": False}


# ---- models and the command line ---------------------------------------------------------------

def save_random_model(name: str, num_classes: int, path, seed: int = 0) -> int:
    """A seeded random-init timm model's state_dict at ``path`` (what ``--teacher-weights``
    takes); nothing is downloaded. Returns its parameter count."""
    import timm
    import torch

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    torch.save(model.state_dict(), path)
    return sum(p.numel() for p in model.parameters())


def run_cli(args: list[str], label: str = "", every_s: float = 30.0, cwd: str | None = None) -> tuple[str, float]:
    """Run ``python -m tinydistill ARGS`` (:func:`run_cli_timed`); returns (stdout, wall seconds).

    It runs in ``cwd`` (default: the temp directory, not the checkout, so ``-m`` imports the
    same tinydistill this process imports: a ``PYTHONPATH`` snapshot wins over the checkout).
    Its latest progress line is echoed at most every ``every_s`` seconds; a failure raises
    :class:`CliError` (a RuntimeError) with the last lines of its stderr."""
    r = run_cli_timed(args, label=label, every_s=every_s, cwd=cwd)
    return r["stdout"], r["wall_s"]


def last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON summary line in: {stdout[-500:]!r}")


def shares(xs) -> str:
    """A list of busy shares as ``0.97/0.95``."""
    return "/".join(f"{x:.2f}" for x in xs) if xs else "-"


# ---- timed commands and machine load (gpu_check) ------------------------------------------------

class CliError(RuntimeError):
    """A ``python -m tinydistill`` command that failed: the command, its exit status (None when
    it was killed on a timeout) and the last lines of its stderr."""

    def __init__(self, args: list[str], returncode: int | None, tail: list[str], timeout_s: float | None = None):
        self.args_, self.returncode, self.tail = list(args), returncode, list(tail)
        why = f"timed out after {timeout_s:.0f} s" if returncode is None else f"exited {returncode}"
        super().__init__(f"`python -m tinydistill {' '.join(args)}` {why}; last lines of its stderr:\n"
                         + "\n".join(f"    {line}" for line in tail))


def run_cli_timed(args: list[str], label: str = "", every_s: float = 30.0, cwd: str | None = None,
                  timeout_s: float | None = None) -> dict:
    """Run ``python -m tinydistill ARGS`` like :func:`run_cli`, keeping every stderr line (each
    progress-bar update included) with the time it arrived, and killing the command (its whole
    process group: DataLoader workers too) after ``timeout_s``.

    Returns ``{"stdout", "wall_s", "t0", "t1", "lines"}``: ``t0``/``t1`` are
    ``time.perf_counter()`` at start and end, ``lines`` is a list of (perf_counter time, text).
    Raises :class:`CliError` (command, status, stderr tail) when the command fails."""
    import signal
    import subprocess
    import sys
    import tempfile
    import threading
    import time

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "tinydistill", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1, cwd=cwd or tempfile.gettempdir(),
                            env=env, start_new_session=True)
    lines: list[tuple[float, str]] = []
    killed = threading.Event()

    def kill():
        killed.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this call started
        except OSError:
            pass

    timer = threading.Timer(timeout_s, kill) if timeout_s else None

    def pump():  # a line's time is when its first character came: tqdm ends a line only when it writes the next
        last, buf, t_line = time.perf_counter(), "", 0.0
        while True:
            c = proc.stderr.read(1)
            if not c:
                break
            if c in "\r\n":
                if buf.strip():
                    lines.append((t_line, buf))
                    if t_line - last >= every_s:
                        print(f"    {label} | {buf.strip()[:150]}", flush=True)
                        last = t_line
                buf = ""
            else:
                if not buf:
                    t_line = time.perf_counter()
                buf += c
        if buf.strip():
            lines.append((t_line, buf))

    th = threading.Thread(target=pump, daemon=True)
    th.start()
    if timer:
        timer.start()
    try:
        out = proc.stdout.read()
        proc.wait()
    finally:
        if timer:
            timer.cancel()
    th.join()
    t1 = time.perf_counter()
    if proc.returncode or killed.is_set():
        raise CliError(args, None if killed.is_set() else proc.returncode, [t for _, t in lines[-40:]], timeout_s)
    return {"stdout": out, "wall_s": t1 - t0, "t0": t0, "t1": t1, "lines": lines}


def cpu_times() -> tuple[float, float] | None:
    """(busy, total) CPU time of the whole machine since boot, all cores (clock ticks from
    /proc/stat; seconds from psutil where there is no /proc), or None. Busy is all but idle
    and iowait; guest time is already counted in user time."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return float(sum(v) - v[3] - v[4]), float(sum(v))
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    t = psutil.cpu_times()
    total = sum(getattr(t, k, 0.0) for k in ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"))
    return total - t.idle - getattr(t, "iowait", 0.0), total


def gpu_utilisation() -> list[int] | None:
    """Each GPU's utilisation in percent, from ``nvidia-smi`` (None without it)."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5)
        return [int(x) for x in out.stdout.split()] if out.returncode == 0 else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


class MachineSampler:
    """Samples the whole machine in threads, as a context manager: CPU time (:func:`cpu_times`)
    every ``cpu_every_s`` seconds and, with ``gpu=True``, the utilisation of GPU ``gpu_index``
    (:func:`gpu_utilisation`) every ``gpu_every_s``. Afterwards :meth:`cores_busy` and
    :meth:`gpu_util` average them over the whole run or over windows of it (perf_counter times)."""

    def __init__(self, gpu: bool = False, gpu_index: int = 0, cpu_every_s: float = 0.1, gpu_every_s: float = 0.5):
        import threading

        self.gpu_index = gpu_index
        self.cpu: list[tuple[float, float, float]] = []  # (t, busy, total)
        self.util: list[tuple[float, float]] = []  # (t, percent)
        self.ncpu = os.cpu_count() or 1
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(self._cpu, cpu_every_s), daemon=True)]
        if gpu:
            self._threads.append(threading.Thread(target=self._loop, args=(self._gpu, gpu_every_s), daemon=True))

    def _cpu(self):
        import time

        c = cpu_times()
        if c is not None:
            self.cpu.append((time.perf_counter(), *c))

    def _gpu(self):
        import time

        u = gpu_utilisation()
        if u and len(u) > self.gpu_index:
            self.util.append((time.perf_counter(), float(u[self.gpu_index])))

    def _loop(self, sample, every_s: float):
        import time

        nxt = time.perf_counter()
        while not self._stop.is_set():
            sample()
            nxt += every_s
            self._stop.wait(max(0.0, nxt - time.perf_counter()))

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join()
        self._cpu()  # the end of the run
        return False

    def cores_busy(self, windows: list[tuple[float, float]] | None = None) -> float | None:
        """Cores busy on average (whole machine) over ``windows`` (default: the whole run): CPU
        time between the first and last samples inside each window (a window holding fewer
        than two samples: the samples around it), summed over windows."""
        busy = total = 0.0
        s = self.cpu
        for a, b in windows or [(float("-inf"), float("inf"))]:
            inside = [x for x in s if a <= x[0] <= b]
            if len(inside) < 2:
                before, after = [x for x in s if x[0] <= a], [x for x in s if x[0] >= b]
                inside = [before[-1] if before else s[0], after[0] if after else s[-1]] if s else []
            if len(inside) >= 2:
                busy += inside[-1][1] - inside[0][1]
                total += inside[-1][2] - inside[0][2]
        return busy / total * self.ncpu if total > 0 else None

    def gpu_util(self, windows: list[tuple[float, float]] | None = None) -> float | None:
        """Mean sampled GPU utilisation (percent) inside ``windows`` (default: the whole run)."""
        xs = [u for t, u in self.util if any(a <= t <= b for a, b in windows or [(float("-inf"), float("inf"))])]
        return sum(xs) / len(xs) if xs else None
