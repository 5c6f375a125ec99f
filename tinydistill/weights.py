"""A student's first weights: ``--init PATH`` (a train-student checkpoint, a timm checkpoint or
a state dict, .safetensors too) and ``--pretrained`` (timm's weights, from the local cache only).

The classifier is kept when its shape fits the student's head and re-initialised otherwise (a
1k-class checkpoint for a 10-class student); every other weight must fit, or the run stops in
one line counting the missing and unexpected keys. Nothing is ever downloaded: a training
machine often has no network, and a run must not hang on one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .errors import TrainError, one_line

log = logging.getLogger("tinydistill")


def _classifiers(model) -> list[str]:
    """The module names of the model's head(s), from its pretrained config (DeiT has two)."""
    clf = model.pretrained_cfg.get("classifier") if getattr(model, "pretrained_cfg", None) else None
    clf = clf or "head"
    return list(clf) if isinstance(clf, (list, tuple)) else [clf]


def read_file(path: str | Path, error: type[Exception], role: str, verb: str = "read"):
    """What a weights file holds (``.safetensors``, or a torch file read with
    ``weights_only``); a missing or unreadable file is ``error`` naming ``path`` and ``role``."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{path}: {role} file not found")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise error(f"{path}: cannot {verb} {role} ({one_line(e)})") from e


def tensors_only(sd, path: str | Path, error: type[Exception]) -> dict[str, torch.Tensor]:
    """``sd`` as a state dict of tensors with DDP's ``module.`` prefix removed, or ``error``."""
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise error(f"{path}: not a state dict of tensors (nor a checkpoint holding one)")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def read_state_dict(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, what it is) from ``path``. A train-student checkpoint gives the weights it
    scored as its best: the EMA's when its last validation rated the EMA higher (its
    ``ema_val_top1`` above ``val_top1``), else the trained model's. A timm checkpoint gives its
    ``state_dict`` (or ``model``)."""
    ck = read_file(path, TrainError, "`init` weights")
    what = "state dict"
    if isinstance(ck, dict) and isinstance(ck.get("model"), dict) and "config" in ck and "step" in ck:
        row = ck.get("metrics") or {}
        ema = ck.get("ema") is not None and row.get("ema_val_top1", -1.0) > row.get("val_top1", -1.0)
        ck, what = (ck["ema"], "train-student checkpoint, its EMA weights (scored best)") if ema else \
            (ck["model"], "train-student checkpoint, its model weights")
    else:
        for key in ("state_dict", "model"):
            if isinstance(ck, dict) and isinstance(ck.get(key), dict):
                ck, what = ck[key], f"checkpoint's {key!r}"
                break
    return tensors_only(ck, path, TrainError), what


def load_init(model, path: str, student: str) -> None:
    """Load ``path`` into ``model``; its head only when the shapes fit (else it keeps the
    fresh, seeded initialisation). Says in one log line what was loaded."""
    sd, what = read_state_dict(path)
    own = model.state_dict()
    heads = _classifiers(model)
    in_head = lambda k: any(k.startswith(h + ".") for h in heads)  # noqa: E731
    dropped = {k for k in sd if in_head(k) and k in own and sd[k].shape != own[k].shape}
    old = sorted({sd[k].shape[0] for k in dropped})
    sd = {k: v for k, v in sd.items() if k not in dropped}
    fresh = [k for k in own if in_head(k) and k not in sd]  # dropped, or a headless file: initialised
    missing = sorted(k for k in own if k not in sd and not in_head(k))
    unexpected = sorted(k for k in sd if k not in own)
    wrong = sorted(k for k in sd if k in own and sd[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        first = (missing + unexpected + wrong)[0]
        raise TrainError(f"{path}: does not fit the student {student}: {len(missing)} missing, {len(unexpected)} "
                         f"unexpected, {len(wrong)} of another shape (first: {first!r})")
    model.load_state_dict(sd, strict=not fresh)
    head = ", ".join(heads)
    if dropped:
        log.info("init: %s (%s); classifier %s dropped (%s classes, the student has %d) and re-initialised",
                 path, what, head, "/".join(map(str, old)), model.num_classes)
    elif fresh:
        log.info("init: %s (%s); no classifier in it: %s initialised (%d classes)", path, what, head, model.num_classes)
    else:
        log.info("init: %s (%s); classifier %s kept (%d classes)", path, what, head, model.num_classes)


def hub_cache() -> Path:
    """The Hugging Face hub cache as the environment names it now (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def pretrained_file(student: str, arch: str) -> tuple[str, int]:
    """(local file of timm's pretrained weights for ``arch``, its classes), found where timm
    would fetch it from (the hub cache, else torch hub's checkpoints), or a one-line error."""
    from timm.models import get_pretrained_cfg

    pcfg = get_pretrained_cfg(arch)
    if pcfg is None or not (pcfg.hf_hub_id or pcfg.url or pcfg.file):
        raise TrainError(f"{student}: timm has no pretrained weights for {arch}; drop `pretrained` or pass `init` PATH")
    looked = []
    if pcfg.file:
        looked.append(Path(pcfg.file))
    if pcfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = pcfg.hf_hub_id.partition("@")
        names = [pcfg.hf_hub_filename] if pcfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for name in names:
            hit = try_to_load_from_cache(repo, name, cache_dir=hub_cache(), revision=revision or None)
            if isinstance(hit, str):
                return hit, pcfg.num_classes
        looked.append(hub_cache() / f"models--{repo.replace('/', '--')}")
    if pcfg.url:
        looked.append(Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(pcfg.url.split("?")[0]))
    for f in looked:
        if f.is_file():
            return str(f), pcfg.num_classes
    raise TrainError(f"{student}: the pretrained weights of {arch}.{pcfg.tag} are not in the local cache (looked in "
                     f"{', '.join(map(str, looked))}); nothing is downloaded: fetch them on a machine with a network "
                     "(HF_HOME names the cache) or pass `init` PATH")


def log_pretrained(arch: str, path: str, classes: int, num_classes: int) -> None:
    if classes == num_classes:
        log.info("pretrained: %s from %s; classifier kept (%d classes)", arch, path, classes)
    else:
        log.info("pretrained: %s from %s; classifier dropped (%d classes, the student has %d) and re-initialised",
                 arch, path, classes, num_classes)
