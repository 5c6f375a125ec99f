"""Checkpoints of train-student: written atomically, loadable with ``weights_only=True``, and
holding every rank's random generators, so a resumed run draws what an uninterrupted one would."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

from .errors import TrainError, one_line

log = logging.getLogger("tinydistill")


def save(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # never a half-written checkpoint under the real name


def seed_rng(seed: int) -> None:
    """Seed every generator the training loop draws from: torch's CPU and CUDA generators (drop-path,
    the DataLoader's worker seeds), numpy's and Python's (timm internals)."""
    torch.manual_seed(seed)  # CPU and every CUDA device
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state() -> dict:
    """Every generator the loop draws from (see :func:`seed_rng`), as tensors and plain Python
    values, so checkpoints load with weights_only=True. The CUDA states are saved only once CUDA
    is initialised (on the CPU there are none)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
            "python": random.getstate()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    cuda = s.get("cuda") or []
    if cuda and torch.cuda.is_available():
        for i, state in enumerate(cuda[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, i)
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(tuple(s["python"][:1]) + (tuple(s["python"][1]),) + tuple(s["python"][2:]))


def resume(path: Path, cfg, parts: dict, rank: int = 0, world: int = 1) -> tuple[int, int, float]:
    """Load ``parts`` (model, optimizer, ...) from a checkpoint and this rank's RNG states;
    returns (next epoch, step, best). ``cfg`` is resolved (its ``amp`` is set)."""
    if not path.exists():
        raise TrainError(f"{path}: no checkpoint to resume from")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainError(f"{path}: cannot load checkpoint ({one_line(e)})") from e
    if ck["config"]["student"] != cfg.student or ck["config"]["epochs"] != cfg.epochs:
        raise TrainError(f"{path}: checkpoint is of {ck['config']['student']} for {ck['config']['epochs']} "
                         f"epochs; this run is {cfg.student} for {cfg.epochs}")
    amp = ck.get("amp") or ck["config"].get("amp")  # older checkpoints: the resolved config's
    if amp != cfg.amp:  # the GradScaler's state (fp16) exists or not with it: refuse, not a traceback
        raise TrainError(f"{path}: checkpoint was trained with `amp` {amp}, this run asks for `amp` {cfg.amp}; "
                         f"resume with `amp` {amp} (or train into a new `out` without `resume`)")
    for name, obj in parts.items():
        if obj is not None and ck.get(name) is not None:
            obj.load_state_dict(ck[name])
    states = ck.get("rng_ranks") or [ck["rng"]]  # every rank's RNG states (older checkpoints: rank 0's)
    if len(states) == world:
        set_rng_state(states[rank])
    else:  # another world size: the data order changes too; keep the ranks' draws apart
        log.warning("%s: saved by %d rank(s), resumed by %d: random draws (drop-path) are not replayed exactly",
                    path, len(states), world)
        seed_rng(cfg.seed + rank + world * (ck["step"] + 1))
    log.info("resumed %s at epoch %d, step %d", path, ck["epoch"] + 1, ck["step"])
    return ck["epoch"] + 1, ck["step"], ck.get("best", -1.0)
