"""Where a training step's teacher targets come from: the store, a live teacher, or nowhere.

Each provider maps (batch, images on the device) to the teacher's values by field name
(:mod:`tinydistill.kinds`): ``logp``/``index`` (top-K) and, with ``attention_weight``,
``attention`` maps. :func:`target_provider` picks the provider of a run, the attention kind
its loss compares, and the hooks that give the student's own maps.
"""

from __future__ import annotations

import torch

from .batch import Batch
from .config import TrainConfig
from .errors import TrainError


class StoreTargets:
    """Offline KD: the stored targets of every kind, joined to each batch in the rank's main
    process (RankTargets)."""

    def __init__(self, device):
        self.device = device

    def __call__(self, batch: Batch, images: torch.Tensor) -> dict:
        return {name: t.to(self.device, non_blocking=True) for name, t in batch.targets.items()}


class OnlineTargets:
    """Online KD: the teacher's targets of ``kinds`` on the batch's views, with the forward
    gen-logits uses."""

    def __init__(self, teacher, kinds: list):
        self.teacher, self.kinds = teacher, kinds

    def __call__(self, batch: Batch, images: torch.Tensor) -> dict:
        out = self.teacher.targets(images, self.kinds)
        return {name: t.clone() for name, t in out.items()}  # out of inference mode: usable in the loss


def label_targets(batch: Batch, images: torch.Tensor) -> dict:
    """No KD: the loss uses the (mixed, smoothed) labels alone."""
    return {}


def _attention_kind(cfg: TrainConfig, store, teacher):
    """The attention kind the loss compares (None with ``attention_weight`` 0), or a one-line
    error naming what is missing."""
    from .kinds import Attention

    if not cfg.attention_weight:
        return None
    if cfg.no_kd:
        raise TrainError("`attention_weight` needs a teacher's maps: offline KD from a store made with "
                         "gen-logits --attention-grid, or `online_teacher`")
    if store is not None:
        kind = store.kind("attention")
        if kind is None:
            raise TrainError(f"{cfg.logits}: holds no attention maps (made without gen-logits --attention-grid); "
                             "`attention_weight` needs them")
        if cfg.attention_grid not in (None, kind.grid):
            raise TrainError(f"{cfg.logits}: holds {kind.grid}x{kind.grid} maps, `attention_grid` asks for "
                             f"{cfg.attention_grid}")
        return kind
    like = None
    if cfg.like:
        from .store import open_store

        like = open_store(cfg.like).kind("attention")
    return Attention(cfg.attention_grid or (like.grid if like is not None else 7))


def target_provider(cfg: TrainConfig, store, teacher, model, num_classes: int, device):
    """(provider, attention kind or None, the student's AttentionTap or None) of a run; a
    one-line error when the store or the student has no maps and ``attention_weight`` needs them."""
    attention = _attention_kind(cfg, store, teacher)
    tap = None
    if attention is not None:
        from .attention import AttentionError, AttentionTap

        try:
            tap = AttentionTap(model, attention.grid, name=f"student {cfg.student}")
        except AttentionError as e:
            raise TrainError(f"{e}; `attention_weight` needs one") from None
    if teacher is not None:
        from .kinds import TopK

        kinds = [TopK(cfg.k or num_classes, num_classes)] + ([attention] if attention is not None else [])
        grid = attention.grid if attention is not None else 0
        return OnlineTargets(teacher.place(device, cfg.amp, attention_grid=grid), kinds), attention, tap
    return (StoreTargets(device) if store is not None else label_targets), attention, tap
