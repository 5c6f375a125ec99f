"""Stage 2: train a timm student from a logit store, with no teacher in the loop.

Three modes share one loop, so comparisons are fair: offline KD from a store (default),
``no_kd`` (supervised on ground-truth labels) and ``online_teacher`` (the same loss with the
teacher run every step on the same views). Every epoch visits all rows in a fresh seeded order
(:func:`tinydistill.stream.epoch_order`: store chunks dealt to ranks, batches inside a rank's
share) that is the same in all three modes for the same seed. The loop is timm's parts: ``create_model``,
``create_optimizer_v2``, ``CosineLRScheduler`` with warmup, ``ModelEmaV3``, gradient
clipping, AMP, DDP under torchrun.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .config import TrainConfig, parse_kv  # noqa: F401  (TrainConfig is this stage's config)
from .errors import Stopped, TrainError, one_line
from . import checkpoint, dist
from .losses import DistillLoss, Objective, mixed_labels
from .sources import open_source
from .nodecache import node_local
from .batch import Batch
from .ranktargets import RankTargets
from .render_device import DeviceRenderer
from .signals import ignore_in_worker
from .stream import Meter, ViewStream, epoch_order, epoch_steps, train_items
from .teachers import wants_channels_last
from .traintargets import target_provider
from .views import Views, prepare

log = logging.getLogger("tinydistill")


# ---- set-up ---------------------------------------------------------------------------------------

def resolve(cfg: TrainConfig) -> TrainConfig:
    """Defaults that depend on the machine: device and AMP dtype; ``model_kwargs`` as a dict."""
    device = cfg.device or dist.default_device()
    return dataclasses.replace(cfg, device=device, amp=cfg.amp or ("bf16" if device.startswith("cuda") else "none"),
                               model_kwargs=parse_kv(cfg.model_kwargs))


def _views_and_targets(cfg: TrainConfig, source, device="cpu"):
    """(store or None, spec, base seed of views, num_classes, teacher or None)."""
    if cfg.no_kd and cfg.online_teacher:
        raise TrainError("`no_kd` and `online_teacher` exclude each other")
    if cfg.no_kd or cfg.online_teacher:
        if cfg.logits:
            raise TrainError("`logits` is for offline KD; drop it with `no_kd` or `online_teacher`")
        teacher = None
        num_classes = source.num_classes
        if cfg.online_teacher:
            from .teachers import load_teacher

            teacher = load_teacher(cfg.online_teacher, cfg.teacher_weights, class_names=source.class_names,
                                   input_size=cfg.teacher_input_size)
            num_classes = teacher.num_classes
            if cfg.k is not None and not 1 <= cfg.k <= num_classes:
                raise TrainError(f"`k` {cfg.k}: must be between 1 and the teacher's {num_classes} classes")
        if cfg.like:  # the views of a store, so the baseline sees what offline KD sees
            from .replay import check_replay
            from .store import open_store

            like = open_store(cfg.like)
            if cfg.view_seed is not None:
                raise TrainError("`view_seed` and `like` exclude each other: `like` takes the store's seed")
            if cfg.no_kd:  # the store's head too (a 21k-class teacher's store over 1k-class data)
                num_classes = max(num_classes, like.num_classes)
            spec = check_replay(like, source, cfg.render, cfg.allow_renderer_change, device, cfg.decode)
            return None, spec, like.base_seed, num_classes, teacher
        seed = cfg.seed if cfg.view_seed is None else cfg.view_seed
        spec = dataclasses.replace(cfg.spec, renderer=cfg.render or cfg.spec.renderer).for_device(device)
        return None, spec, seed, num_classes, teacher
    if cfg.like:
        raise TrainError("`like` is for `no_kd` / `online_teacher`; offline KD replays the views of `logits`")
    if not cfg.logits:
        raise TrainError("`logits` STORE is required (or `no_kd` / `online_teacher` for the baselines)")
    from .replay import check_replay
    from .store import open_store

    store = open_store(cfg.logits)
    spec = check_replay(store, source, cfg.render, cfg.allow_renderer_change, device, cfg.decode)  # keys, spec, canary
    changed = sorted(k for k, v in cfg.spec.to_dict().items() if spec.to_dict().get(k) != v and k != "renderer")
    if cfg.expect_spec and changed:  # the renderer is --render's business
        raise TrainError(f"{cfg.logits}: the recipe's augmentation differs from the store's in {changed}")
    if cfg.epochs > store.epochs and not cfg.cycle_epochs:
        raise TrainError(f"{cfg.logits}: holds {store.epochs} epochs of views, `epochs` asks for {cfg.epochs} "
                         "(pass `cycle_epochs` to reuse them)")
    done = store.completed()
    for e in range(min(cfg.epochs, store.epochs)):
        if done[e] < 1.0:
            raise TrainError(f"{cfg.logits}: epoch {e} is {100 * done[e]:.1f}% complete; finish gen-logits first")
    return store, spec, store.base_seed, store.num_classes, None


def create_student(cfg: TrainConfig, num_classes: int, input_size: int, load_weights: bool = True):
    """The student, randomly initialised from the seed set before, then (``load_weights``: not
    on a resume, whose checkpoint replaces them) from ``init`` or timm's ``pretrained`` weights."""
    import timm

    from .weights import load_init, log_pretrained, pretrained_file

    arch = cfg.student.split(":", 1)[1] if cfg.student.startswith("timm:") else cfg.student
    if not timm.is_model(arch.split(".")[0]):
        raise TrainError(f"{cfg.student}: unknown student (not a timm model)")
    if cfg.init and cfg.pretrained:
        raise TrainError("`init` and `pretrained` exclude each other")
    kw = dict(pretrained=False, num_classes=num_classes, drop_path_rate=cfg.drop_path, **cfg.model_kwargs)
    if cfg.pretrained and load_weights:  # timm loads the cached file (its own key remapping, head drop)
        path, classes = pretrained_file(cfg.student, arch)
        kw.update(pretrained=True, pretrained_cfg_overlay={"file": path})
    try:
        try:
            model = timm.create_model(arch, img_size=input_size, **kw)
        except TypeError:  # models without an img_size argument (CNNs)
            model = timm.create_model(arch, **kw)
    except (TypeError, ValueError, AssertionError, RuntimeError, OSError, KeyError) as e:
        what = f"its pretrained weights {kw['pretrained_cfg_overlay']['file']}" if kw["pretrained"] else \
            (cfg.model_kwargs or "default arguments")
        raise TrainError(f"{cfg.student}: cannot build with {what} ({one_line(e)})") from e
    if kw["pretrained"]:
        log_pretrained(arch, path, classes, num_classes)
    if cfg.init and load_weights:
        load_init(model, cfg.init, cfg.student)
    return model


def val_labels(source, head_names: list[str], head: str) -> np.ndarray:
    """The labels of ``source`` (validation data) as ids of the student's head, whose classes
    are ``head_names`` (the store's, or the training data's): matched by class name, so a
    validation set with other classes, fewer, or another order is scored against the right
    ids. A class the head does not have is refused in one line (``head`` names where the
    head's classes come from)."""
    labels = np.asarray(source.labels)
    names = [str(n) for n in source.class_names]
    head_names = [str(n) for n in head_names]
    if names == head_names[:len(names)]:
        return labels
    pos = {n: i for i, n in reversed(list(enumerate(head_names)))}
    used = [names[i] for i in np.unique(labels[labels >= 0])]
    missing = [n for n in used if n not in pos]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise TrainError(f"{source.name}: `val_data` class(es) {', '.join(repr(n) for n in missing[:3])}{more} are not "
                         f"among the {len(head_names)} classes of {head}; validate on data whose class names are "
                         "the training classes'")
    log.info("%s: validation classes matched to the student's by name (%d of %d classes)", source.name,
             len(used), len(head_names))
    ids = np.array([pos.get(n, -1) for n in names] + [-1], dtype=np.int64)
    return ids[labels]  # label -1 (none) stays -1


def _val_loader(cfg: TrainConfig, input_size: int, mean, std, crop_pct: float, world: int, rank: int,
                head_names: list[str], head: str):
    from timm.data.transforms_factory import transforms_imagenet_eval

    source = open_source(cfg.val_data)
    require_labels(source, "`val_data` (top-1/top-5)")
    labels = val_labels(source, head_names, head)
    tf = transforms_imagenet_eval(img_size=input_size, crop_pct=crop_pct, mean=mean, std=std, interpolation="bicubic")

    class _Val(torch.utils.data.IterableDataset):
        """Contiguous rows per rank and worker, read in order (webdataset shards stream)."""

        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            wid, nw = (info.id, info.num_workers) if info else (0, 1)
            parts = np.array_split(np.arange(len(source)), world * nw)[rank * nw + wid]
            for r, img in source.read(parts.tolist()):
                if isinstance(img, Exception):
                    raise img
                yield tf(img.convert("RGB")), int(labels[r])

    loader = torch.utils.data.DataLoader(_Val(), batch_size=max(cfg.batch_size, 64), num_workers=min(cfg.workers, 4),
                                         worker_init_fn=ignore_in_worker)
    return loader, source


@torch.inference_mode()
def evaluate(model, loader, device, amp_dtype) -> dict[str, float]:
    """Top-1/top-5 (top-C with fewer than 5 classes), counted on the device: one host sync at the end."""
    model.eval()
    n, hits = 0, torch.zeros(2, dtype=torch.int64, device=device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(x)
        out = out[0] if isinstance(out, tuple) else out
        top = out.float().topk(min(5, out.shape[-1]), dim=1).indices.eq(y[:, None])  # [B, k]
        hits += torch.stack([top[:, 0].sum(), top.any(1).sum()])
        n += len(y)
    c1, c5 = hits.tolist()
    n, c1, c5 = dist.all_reduce([n, c1, c5])
    return {"top1": 100 * c1 / max(n, 1), "top5": 100 * c5 / max(n, 1)}


# ---- labels and dropped rows ----------------------------------------------------------------------

def require_labels(source, needed_by: str) -> None:
    """A one-line error when ``source`` lacks labels that ``needed_by`` (an option, in words) needs."""
    missing = int((np.asarray(source.labels) < 0).sum())
    if not missing:
        return
    from .sources import WebDatasetSource

    what = "has no labels" if missing == len(source) else f"has no label for {missing} of {len(source)} samples"
    if isinstance(source, WebDatasetSource):
        what += " (webdataset samples without a cls/label member)"
    raise TrainError(f"{source.name}: {what}; {needed_by} needs them (offline KD with the default `alpha` 1 "
                     "and `loss` soft_ce, kl, dist or bce trains without labels)")


def _labels_needed_by(cfg: TrainConfig, two_heads: bool) -> str:
    """The option that makes the objective use labels, in words (for :func:`require_labels`)."""
    if cfg.no_kd:
        return "`no_kd`"
    if cfg.loss == "hard":
        return "`loss` hard"
    if cfg.alpha < 1:
        return f"`alpha` {cfg.alpha} (< 1: a ground-truth term)"
    return f"the distilled student {cfg.student} (its class head learns the labels)" if two_heads else "the loss"


def _dropped(batch: Batch) -> tuple[torch.Tensor | None, int, int]:
    """(ids of the rows to keep, or None when all are kept; rows whose stored targets are NaN;
    other rows dropped) of a batch, from its CPU tensors alone (``valid``, ``logp``): no device
    sync. A store holds NaN targets for the views gen-logits skipped: unreadable images, or
    non-finite outputs of the teacher (an fp16 teacher that overflowed); the store does not say
    which. The other rows dropped are those whose image cannot be read now (``valid`` False)."""
    valid = batch.valid.bool()
    nan = torch.isnan(batch.logp).any(1) if batch.logp is not None else torch.zeros_like(valid)
    keep = valid & ~nan
    if bool(keep.all()):
        return None, 0, 0
    n_nan = int(nan.sum())
    return keep.nonzero().squeeze(1), n_nan, int((~keep).sum()) - n_nan


# ---- the loop ------------------------------------------------------------------------------------

class StepLosses:
    """Each step's loss, kept on the device and read back every ``log_interval`` steps in one
    host sync (a read every step would keep the CPU from queueing work ahead of the GPU). A read
    writes the steps' lines to steps.jsonl and raises the one-line error at the first non-finite
    loss (under DDP every rank raises when any rank saw one: the ranks read at the same steps).
    Named terms of the loss (``parts``, e.g. ``attention_loss``) are read with it and written
    beside it; :attr:`part_sums` adds them up over the epoch (one value at a time, so the sums
    do not depend on where the reads fell: a run resumed mid-epoch ends with the same sums).
    A read is also where the ranks agree to stop (:attr:`stop_any`): a rank asked to stop
    (a signal) tells the others in the reduction the read already makes."""

    def __init__(self, epoch: int, steps_f, world: int = 1, sums: dict | None = None):
        self.epoch, self.steps_f, self.world = epoch, steps_f, world
        self.losses: list[torch.Tensor] = []  # device tensors (the loss, then its parts), not yet read
        self.meta: list[tuple[int, float]] = []  # (step, lr) of each
        self.names: list[str] = []  # the parts' names
        self.sum, self.count, self.last = 0.0, 0, float("nan")
        self.part_sums: dict[str, float] = {}
        self.stop_any = False
        if sums:  # a part-done epoch's, from a checkpoint
            self.sum, self.count, self.last = sums["loss_sum"], sums["loss_count"], sums["loss_last"]
            self.part_sums = dict(sums["part_sums"])

    def sums(self) -> dict:
        return {"loss_sum": self.sum, "loss_count": self.count, "loss_last": self.last,
                "part_sums": dict(self.part_sums)}

    def __len__(self) -> int:
        return len(self.losses)

    def add(self, loss: torch.Tensor, step: int, lr: float, parts: dict | None = None) -> None:
        self.names = list(parts or {})
        self.losses.append(torch.stack([loss.detach().float(), *(p.detach().float() for p in parts.values())])
                           if parts else loss.detach().float().reshape(1))
        self.meta.append((step, lr))

    def read(self, stop: bool = False) -> float:
        """Read the pending losses (the host sync); returns the last step's loss. ``stop``:
        this rank was asked to stop; :attr:`stop_any` then says whether any rank was."""
        if not self.losses:
            self.stop_any = stop
            return self.last
        rows = torch.stack(self.losses).cpu().tolist()
        values = [r[0] for r in rows]
        meta, self.losses, self.meta = self.meta, [], []
        bad = next(((s, v) for (s, _), v in zip(meta, values) if not math.isfinite(v)), None)
        elsewhere, self.stop_any = float(bad is not None), stop
        if self.world > 1:
            elsewhere, stops = dist.all_reduce([elsewhere, float(stop)])
            self.stop_any = stops > 0
        elsewhere = self.world > 1 and elsewhere > 0
        for (s, lr), r in zip(meta, rows):
            if bad is not None and s == bad[0]:
                break
            if self.steps_f:
                line = {"epoch": self.epoch, "step": s, "loss": r[0], **dict(zip(self.names, r[1:])), "lr": lr}
                self.steps_f.write(json.dumps(line) + "\n")
        if bad is not None:
            raise TrainError(f"epoch {self.epoch} step {bad[0]}: loss is {bad[1]}; lower `lr` or check the store")
        if elsewhere:
            raise TrainError(f"epoch {self.epoch}: another rank's loss is not finite by step {meta[-1][0]}; "
                             "lower `lr` or check the store")
        for r in rows:
            self.sum += r[0]
            for j, name in enumerate(self.names):
                self.part_sums[name] = self.part_sums.get(name, 0.0) + r[1 + j]
        self.count, self.last = self.count + len(values), values[-1]
        return self.last


@dataclasses.dataclass
class _Run:
    """What a training run holds between epochs (built by :func:`_build`)."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    out: Path
    source: Any
    store: Any  # the logit store (offline KD), or None
    tap: Any  # the student's AttentionTap (attention_weight > 0), or None
    core: Views
    num_classes: int
    input_size: int
    model: torch.nn.Module
    ddp: torch.nn.Module  # the model, wrapped by DDP under torchrun
    parts: dict  # what a checkpoint holds: model, optimizer, scheduler, scaler, ema
    targets: Callable  # batch, images -> the teacher's values by field ({} without a teacher)
    objective: Objective
    use_labels: bool
    distilled: bool
    mean: tuple
    std: tuple
    val: Any  # the validation loader, or None
    min_rows: int = 1  # views a training step needs: 2 for a student with BatchNorm
    step: int = 0
    best: float = -1.0
    saved: tuple | None = None  # (epoch, step, whole epoch?) of the last checkpoint, None before the first

    @property
    def view_seed(self) -> int:
        return self.core.base_seed

    @functools.cached_property
    def channels_last(self) -> bool:
        """A CNN student: its weights and inputs NHWC (teachers.wants_channels_last)."""
        return wants_channels_last(self.model)


def _build(cfg: TrainConfig) -> tuple[_Run, int, dict | None, dict | None]:
    """Source, store, student, optimizer and the rest from a resolved config; (run, first epoch,
    this rank's place in a part-done first epoch or None, the checkpoint resumed or None)."""
    from timm.data import resolve_data_config
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3

    rank, world, device = dist.setup(cfg.device, cfg.workers)
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainError(f"{cfg.out}: cannot create output directory ({e.strerror})") from e
    ck = _check_out(cfg, out)
    source = open_source(cfg.data)
    store, spec, view_seed, num_classes, teacher = _views_and_targets(cfg, source, device)
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise TrainError(f"`num_classes` {cfg.num_classes} does not match the {'store' if store else 'data'}'s "
                         f"{num_classes} classes")
    if store is not None and store.k > num_classes:
        raise TrainError(f"{cfg.logits}: K={store.k} exceeds the student head's {num_classes} classes")
    input_size = cfg.input_size or spec.img_size

    torch.manual_seed(cfg.seed)
    model = create_student(cfg, num_classes, input_size, load_weights=ck is None)  # the same on every rank
    checkpoint.seed_rng(cfg.seed + rank)  # training draws (drop-path masks) differ across ranks, as in timm
    data_cfg = resolve_data_config({}, model=model)
    distilled = hasattr(model, "set_distilled_training")
    dist.gpu_defaults(benchmark=True)  # fixed shapes: cuDNN picks its fastest algorithms once
    model.to(device, memory_format=torch.channels_last if wants_channels_last(model) else torch.preserve_format)
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
    min_rows = 2 if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()) else 1
    steps_per_epoch = max(1, epoch_steps(len(source), cfg.batch_size, world, min_rows))
    parts = {"model": model, "optimizer": optimizer,
             "scheduler": CosineLRScheduler(optimizer, t_initial=cfg.epochs * steps_per_epoch, lr_min=cfg.min_lr,
                                            warmup_lr_init=cfg.warmup_lr, t_in_epochs=False,
                                            warmup_t=int(cfg.warmup_epochs * steps_per_epoch)),
             "scaler": torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16"),
             "ema": ModelEmaV3(model, decay=cfg.ema, device=device) if cfg.ema else None}
    # after the EMA copy: the student's attention hooks stay on the trained model
    targets, attention, tap = target_provider(cfg, store, teacher, model, num_classes, device)
    objective = Objective(None if cfg.no_kd else
                          DistillLoss(num_classes, kind=cfg.loss, temperature=cfg.temperature, alpha=cfg.alpha,
                                      dist_beta=cfg.dist_beta, dist_gamma=cfg.dist_gamma),
                          terms=[(cfg.attention_weight, attention)] if attention is not None else None)
    use_labels = objective.needs_labels(two_heads=distilled)  # pure distillation trains on unlabeled data
    if use_labels:
        require_labels(source, _labels_needed_by(cfg, distilled))
    start, step, best, partial = (checkpoint.resume(out / "last.pth", ck, parts, rank, world, cfg.seed, device)
                                  if ck is not None else (0, 0, -1.0, None))
    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    mean, std = data_cfg["mean"], data_cfg["std"]
    val = None
    if cfg.val_data:
        if store is not None:
            head_names, head = store.class_names, f"the store {cfg.logits}"
        elif teacher is not None and teacher.class_names and teacher.num_classes != source.num_classes:
            head_names, head = teacher.class_names, f"the teacher {cfg.online_teacher}"
        else:
            head_names, head = source.class_names, f"the training data {cfg.data}"
        val, _ = _val_loader(cfg, input_size, mean, std, cfg.val_crop_pct or data_cfg.get("crop_pct", 0.875), world,
                             rank, head_names, head)
    core = Views(source, spec, view_seed, skip_bad=store is not None, device=device, decode=cfg.decode)
    run = _Run(cfg, rank, world, device, out, source, store, tap, core, num_classes, input_size, model, ddp, parts,
               targets, objective, use_labels, distilled, mean, std, val, min_rows, step, best)
    if ck is not None:
        run.saved = (ck["epoch"] if partial is None else ck["epoch"] + 1, ck["step"], partial is None)
    return run, start, partial, ck


RUN_FILES = ("last.pth", "best.pth", "last.tmp", "best.tmp", "metrics.jsonl", "steps.jsonl", "config.json", "tb")


def _check_out(cfg: TrainConfig, out: Path) -> dict | None:
    """Refuse to train over a run (one line naming `resume` and `overwrite`); with `resume`,
    load its checkpoint and refuse a changed option that changes the result. Returns the
    checkpoint (resume) or None. Nothing is deleted here: `overwrite` clears the old run only
    once the new one has passed its checks (:class:`_Logs`)."""
    if cfg.resume and cfg.overwrite:
        raise TrainError("`resume` and `overwrite` exclude each other")
    last = out / "last.pth"
    if not cfg.resume:
        if last.exists() and not cfg.overwrite:
            raise TrainError(f"{out}: holds a training run (last.pth); pass `resume` to continue it or `overwrite` "
                             "to start afresh (deleting it)")
        return None
    ck = checkpoint.load(last)
    checkpoint.check_config(last, ck, _compared(_cfg_dict(cfg)), _compared(checkpoint.config_defaults(TrainConfig)))
    return ck


def _compared(config: dict) -> dict:
    """A config dict (:func:`_cfg_dict`) as a resume compares it: the augmentation options
    (``spec``) as options of their own, but only without a store (a store replays its own
    views: its path is what is compared)."""
    d = dict(config)
    spec = d.pop("spec", None) or {}
    if not d.get("logits"):
        d.update(spec)
    return d


def _step(run: _Run, batch: Batch) -> tuple[torch.Tensor, dict]:
    """One optimizer step on a batch; returns its loss and the loss's named terms
    (``attention_loss``), on the device (nothing waits for them)."""
    cfg, dev, p = run.cfg, run.device, run.parts
    amp = dist.amp_dtype(cfg.amp)
    images = batch.image.to(dev, non_blocking=True)
    labels = None  # not built when the loss needs none (unlabeled data: label -1)
    if run.use_labels:
        labels = mixed_labels(batch.label.to(dev, non_blocking=True), batch.partner_label.to(dev, non_blocking=True),
                              batch.lam.to(dev, non_blocking=True), run.num_classes,
                              smoothing=cfg.smoothing if cfg.no_kd else 0.0)
    targets = run.targets(batch, images)
    with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
        x = prepare(images, run.input_size, run.mean, run.std)
        outputs = run.ddp(x.contiguous(memory_format=torch.channels_last) if run.channels_last else x)
    maps = run.tap.pop() if run.tap is not None else None
    parts: dict = {}
    if len(batch):
        loss = run.objective(outputs, labels, targets, maps, parts=parts)
    else:  # DDP: zero gradients, so this rank's all-reduce goes along with the others'
        loss = sum(o.float().sum() for o in (outputs if isinstance(outputs, tuple) else (outputs,))) * 0.0
    p["optimizer"].zero_grad(set_to_none=True)
    p["scaler"].scale(loss).backward()
    if cfg.clip_grad:
        p["scaler"].unscale_(p["optimizer"])
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip_grad)
    p["scaler"].step(p["optimizer"])
    p["scaler"].update()
    run.step += 1
    p["scheduler"].step_update(num_updates=run.step)
    if p["ema"] is not None:
        p["ema"].update(run.model, step=run.step)
    return loss, parts


@functools.lru_cache(maxsize=4)
def _like_chunk_rows(like: str | None) -> int | None:
    """The `like` store's chunk rows: no-KD and online runs deal ranks the same blocks as offline KD."""
    from .store import open_store

    return open_store(like).chunk_rows if like else None


def _epoch(run: _Run, epoch: int, logs: "_Logs", on_step, stop=None, partial: dict | None = None) -> tuple[dict, dict | None]:
    """One epoch over a fresh order of all rows, from its start or, resumed, from a checkpoint's
    place in it (``partial``); returns (its metrics row, None), or, when asked to ``stop``
    (:class:`~tinydistill.signals.StopRequest`), (partial row, this rank's place) at the step."""
    from tqdm import tqdm

    cfg, t0 = run.cfg, time.time()
    # every epoch a fresh order: store chunks dealt to ranks at random, batches inside a rank's
    # share (stream.epoch_order); the same in every mode (no-KD / online: the `like` store's chunks)
    view_epoch = epoch % run.store.epochs if run.store is not None else epoch
    spec = run.core.spec
    chunk_rows = run.store.chunk_rows if run.store is not None else _like_chunk_rows(cfg.like)
    order = epoch_order(len(run.source), spec.mix_group, spec.mixing, run.view_seed, view_epoch, cfg.seed, epoch,
                        chunk_rows, run.world, run.rank)
    items = train_items(order, view_epoch, cfg.batch_size,
                        epoch_steps(len(run.source), cfg.batch_size, run.world, run.min_rows), run.min_rows)
    total, done = len(items), (partial or {}).get("seen", 0)
    items = items[done:]  # resumed mid-epoch: the batches not yet trained on
    stream = ViewStream(run.core, items)  # the torch renderer: workers ship bytes + records
    # each chunk once per rank; from object storage through a node-local mirror (once per node),
    # the next epoch's targets downloaded while this one trains
    following = (epoch + 1) % run.store.epochs if run.store is not None and epoch + 1 < cfg.epochs else None
    joined = RankTargets(node_local(run.store, view_epoch, following), items) if run.store is not None else None
    # the loader's own generator: creating it draws nothing from the generators a checkpoint
    # restores, so a run resumed mid-epoch draws (drop-path) what an uninterrupted one does
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.workers,
                                         pin_memory=run.device.type == "cuda",
                                         prefetch_factor=4 if cfg.workers else None,
                                         worker_init_fn=ignore_in_worker,
                                         generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
    renderer = DeviceRenderer(run.core, run.device) if stream.encoded else None
    meter = Meter(cfg.workers, renderer)
    run.model.train()
    if run.distilled:
        run.model.set_distilled_training(True)
    bar = tqdm(total=total, initial=done, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", file=sys.stderr,
               disable=not (cfg.progress and run.rank == 0), dynamic_ncols=True)
    p = partial or {}
    losses = StepLosses(epoch, logs.steps_f, run.world, p.get("losses"))
    seen, stopping = done, False
    views, nan_views, bad_views, lone_views = (p.get(k, 0) for k in ("views", "nan_views", "bad_views", "lone_views"))
    rendered = renderer(loader) if renderer else None
    batches = meter(rendered if rendered is not None else loader)
    try:
        for batch in batches:
            batch = joined.join(batch) if joined is not None else batch
            seen += 1
            keep, n_nan, n_bad = _dropped(batch)  # unreadable images, NaN targets: CPU masks, no device sync
            if keep is not None:
                nan_views, bad_views = nan_views + n_nan, bad_views + n_bad
                batch = batch.select(keep)
            if len(batch) < run.min_rows:  # no view left, or one a BatchNorm student cannot train on
                lone_views += len(batch)
                if run.world == 1:  # nothing to learn from: no step
                    bar.update(1)
                    if stop is not None and stop.is_set() and seen < total:
                        losses.read()
                        stopping = True
                        break
                    continue
                batch = batch.select(torch.zeros(0, dtype=torch.int64))  # DDP: an empty step, with the other ranks
            loss, parts = _step(run, batch)
            lr = run.parts["optimizer"].param_groups[0]["lr"]
            losses.add(loss, run.step, lr, parts)  # no host sync: read every `log_interval` steps
            views += len(batch)
            bar.update(1)
            info = {"epoch": epoch, "step": run.step, "views": len(batch)}
            asked = stop is not None and stop.is_set()
            if len(losses) >= cfg.log_interval or seen >= total:
                info["loss"] = losses.read(asked)
                stopping = losses.stop_any  # under DDP the ranks agree here, at a read
                bar.set_postfix(loss=f"{info['loss']:.4f}", lr=f"{lr:.2e}")
            elif asked and run.world == 1:  # one process: stop at this step
                info["loss"] = losses.read()
                stopping = True
            if on_step is not None:
                on_step(info)
            if stopping and seen < total:
                break
        losses.read()  # the epoch's last steps (when the stream yielded more batches than it said)
    finally:
        batches.close()  # the render thread and the workers end here, not when garbage is collected
        if rendered is not None:
            rendered.close()
        bar.close()
        if joined is not None:
            joined.close()
    seconds = p.get("seconds", 0.0) + time.time() - t0
    if stopping and seen < total:  # this rank's place in the epoch, for a checkpoint at this step
        return {"epoch": epoch, "step": run.step}, {
            "seen": seen, "views": views, "nan_views": nan_views, "bad_views": bad_views, "lone_views": lone_views,
            "losses": losses.sums(), "seconds": seconds}
    views, nan_views, bad_views, lone_views = (int(v) for v in dist.all_reduce([views, nan_views, bad_views,
                                                                                lone_views]))
    if run.rank == 0 and nan_views + bad_views:
        log.warning("%s: epoch %d: %d views dropped from training: %d with NaN targets (views gen-logits skipped: "
                    "unreadable images or non-finite teacher outputs, e.g. an fp16 teacher that overflowed), "
                    "%d with images unreadable now", cfg.logits or cfg.data, epoch, nan_views + bad_views,
                    nan_views, bad_views)
    row = {"epoch": epoch, "step": run.step, "train_loss": losses.sum / max(losses.count, 1),
           **{f"train_{name}": v / max(losses.count, 1) for name, v in losses.part_sums.items()},
           "lr": run.parts["optimizer"].param_groups[0]["lr"], "views": views,
           "dropped_views": nan_views + bad_views + lone_views, "nan_target_views": nan_views,
           "unreadable_views": bad_views, "seconds": round(seconds, 2), "load": meter.report()}
    if run.min_rows > 1:
        row["lone_views"] = lone_views  # left alone in a batch by dropped views: BatchNorm needs 2
    return row, None


def _end_epoch(run: _Run, row: dict, logs: "_Logs") -> None:
    """Validate, save the checkpoints, then log the epoch's row (every rank takes part): the row
    is written only once the checkpoint that holds its epoch is, and the checkpoint keeps the row
    too, so a run stopped anywhere in between resumes to the same logs."""
    amp = dist.amp_dtype(run.cfg.amp)
    if run.val is not None:
        if run.distilled:
            run.model.set_distilled_training(False)
        row.update({f"val_{k}": v for k, v in evaluate(run.model, run.val, run.device, amp).items()})
        if run.parts["ema"] is not None:
            ema = run.parts["ema"].module
            row.update({f"ema_val_{k}": v for k, v in evaluate(ema, run.val, run.device, amp).items()})
    score = max(row.get("val_top1", -1.0), row.get("ema_val_top1", -1.0))
    _save(run, row["epoch"], logs, row=row, best=score > run.best)
    run.best = max(run.best, score)
    log.info("epoch %d: %s", row["epoch"], json.dumps(row))
    dist.barrier()


def _save(run: _Run, epoch: int, logs: "_Logs", row: dict | None = None, best: bool = False,
          partial: dict | None = None) -> None:
    """Save last.pth (and best.pth when ``best``) at this step: after a whole epoch (its
    metrics ``row``), or during one (``partial``: every rank's place in it). Every rank takes
    part (the RNG states and places are gathered); rank 0 writes."""
    rngs = dist.gather_parts(checkpoint.rng_state(run.device), 0)  # every rank's generators (all ranks call it)
    places = dist.gather_parts(partial, 0) if partial is not None else None
    if run.rank == 0:
        logs.flush()  # steps.jsonl holds every step the checkpoint holds
        ck = {name: obj.state_dict() if obj is not None else None for name, obj in run.parts.items()}
        ck.update(epoch=epoch if partial is None else epoch - 1, step=run.step, partial=places, metrics=row,
                  best=max(run.best, row.get("val_top1", -1.0), row.get("ema_val_top1", -1.0)) if row else run.best,
                  rng=rngs[0], rng_ranks=rngs, amp=run.cfg.amp, config=_cfg_dict(run.cfg),
                  num_classes=run.num_classes, input_size=run.input_size)
        if best:  # best first: a failure between the two leaves last.pth (and the logs) one epoch back
            checkpoint.save(run.out / "best.pth", ck)
        checkpoint.save(run.out / "last.pth", ck)
        if row is not None:
            logs.write(row)
    run.saved = (epoch, run.step, partial is None)


class _Logs:
    """Rank 0's records: metrics.jsonl (a row per epoch), steps.jsonl (a line per step),
    TensorBoard when installed, and config.json. A fresh run clears an old run's files (only
    `overwrite` lets it start over a checkpoint); a resumed run cuts its logs back to the
    checkpoint's step, so they read as an uninterrupted run's, line for line, whatever stopped
    it (kill -9, a full disk, a signal). config.json is written once, when the run starts."""

    def __init__(self, run: _Run, ck: dict | None = None):
        lead = run.rank == 0
        self.metrics_f = self.steps_f = self.tb = None
        if not lead:
            return
        if ck is None:
            _clear(run.out, overwrite=run.cfg.overwrite)
        else:
            _cut(run.out / "steps.jsonl", ck["step"])
            _cut(run.out / "metrics.jsonl", ck["step"], ck.get("metrics"))
        self.metrics_f = open(run.out / "metrics.jsonl", "a")
        self.steps_f = open(run.out / "steps.jsonl", "a")
        self.tb = _tensorboard(run.out, purge_step=ck["epoch"] + 1 if ck is not None else None)
        if not (run.out / "config.json").exists():
            (run.out / "config.json").write_text(json.dumps(_cfg_dict(run.cfg), indent=1, default=str))

    def flush(self) -> None:
        for f in (self.metrics_f, self.steps_f):
            f.flush()
            os.fsync(f.fileno())

    def write(self, row: dict) -> None:
        self.metrics_f.write(json.dumps(row) + "\n")
        self.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(k, v, row["epoch"])

    def close(self) -> None:
        for f in (self.metrics_f, self.steps_f):
            if f:
                f.close()
        if self.tb is not None:
            self.tb.close()


def _clear(out: Path, overwrite: bool) -> None:
    """Delete the files of an old run in ``out`` (only these: other files stay)."""
    found = [n for n in RUN_FILES if (out / n).exists()]
    if found and not overwrite:  # logs of a run that stopped before its first checkpoint: nothing to resume
        log.info("%s: starting afresh (the run here saved no checkpoint): replacing %s", out, ", ".join(found))
    for n in found:
        shutil.rmtree(out / n) if (out / n).is_dir() else (out / n).unlink()


def _cut(path: Path, step: int, last_row: dict | None = None) -> None:
    """Keep the lines of a JSONL log up to ``step`` (a line torn by a kill ends it), then
    ``last_row`` if the log lacks it (a run stopped between its checkpoint and its row)."""
    tmp, last = path.with_suffix(".cut"), None
    with open(tmp, "w") as out:
        if path.exists():
            with open(path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        break
                    if rec["step"] > step:
                        break
                    out.write(line if line.endswith("\n") else line + "\n")
                    last = rec
        if last_row is not None and (last is None or last["epoch"] != last_row["epoch"]):
            out.write(json.dumps(last_row) + "\n")
    os.replace(tmp, path)


@dist.keeps_threads
def train_student(cfg: TrainConfig, on_step: Callable[[dict], None] | None = None, stop=None) -> dict[str, Any]:
    """Train ``cfg.student``; returns the last epoch's metrics. ``on_step`` (optional) is
    called after every optimizer step with ``{"epoch", "step", "views"}``, plus ``"loss"`` (that
    step's) at the steps where the losses are read back from the device: every ``log_interval``
    steps and the last step of each epoch. There the step has finished on the device; elsewhere
    it may only be queued (the loop does not wait for the GPU between reads).

    ``stop`` (optional, a :class:`~tinydistill.signals.StopRequest`, set by SIGTERM or SIGINT
    in the CLI): once set, the run saves a checkpoint at the current step (one process: the
    step in progress; under torchrun: the next loss read, at most `log_interval` steps on, where
    the ranks agree) and raises :class:`~tinydistill.errors.Stopped`; resumed, it goes on to the
    same losses as an uninterrupted run. KeyboardInterrupt (a second Ctrl-C) also ends in
    Stopped, naming what the last checkpoint kept."""
    cfg = resolve(cfg)
    run, start, partial, ck = _build(cfg)
    logs = _Logs(run, ck)
    summary: dict = {}
    try:
        for epoch in range(start, cfg.epochs):
            if _stop_agreed(run, stop):  # asked during the last validation or checkpoint: that one is kept
                raise _stopped(run, stop.signum, "")
            summary, place = _epoch(run, epoch, logs, on_step, stop, partial)
            partial = None
            if place is not None:
                _save(run, epoch, logs, partial=place)
                dist.barrier()  # no rank exits (and makes torchrun stop the others) before rank 0 has saved
                raise _stopped(run, stop.signum, f" at epoch {epoch} step {run.step}")
            _end_epoch(run, summary, logs)
    except KeyboardInterrupt:
        raise _stopped(run, signal.SIGINT, "") from None
    finally:
        logs.close()
    return {"out": str(run.out), "epochs": cfg.epochs, "best_val_top1": run.best if run.best >= 0 else None,
            "mode": "no_kd" if cfg.no_kd else ("online" if cfg.online_teacher else "offline"), **summary}


def _stop_agreed(run: _Run, stop) -> bool:
    """Whether any rank was asked to stop (one reduction per epoch under torchrun)."""
    asked = stop is not None and stop.is_set()
    return dist.all_reduce([float(asked)])[0] > 0 if run.world > 1 else asked


def _stopped(run: _Run, signum: int, where: str) -> Stopped:
    """The one-line message of a stopped run: what its last checkpoint kept, and how to go on."""
    name = signal.Signals(signum).name
    if run.saved is None:
        return Stopped(f"{run.out}: stopped by {name}{where} before the first checkpoint: nothing kept; run the "
                       "same command again to start over", signum)
    epoch, step, whole = run.saved
    kept = f"end of epoch {epoch}, step {step}" if whole else f"epoch {epoch}, step {step}"
    return Stopped(f"{run.out}: stopped by {name}{where}; kept last.pth ({kept}) and the logs up to it: continue "
                   "with the same command and `resume`", signum)


def _cfg_dict(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d["spec"] = cfg.spec.to_dict()
    return d


def _tensorboard(out: Path, purge_step: int | None = None):
    """A SummaryWriter in out/tb (None without tensorboard); ``purge_step``: a resumed run's
    first epoch (events from it on, written before the stop, are dropped)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: JSONL only
        return None
    return SummaryWriter(str(out / "tb"), purge_step=purge_step)
