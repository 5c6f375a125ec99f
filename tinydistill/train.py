"""Stage 2: train a timm student from a logit store, with no teacher in the loop.

Three modes share one loop, so comparisons are fair: offline KD from a store (default),
``no_kd`` (supervised on ground-truth labels) and ``online_teacher`` (the same loss with the
teacher run every step on the same views). Every epoch visits all rows in a fresh seeded order
(:func:`tinydistill.stream.epoch_order`) that is the same in all three modes for the same seed. The loop is timm's parts: ``create_model``,
``create_optimizer_v2``, ``CosineLRScheduler`` with warmup, ``ModelEmaV3``, gradient
clipping, AMP, DDP under torchrun.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .config import TrainConfig, parse_kv  # noqa: F401  (TrainConfig is this stage's config)
from .errors import TrainError, one_line
from . import checkpoint, dist
from .losses import DistillLoss, Objective, mixed_labels
from .sources import open_source
from .nodecache import node_local
from .batch import Batch
from .ranktargets import RankTargets
from .render_device import DeviceRenderer
from .stream import Meter, ViewStream, epoch_order, train_items
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
            spec = check_replay(like, source, cfg.render, cfg.allow_renderer_change, device)
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
    spec = check_replay(store, source, cfg.render, cfg.allow_renderer_change, device)  # keys, spec, canary
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


def create_student(cfg: TrainConfig, num_classes: int, input_size: int):
    import timm

    arch = cfg.student.split(":", 1)[1] if cfg.student.startswith("timm:") else cfg.student
    if not timm.is_model(arch.split(".")[0]):
        raise TrainError(f"{cfg.student}: unknown student (not a timm model)")
    kw = dict(pretrained=False, num_classes=num_classes, drop_path_rate=cfg.drop_path, **cfg.model_kwargs)
    try:
        try:
            return timm.create_model(arch, img_size=input_size, **kw)
        except TypeError:  # models without an img_size argument (CNNs)
            return timm.create_model(arch, **kw)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise TrainError(f"{cfg.student}: cannot build with {cfg.model_kwargs or 'default arguments'} "
                         f"({one_line(e)})") from e


def _val_loader(cfg: TrainConfig, input_size: int, mean, std, crop_pct: float, world: int, rank: int):
    from timm.data.transforms_factory import transforms_imagenet_eval

    source = open_source(cfg.val_data)
    require_labels(source, "`val_data` (top-1/top-5)")
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
                yield tf(img.convert("RGB")), int(source.labels[r])

    loader = torch.utils.data.DataLoader(_Val(), batch_size=max(cfg.batch_size, 64), num_workers=min(cfg.workers, 4))
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
                     "and `loss` soft_ce or kl trains without labels)")


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
    beside it; :attr:`part_sums` adds them up over the epoch."""

    def __init__(self, epoch: int, steps_f, world: int = 1):
        self.epoch, self.steps_f, self.world = epoch, steps_f, world
        self.losses: list[torch.Tensor] = []  # device tensors (the loss, then its parts), not yet read
        self.meta: list[tuple[int, float]] = []  # (step, lr) of each
        self.names: list[str] = []  # the parts' names
        self.sum, self.count, self.last = 0.0, 0, float("nan")
        self.part_sums: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self.losses)

    def add(self, loss: torch.Tensor, step: int, lr: float, parts: dict | None = None) -> None:
        self.names = list(parts or {})
        self.losses.append(torch.stack([loss.detach().float(), *(p.detach().float() for p in parts.values())])
                           if parts else loss.detach().float().reshape(1))
        self.meta.append((step, lr))

    def read(self) -> float:
        """Read the pending losses (the host sync); returns the last step's loss."""
        if not self.losses:
            return self.last
        rows = torch.stack(self.losses).cpu().tolist()
        values = [r[0] for r in rows]
        meta, self.losses, self.meta = self.meta, [], []
        bad = next(((s, v) for (s, _), v in zip(meta, values) if not math.isfinite(v)), None)
        elsewhere = self.world > 1 and dist.all_reduce([float(bad is not None)])[0] > 0
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
        self.sum, self.count, self.last = self.sum + sum(values), self.count + len(values), values[-1]
        for j, name in enumerate(self.names):
            self.part_sums[name] = self.part_sums.get(name, 0.0) + sum(r[1 + j] for r in rows)
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
    step: int = 0
    best: float = -1.0

    @property
    def view_seed(self) -> int:
        return self.core.base_seed

    @functools.cached_property
    def channels_last(self) -> bool:
        """A CNN student: its weights and inputs NHWC (teachers.wants_channels_last)."""
        return wants_channels_last(self.model)


def _build(cfg: TrainConfig) -> tuple[_Run, int]:
    """Source, store, student, optimizer and the rest from a resolved config; (run, first epoch)."""
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
    source = open_source(cfg.data)
    store, spec, view_seed, num_classes, teacher = _views_and_targets(cfg, source, device)
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise TrainError(f"`num_classes` {cfg.num_classes} does not match the {'store' if store else 'data'}'s "
                         f"{num_classes} classes")
    if store is not None and store.k > num_classes:
        raise TrainError(f"{cfg.logits}: K={store.k} exceeds the student head's {num_classes} classes")
    input_size = cfg.input_size or spec.img_size

    torch.manual_seed(cfg.seed)
    model = create_student(cfg, num_classes, input_size)  # the same initial weights on every rank
    checkpoint.seed_rng(cfg.seed + rank)  # training draws (drop-path masks) differ across ranks, as in timm
    data_cfg = resolve_data_config({}, model=model)
    distilled = hasattr(model, "set_distilled_training")
    dist.gpu_defaults(benchmark=True)  # fixed shapes: cuDNN picks its fastest algorithms once
    model.to(device, memory_format=torch.channels_last if wants_channels_last(model) else torch.preserve_format)
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(source) / (cfg.batch_size * world)))
    parts = {"model": model, "optimizer": optimizer,
             "scheduler": CosineLRScheduler(optimizer, t_initial=cfg.epochs * steps_per_epoch, lr_min=cfg.min_lr,
                                            warmup_lr_init=cfg.warmup_lr, t_in_epochs=False,
                                            warmup_t=int(cfg.warmup_epochs * steps_per_epoch)),
             "scaler": torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16"),
             "ema": ModelEmaV3(model, decay=cfg.ema, device=device) if cfg.ema else None}
    # after the EMA copy: the student's attention hooks stay on the trained model
    targets, attention, tap = target_provider(cfg, store, teacher, model, num_classes, device)
    objective = Objective(None if cfg.no_kd else
                          DistillLoss(num_classes, kind=cfg.loss, temperature=cfg.temperature, alpha=cfg.alpha),
                          terms=[(cfg.attention_weight, attention)] if attention is not None else None)
    use_labels = objective.needs_labels(two_heads=distilled)  # pure distillation trains on unlabeled data
    if use_labels:
        require_labels(source, _labels_needed_by(cfg, distilled))
    start, step, best = (checkpoint.resume(out / "last.pth", cfg, parts, rank, world) if cfg.resume
                         else (0, 0, -1.0))
    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    mean, std = data_cfg["mean"], data_cfg["std"]
    val = None
    if cfg.val_data:
        val, _ = _val_loader(cfg, input_size, mean, std, cfg.val_crop_pct or data_cfg.get("crop_pct", 0.875), world, rank)
    core = Views(source, spec, view_seed, skip_bad=store is not None, device=device)
    return _Run(cfg, rank, world, device, out, source, store, tap, core, num_classes, input_size, model, ddp, parts,
                targets, objective, use_labels, distilled, mean, std, val, step, best), start


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


def _epoch(run: _Run, epoch: int, logs: "_Logs", on_step) -> dict:
    """One epoch over a fresh order of all rows; returns its metrics row."""
    from tqdm import tqdm

    cfg, t0 = run.cfg, time.time()
    # every epoch a fresh order of all rows, the same in every mode (stream.epoch_order)
    view_epoch = epoch % run.store.epochs if run.store is not None else epoch
    spec = run.core.spec
    order = epoch_order(len(run.source), spec.mix_group, spec.mixing, run.view_seed, view_epoch, cfg.seed, epoch)
    items = train_items(order, view_epoch, cfg.batch_size, run.world, run.rank)
    stream = ViewStream(run.core, items)  # the torch renderer: workers ship bytes + records
    # each chunk once per rank; from object storage through a node-local mirror (once per node)
    joined = RankTargets(node_local(run.store, view_epoch), items) if run.store is not None else None
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.workers,
                                         pin_memory=run.device.type == "cuda",
                                         prefetch_factor=4 if cfg.workers else None)
    renderer = DeviceRenderer(run.core, run.device) if stream.encoded else None
    meter = Meter(cfg.workers, renderer)
    run.model.train()
    if run.distilled:
        run.model.set_distilled_training(True)
    bar = tqdm(total=len(stream), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", file=sys.stderr,
               disable=not (cfg.progress and run.rank == 0), dynamic_ncols=True)
    losses, views, seen, nan_views, bad_views = StepLosses(epoch, logs.steps_f, run.world), 0, 0, 0, 0
    try:
        for batch in meter(renderer(loader) if renderer else loader):
            batch = joined.join(batch) if joined is not None else batch
            seen += 1
            keep, n_nan, n_bad = _dropped(batch)  # unreadable images, NaN targets: CPU masks, no device sync
            if keep is not None:
                nan_views, bad_views = nan_views + n_nan, bad_views + n_bad
                if not len(keep) and run.world == 1:  # nothing to learn from: no step
                    bar.update(1)
                    continue
                batch = batch.select(keep)  # under DDP an empty batch still steps, with the other ranks
            loss, parts = _step(run, batch)
            lr = run.parts["optimizer"].param_groups[0]["lr"]
            losses.add(loss, run.step, lr, parts)  # no host sync: read every `log_interval` steps
            views += len(batch)
            bar.update(1)
            info = {"epoch": epoch, "step": run.step, "views": len(batch)}
            if len(losses) >= cfg.log_interval or seen >= len(stream):
                info["loss"] = losses.read()
                bar.set_postfix(loss=f"{info['loss']:.4f}", lr=f"{lr:.2e}")
            if on_step is not None:
                on_step(info)
        losses.read()  # the epoch's last steps (when the stream yielded more batches than it said)
    finally:
        bar.close()
        if joined is not None:
            joined.close()
    views, nan_views, bad_views = (int(v) for v in dist.all_reduce([views, nan_views, bad_views]))
    if run.rank == 0 and nan_views + bad_views:
        log.warning("%s: epoch %d: %d views dropped from training: %d with NaN targets (views gen-logits skipped: "
                    "unreadable images or non-finite teacher outputs, e.g. an fp16 teacher that overflowed), "
                    "%d with images unreadable now", cfg.logits or cfg.data, epoch, nan_views + bad_views,
                    nan_views, bad_views)
    return {"epoch": epoch, "step": run.step, "train_loss": losses.sum / max(losses.count, 1),
            **{f"train_{name}": v / max(losses.count, 1) for name, v in losses.part_sums.items()},
            "lr": run.parts["optimizer"].param_groups[0]["lr"], "views": views,
            "dropped_views": nan_views + bad_views, "nan_target_views": nan_views, "unreadable_views": bad_views,
            "seconds": round(time.time() - t0, 2), "load": meter.report()}


def _end_epoch(run: _Run, row: dict, logs: "_Logs") -> None:
    """Validate, log the epoch's row, and save the checkpoints (every rank takes part)."""
    amp = dist.amp_dtype(run.cfg.amp)
    if run.val is not None:
        if run.distilled:
            run.model.set_distilled_training(False)
        row.update({f"val_{k}": v for k, v in evaluate(run.model, run.val, run.device, amp).items()})
        if run.parts["ema"] is not None:
            ema = run.parts["ema"].module
            row.update({f"ema_val_{k}": v for k, v in evaluate(ema, run.val, run.device, amp).items()})
    score = max(row.get("val_top1", -1.0), row.get("ema_val_top1", -1.0))
    rngs = dist.gather_parts(checkpoint.rng_state(), 0)  # every rank's generators (all ranks call it)
    if run.rank == 0:
        logs.write(row)
        ck = {name: obj.state_dict() if obj is not None else None for name, obj in run.parts.items()}
        ck.update(epoch=row["epoch"], step=run.step, best=max(run.best, score), rng=rngs[0], rng_ranks=rngs,
                  amp=run.cfg.amp, config=_cfg_dict(run.cfg), num_classes=run.num_classes, input_size=run.input_size)
        checkpoint.save(run.out / "last.pth", ck)
        if score > run.best:
            checkpoint.save(run.out / "best.pth", ck)
    run.best = max(run.best, score)
    log.info("epoch %d: %s", row["epoch"], json.dumps(row))
    dist.barrier()


class _Logs:
    """Rank 0's records: metrics.jsonl (a row per epoch), steps.jsonl (a line per step),
    TensorBoard when installed, and config.json."""

    def __init__(self, run: _Run):
        lead = run.rank == 0
        self.metrics_f = open(run.out / "metrics.jsonl", "a") if lead else None
        self.steps_f = open(run.out / "steps.jsonl", "a") if lead else None
        self.tb = _tensorboard(run.out) if lead else None
        if lead:
            (run.out / "config.json").write_text(json.dumps(_cfg_dict(run.cfg), indent=1, default=str))

    def write(self, row: dict) -> None:
        self.metrics_f.write(json.dumps(row) + "\n")
        self.metrics_f.flush()
        self.steps_f.flush()
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


@dist.keeps_threads
def train_student(cfg: TrainConfig, on_step: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Train ``cfg.student``; returns the last epoch's metrics. ``on_step`` (optional) is
    called after every optimizer step with ``{"epoch", "step", "views"}``, plus ``"loss"`` (that
    step's) at the steps where the losses are read back from the device: every ``log_interval``
    steps and the last step of each epoch. There the step has finished on the device; elsewhere
    it may only be queued (the loop does not wait for the GPU between reads)."""
    cfg = resolve(cfg)
    run, start = _build(cfg)
    logs = _Logs(run)
    summary: dict = {}
    try:
        for epoch in range(start, cfg.epochs):
            summary = _epoch(run, epoch, logs, on_step)
            _end_epoch(run, summary, logs)
    finally:
        logs.close()
    return {"out": str(run.out), "epochs": cfg.epochs, "best_val_top1": run.best if run.best >= 0 else None,
            "mode": "no_kd" if cfg.no_kd else ("online" if cfg.online_teacher else "offline"), **summary}


def _cfg_dict(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d["spec"] = cfg.spec.to_dict()
    return d


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: JSONL only
        return None
    return SummaryWriter(str(out / "tb"))
