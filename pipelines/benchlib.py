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
