"""Checkpoints of train-student: written atomically, loadable with ``weights_only=True``, and
holding every rank's random generators (each rank's own CUDA device's), so a resumed run draws
what an uninterrupted one would. A resume is refused when an option that changes the result
differs from the checkpoint's (:data:`RUN_ONLY` lists the options that may change)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

from .errors import TrainError, one_line

log = logging.getLogger("tinydistill")

# TrainConfig options that change how a run goes, not what it computes: a resume may change
# them. Every other option (a new one too, unless it is added here) must equal the checkpoint's.
# `device` is here so a run can move between machines; `amp`, which does change the result, is
# compared (and `render`, which picks the renderer a device defaults to).
RUN_ONLY = frozenset({
    "out", "resume", "overwrite", "workers", "progress", "log_interval", "device",
    "decode",  # where JPEGs are decoded: a store checks it by its canary, no-KD runs see the same pixels on the CPU
    "cycle_epochs", "allow_renderer_change",  # permissions: the run they allow is the same
    "num_classes", "expect_spec",  # checks of what the store says, not inputs of the run
})


def save(path: Path, obj: dict) -> None:
    """Write ``obj`` to ``path`` through ``path.tmp`` and a rename: a failed or killed write
    leaves the previous checkpoint whole, and a failure (a full disk) removes the partial file
    and ends in one line."""
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)  # never a half-written checkpoint under the real name
    except BaseException as e:  # torch reports a full disk as RuntimeError ("file write failed")
        tmp.unlink(missing_ok=True)
        if not isinstance(e, (OSError, RuntimeError)):
            raise  # KeyboardInterrupt: the caller says what was kept
        kept = "the previous checkpoint is kept" if path.exists() else "no checkpoint was kept"
        raise TrainError(f"{path}: cannot save the checkpoint ({_reason(e)}); {kept}") from e


def _reason(e: BaseException) -> str:
    """An OSError's reason; torch's writer reports a failed write (ENOSPC) as a RuntimeError
    with its C++ location ("[enforce fail at inline_container.cc:...] . file write failed")."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = " ".join(str(e).split())
    text = text.split("] . ", 1)[-1] if text.startswith("[enforce fail") else text
    return f"write failed: {text}; is the disk full?"


def seed_rng(seed: int) -> None:
    """Seed every generator the training loop draws from: torch's CPU and CUDA generators (drop-path,
    the DataLoader's worker seeds), numpy's and Python's (timm internals)."""
    torch.manual_seed(seed)  # CPU and every CUDA device
    np.random.seed(seed % 2**32)
    random.seed(seed)


def cuda_rng_device(device) -> torch.device | None:
    """The CUDA device whose generator this process draws from: its own (``device``), or None
    on the CPU. A checkpoint keeps that one state per rank, not every visible device's by index,
    so a resume under another CUDA_VISIBLE_DEVICES mapping or process count restores each rank's
    draws onto the device that rank now runs on."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


def rng_state(device="cpu") -> dict:
    """Every generator the loop draws from (see :func:`seed_rng`), as tensors and plain Python
    values, so checkpoints load with weights_only=True: CPU, numpy, Python, and the CUDA
    generator of this rank's ``device`` (None on the CPU)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    cuda = cuda_rng_device(device)
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(cuda) if cuda is not None else None,
            "numpy": [name, keys.tolist(), pos, has_gauss, gauss], "python": random.getstate()}


def set_rng_state(s: dict, device="cpu") -> None:
    torch.set_rng_state(s["torch"])
    cuda, state = cuda_rng_device(device), s.get("cuda")
    if isinstance(state, (list, tuple)):  # older checkpoints: every visible device's, by index
        state = state[cuda.index] if cuda is not None and cuda.index < len(state) else None
    if cuda is not None and state is not None:
        torch.cuda.set_rng_state(state, cuda)
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(tuple(s["python"][:1]) + (tuple(s["python"][1]),) + tuple(s["python"][2:]))


def _plain(v):
    """A config value as JSON would hold it (tuples as lists), so saved and new values compare."""
    return json.loads(json.dumps(v, default=str))


def changed_option(saved: dict, now: dict, defaults: dict) -> tuple[str, object, object] | None:
    """The first option that changes the result and differs between a checkpoint's config
    (``saved``) and this run's (``now``): (name, saved value, new value), or None. An option
    a checkpoint predates counts as its default."""
    for name in now:
        if name in RUN_ONLY:
            continue
        old = saved.get(name, defaults.get(name))
        if _plain(old) != _plain(now[name]):
            return name, old, now[name]
    return None


def config_defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            v = f.default_factory()
            out[f.name] = v.to_dict() if hasattr(v, "to_dict") else v
    return out


def _show(v) -> str:
    return "none" if v is None else (json.dumps(_plain(v)) if isinstance(v, (dict, list, tuple)) else str(v))


def load(path: Path) -> dict:
    if not path.exists():
        raise TrainError(f"{path}: no checkpoint to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainError(f"{path}: cannot load checkpoint ({one_line(e)})") from e


def check_config(path: Path, ck: dict, config: dict, defaults: dict) -> None:
    """Refuse, in one line naming the option, a resume whose result options differ from the
    checkpoint's (see :data:`RUN_ONLY`)."""
    saved = dict(ck["config"])
    if ck.get("amp"):
        saved["amp"] = ck["amp"]  # the resolved AMP of the run (older configs hold None)
    diff = changed_option(saved, config, defaults)
    if diff is not None:
        name, old, new = diff
        raise TrainError(f"{path}: checkpoint was trained with `{name}` {_show(old)}, this run asks for `{name}` "
                         f"{_show(new)}; resume with `{name}` {_show(old)} (or train into a new `out`)")


def resume(path: Path, ck: dict, parts: dict, rank: int = 0, world: int = 1, seed: int = 0,
           device="cpu") -> tuple[int, int, float, dict | None]:
    """Load ``parts`` (model, optimizer, ...) from a loaded checkpoint ``ck`` and this rank's RNG
    states; returns (next epoch, step, best, this rank's place in a part-done epoch or None)."""
    for name, obj in parts.items():
        if obj is not None and ck.get(name) is not None:
            obj.load_state_dict(ck[name])
    states = ck.get("rng_ranks") or [ck["rng"]]  # every rank's RNG states (older checkpoints: rank 0's)
    partial = ck.get("partial")
    if partial is not None and len(partial) != world:
        raise TrainError(f"{path}: saved during epoch {ck['epoch'] + 1} by {len(partial)} rank(s); resume it with "
                         f"{len(partial)} (this run has {world})")
    if len(states) == world:
        set_rng_state(states[rank], device)
    else:  # another world size: the data order changes too; keep the ranks' draws apart
        log.warning("%s: saved by %d rank(s), resumed by %d: random draws (drop-path) are not replayed exactly",
                    path, len(states), world)
        seed_rng(seed + rank + world * (ck["step"] + 1))
    where = f"epoch {ck['epoch'] + 1}" + (f" after {partial[rank]['seen']} batches" if partial else "")
    log.info("resumed %s at %s, step %d", path, where, ck["step"])
    return ck["epoch"] + 1, ck["step"], ck.get("best", -1.0), partial[rank] if partial else None
