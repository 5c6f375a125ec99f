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
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .config import TrainConfig, parse_kv  # noqa: F401  (TrainConfig is this stage's config)
from .errors import TinydistillError
from . import dist
from .losses import DistillLoss, Objective, mixed_labels
from .sources import open_source
from .nodecache import node_local
from .ranktargets import RankTargets
from .render_device import DeviceRenderer
from .stream import Meter, ViewStream, epoch_order, train_items
from .views import Views, prepare

log = logging.getLogger("tinydistill")


class TrainError(TinydistillError):
    """A training set-up that cannot run (mismatched store, bad option, missing checkpoint)."""


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

            teacher = load_teacher(cfg.online_teacher, cfg.teacher_weights, class_names=source.class_names)
            if cfg.teacher_input_size:
                teacher.input_size = cfg.teacher_input_size
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
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


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


def _save(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # never a half-written checkpoint under the real name


def _seed_rng(seed: int) -> None:
    """Seed every generator the training loop draws from: torch's CPU and CUDA generators (drop-path,
    the DataLoader's worker seeds), numpy's and Python's (timm internals)."""
    torch.manual_seed(seed)  # CPU and every CUDA device
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _rng_state() -> dict:
    """Every generator the loop draws from (see :func:`_seed_rng`), as tensors and plain Python
    values, so checkpoints load with weights_only=True. The CUDA states are saved only once CUDA
    is initialised (on the CPU there are none)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
            "python": random.getstate()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    cuda = s.get("cuda") or []
    if cuda and torch.cuda.is_available():
        for i, state in enumerate(cuda[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, i)
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(tuple(s["python"][:1]) + (tuple(s["python"][1]),) + tuple(s["python"][2:]))


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


def _dropped(batch: dict) -> tuple[torch.Tensor | None, int, int]:
    """(ids of the rows to keep, or None when all are kept; rows whose stored targets are NaN;
    other rows dropped) of a batch, from its CPU tensors alone (``valid``, ``logp``): no device
    sync. A store holds NaN targets for the views gen-logits skipped: unreadable images, or
    non-finite outputs of the teacher (an fp16 teacher that overflowed); the store does not say
    which. The other rows dropped are those whose image cannot be read now (``valid`` False)."""
    valid = torch.as_tensor(batch["valid"]).bool()
    nan = torch.isnan(torch.as_tensor(batch["logp"])).any(1) if "logp" in batch else torch.zeros_like(valid)
    keep = valid & ~nan
    if bool(keep.all()):
        return None, 0, 0
    n_nan = int(nan.sum())
    return keep.nonzero().squeeze(1), n_nan, int((~keep).sum()) - n_nan


def _take(batch: dict, keep: torch.Tensor) -> dict:
    """The rows ``keep`` (CPU ids) of every per-row tensor of a batch; device tensors are indexed
    with a copy of the ids sent ahead (index_select), never with a mask (that would sync)."""
    n, out, on = len(batch["valid"]), {}, {}
    for k, v in batch.items():
        if torch.is_tensor(v) and v.dim() and len(v) == n:
            if v.device.type != "cpu":
                if v.device not in on:
                    on[v.device] = keep.to(v.device, non_blocking=True)
                v = v.index_select(0, on[v.device])
            else:
                v = v[keep]
        elif isinstance(v, np.ndarray) and v.ndim and len(v) == n:
            v = v[keep.numpy()]
        out[k] = v
    return out


# ---- targets --------------------------------------------------------------------------------------

class StoreTargets:
    """Offline KD: the stored top-K, joined to each batch in the rank's main process (RankTargets)."""

    def __init__(self, device):
        self.device = device

    def __call__(self, batch: dict, images: torch.Tensor):
        return batch["logp"].to(self.device, non_blocking=True), batch["index"].to(self.device, non_blocking=True)


class OnlineTargets:
    """Online KD: the teacher's top-K on the batch's views, with the forward gen-logits uses."""

    def __init__(self, teacher, k: int):
        self.teacher, self.k = teacher, k

    def __call__(self, batch: dict, images: torch.Tensor):
        logp, index = self.teacher.topk(images, self.k)
        return logp.clone(), index.clone()  # out of inference mode: usable in the loss


def label_targets(batch: dict, images: torch.Tensor):
    """No KD: the loss uses the (mixed, smoothed) labels alone."""
    return None, None


# ---- checkpoints ----------------------------------------------------------------------------------

def _resume(path: Path, cfg: TrainConfig, parts: dict, rank: int = 0, world: int = 1) -> tuple[int, int, float]:
    """Load ``parts`` (model, optimizer, ...) from a checkpoint and this rank's RNG states;
    returns (next epoch, step, best). ``cfg`` is resolved (its ``amp`` is set)."""
    if not path.exists():
        raise TrainError(f"{path}: no checkpoint to resume from")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainError(f"{path}: cannot load checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from e
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
        _set_rng_state(states[rank])
    else:  # another world size: the data order changes too; keep the ranks' draws apart
        log.warning("%s: saved by %d rank(s), resumed by %d: random draws (drop-path) are not replayed exactly",
                    path, len(states), world)
        _seed_rng(cfg.seed + rank + world * (ck["step"] + 1))
    log.info("resumed %s at epoch %d, step %d", path, ck["epoch"] + 1, ck["step"])
    return ck["epoch"] + 1, ck["step"], ck.get("best", -1.0)


# ---- the loop ------------------------------------------------------------------------------------

class StepLosses:
    """Each step's loss, kept on the device and read back every ``log_interval`` steps in one
    host sync (a read every step would keep the CPU from queueing work ahead of the GPU). A read
    writes the steps' lines to steps.jsonl and raises the one-line error at the first non-finite
    loss (under DDP every rank raises when any rank saw one: the ranks read at the same steps)."""

    def __init__(self, epoch: int, steps_f, world: int = 1):
        self.epoch, self.steps_f, self.world = epoch, steps_f, world
        self.losses: list[torch.Tensor] = []  # 0-dim device tensors, not yet read
        self.meta: list[tuple[int, float]] = []  # (step, lr) of each
        self.sum, self.count, self.last = 0.0, 0, float("nan")

    def __len__(self) -> int:
        return len(self.losses)

    def add(self, loss: torch.Tensor, step: int, lr: float) -> None:
        self.losses.append(loss.detach())
        self.meta.append((step, lr))

    def read(self) -> float:
        """Read the pending losses (the host sync); returns the last step's loss."""
        if not self.losses:
            return self.last
        values = torch.stack(self.losses).float().cpu().tolist()
        meta, self.losses, self.meta = self.meta, [], []
        bad = next(((s, v) for (s, _), v in zip(meta, values) if not math.isfinite(v)), None)
        elsewhere = self.world > 1 and dist.all_reduce([float(bad is not None)])[0] > 0
        for (s, lr), v in zip(meta, values):
            if bad is not None and s == bad[0]:
                break
            if self.steps_f:
                self.steps_f.write(json.dumps({"epoch": self.epoch, "step": s, "loss": v, "lr": lr}) + "\n")
        if bad is not None:
            raise TrainError(f"epoch {self.epoch} step {bad[0]}: loss is {bad[1]}; lower `lr` or check the store")
        if elsewhere:
            raise TrainError(f"epoch {self.epoch}: another rank's loss is not finite by step {meta[-1][0]}; "
                             "lower `lr` or check the store")
        self.sum, self.count, self.last = self.sum + sum(values), self.count + len(values), values[-1]
        return self.last


@dist.keeps_threads
def train_student(cfg: TrainConfig, on_step: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Train ``cfg.student``; returns the last epoch's metrics. ``on_step`` (optional) is
    called after every optimizer step with ``{"epoch", "step", "views"}``, plus ``"loss"`` (that
    step's) at the steps where the losses are read back from the device: every ``log_interval``
    steps and the last step of each epoch. There the step has finished on the device; elsewhere
    it may only be queued (the loop does not wait for the GPU between reads)."""
    from timm.data import resolve_data_config
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3
    from tqdm import tqdm

    cfg = resolve(cfg)
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
    _seed_rng(cfg.seed + rank)  # training draws (drop-path masks) differ across ranks, as in timm
    data_cfg = resolve_data_config({}, model=model)
    mean, std = data_cfg["mean"], data_cfg["std"]
    distilled = hasattr(model, "set_distilled_training")
    model.to(device)
    ema = ModelEmaV3(model, decay=cfg.ema, device=device) if cfg.ema else None
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(source) / (cfg.batch_size * world)))
    scheduler = CosineLRScheduler(optimizer, t_initial=cfg.epochs * steps_per_epoch, lr_min=cfg.min_lr,
                                  warmup_lr_init=cfg.warmup_lr, warmup_t=int(cfg.warmup_epochs * steps_per_epoch),
                                  t_in_epochs=False)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    if teacher is not None:
        targets = OnlineTargets(teacher.place(device, cfg.amp), cfg.k or num_classes)
    else:
        targets = StoreTargets(device) if store is not None else label_targets
    objective = Objective(None if cfg.no_kd else
                          DistillLoss(num_classes, kind=cfg.loss, temperature=cfg.temperature, alpha=cfg.alpha))
    use_labels = objective.needs_labels(two_heads=distilled)  # pure distillation trains on unlabeled data
    if use_labels:
        require_labels(source, _labels_needed_by(cfg, distilled))
    core = Views(source, spec, view_seed, skip_bad=store is not None, device=device)

    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "ema": ema}
    start_epoch, step, best = _resume(out / "last.pth", cfg, parts, rank, world) if cfg.resume else (0, 0, -1.0)
    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    val = None
    if cfg.val_data:
        val, _ = _val_loader(cfg, input_size, mean, std, cfg.val_crop_pct or data_cfg.get("crop_pct", 0.875), world, rank)

    metrics_f = open(out / "metrics.jsonl", "a") if rank == 0 else None
    steps_f = open(out / "steps.jsonl", "a") if rank == 0 else None
    tb = _tensorboard(out) if rank == 0 else None
    if rank == 0:
        (out / "config.json").write_text(json.dumps(_cfg_dict(cfg), indent=1, default=str))
    summary = {}
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.time()
            # every epoch a fresh order of all rows, the same in every mode (stream.epoch_order)
            view_epoch = epoch % store.epochs if store is not None else epoch
            order = epoch_order(len(source), spec.mix_group, spec.mixing, view_seed, view_epoch, cfg.seed, epoch)
            # the torch renderer: workers ship bytes + records, the pixels are made on `device`
            items = train_items(order, view_epoch, cfg.batch_size, world, rank)
            stream = ViewStream(core, items)
            # each chunk once per rank; from object storage through a node-local mirror (once per node)
            joined = RankTargets(node_local(store, view_epoch), items) if store is not None else None
            loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.workers,
                                                 pin_memory=device.type == "cuda",
                                                 prefetch_factor=4 if cfg.workers else None)
            renderer = DeviceRenderer(core, device) if stream.encoded else None
            meter = Meter(cfg.workers, renderer)
            model.train()
            if distilled:
                model.set_distilled_training(True)
            bar = tqdm(total=len(stream), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", file=sys.stderr,
                       disable=not (cfg.progress and rank == 0), dynamic_ncols=True)
            losses, views, lr = StepLosses(epoch, steps_f, world), 0, optimizer.param_groups[0]["lr"]
            nan_views = bad_views = batches_seen = 0
            for batch in meter(renderer(loader) if renderer else loader):
                batch = joined.join(batch) if joined is not None else batch
                batches_seen += 1
                # rows with unreadable images or NaN targets: dropped on the CPU masks, no device sync
                keep, n_nan, n_bad = _dropped(batch)
                if keep is not None:
                    nan_views, bad_views = nan_views + n_nan, bad_views + n_bad
                    if not len(keep) and world == 1:  # nothing to learn from: no step
                        bar.update(1)
                        continue
                    batch = _take(batch, keep)  # under DDP an empty batch still steps, with the other ranks
                n = len(batch["valid"])
                images = batch["image"].to(device, non_blocking=True)
                labels = None  # not built when the loss needs none (unlabeled data: label -1)
                if use_labels:
                    labels = mixed_labels(batch["label"].to(device, non_blocking=True),
                                          batch["partner_label"].to(device, non_blocking=True),
                                          batch["lam"].to(device, non_blocking=True), num_classes,
                                          smoothing=cfg.smoothing if cfg.no_kd else 0.0)
                logp, index = targets(batch, images)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    outputs = ddp(prepare(images, input_size, mean, std))
                if n:
                    loss = objective(outputs, labels, logp, index)
                else:  # DDP: zero gradients, so this rank's all-reduce goes along with the others'
                    loss = sum(o.float().sum() for o in (outputs if isinstance(outputs, tuple) else (outputs,))) * 0.0
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                step += 1
                scheduler.step_update(num_updates=step)
                if ema is not None:
                    ema.update(model, step=step)
                lr = optimizer.param_groups[0]["lr"]
                losses.add(loss, step, lr)  # no host sync: read back every `log_interval` steps
                views += n
                bar.update(1)
                info = {"epoch": epoch, "step": step, "views": n}
                if len(losses) >= cfg.log_interval or batches_seen >= len(stream):
                    info["loss"] = losses.read()
                    bar.set_postfix(loss=f"{info['loss']:.4f}", lr=f"{lr:.2e}")
                if on_step is not None:
                    on_step(info)
            losses.read()  # the epoch's last steps (when the stream yielded more batches than it said)
            bar.close()
            del loader
            if joined is not None:
                joined.close()
            views, nan_views, bad_views = (int(v) for v in dist.all_reduce([views, nan_views, bad_views]))
            row = {"epoch": epoch, "step": step, "train_loss": losses.sum / max(losses.count, 1), "lr": lr,
                   "views": views, "dropped_views": nan_views + bad_views, "nan_target_views": nan_views,
                   "unreadable_views": bad_views, "seconds": round(time.time() - t0, 2), "load": meter.report()}
            if rank == 0 and nan_views + bad_views:
                log.warning("%s: epoch %d: %d views dropped from training: %d with NaN targets (views gen-logits "
                            "skipped: unreadable images or non-finite teacher outputs, e.g. an fp16 teacher that "
                            "overflowed), %d with images unreadable now",
                            cfg.logits or cfg.data, epoch, nan_views + bad_views, nan_views, bad_views)
            if val is not None:
                if distilled:
                    model.set_distilled_training(False)
                row.update({f"val_{k}": v for k, v in evaluate(model, val, device, amp_dtype).items()})
                if ema is not None:
                    row.update({f"ema_val_{k}": v for k, v in evaluate(ema.module, val, device, amp_dtype).items()})
            score = max(row.get("val_top1", -1.0), row.get("ema_val_top1", -1.0))
            rngs = dist.gather_parts(_rng_state(), 0)  # every rank's generators (all ranks call it)
            if rank == 0:
                metrics_f.write(json.dumps(row) + "\n")
                metrics_f.flush()
                steps_f.flush()
                if tb is not None:
                    for k, v in row.items():
                        if isinstance(v, (int, float)) and k != "epoch":
                            tb.add_scalar(k, v, epoch)
                ck = {name: obj.state_dict() if obj is not None else None for name, obj in parts.items()}
                ck.update(epoch=epoch, step=step, best=max(best, score), rng=rngs[0], rng_ranks=rngs, amp=cfg.amp,
                          config=_cfg_dict(cfg), num_classes=num_classes, input_size=input_size)
                _save(out / "last.pth", ck)
                if score > best:
                    _save(out / "best.pth", ck)
            best = max(best, score)
            log.info("epoch %d: %s", epoch, json.dumps(row))
            summary = row
            dist.barrier()
    finally:
        for f in (metrics_f, steps_f):
            if f:
                f.close()
        if tb is not None:
            tb.close()
    return {"out": str(out), "epochs": cfg.epochs, "best_val_top1": best if best >= 0 else None,
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
