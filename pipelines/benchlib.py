"""Helpers the benchmark scripts share: synthetic JPEGs, medians and ratios, JSON output."""

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


def finish(res: dict, env: dict, t_start: float, out, summary: dict) -> None:
    """A benchmark's last step: summary, elapsed time and load average into ``res``, a line
    saying how loaded the machine was, and the JSON written to ``out``."""
    import time

    res["summary"] = summary
    res["elapsed_s"] = time.perf_counter() - t_start
    res["loadavg_at_end"] = loadavg()
    print(f"\nload average (1 min) at start {env['loadavg_at_start']}, at end {res['loadavg_at_end']}; "
          f"total {res['elapsed_s'] / 60:.1f} min")
    write_json(out, res)


def fmt_ratio(s: dict | None, digits: int = 3) -> str:
    """``median [min, max]`` of a :func:`ratio_stats` result."""
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]" if s else "-"


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
           "zarr": zarr.__version__, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "platform": platform.platform(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
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
    """Run ``python -m tinydistill ARGS``; returns (stdout, wall seconds).

    It runs in ``cwd`` (default: the temp directory, not the checkout, so ``-m`` imports the
    same tinydistill this process imports: a ``PYTHONPATH`` snapshot wins over the checkout).

    The command's progress bar and log go to a pipe: its latest line is echoed at most every
    ``every_s`` seconds (so long runs show progress without flooding a log), and the last lines
    are shown if the command fails.
    """
    import subprocess
    import sys
    import threading
    import time
    from collections import deque

    import tempfile

    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "tinydistill", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1, cwd=cwd or tempfile.gettempdir())
    tail: deque[str] = deque(maxlen=40)

    def pump():
        last, buf = time.perf_counter(), ""
        while True:
            c = proc.stderr.read(1)
            if not c:
                break
            if c in "\r\n":
                if buf.strip():
                    tail.append(buf)
                    if time.perf_counter() - last >= every_s:
                        print(f"    {label} | {buf.strip()[:150]}", flush=True)
                        last = time.perf_counter()
                buf = ""
            else:
                buf += c

    th = threading.Thread(target=pump, daemon=True)
    th.start()
    out = proc.stdout.read()
    proc.wait()
    th.join()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"tinydistill {' '.join(args)} exited {proc.returncode}:\n" + "\n".join(tail))
    return out, wall


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
