"""Distillation losses on sparse teacher targets (all take raw student logits [B, C]).

- ``soft_ce``: TinyViT's default, cross-entropy against the smoothed dense targets.
- ``kl``: KL(teacher_T || student_T) * T^2, with the teacher's smoothed targets at temperature T.
- an optional ground-truth term (DeiT's soft form): (1 - alpha) * CE(student, labels) + alpha * KD.
- ``hard``: DeiT hard distillation, 0.5 * CE(student, labels) + 0.5 * CE(student, teacher top-1).
- ``dist``: DIST (Huang et al. 2022), T^2 * (beta * (1 - inter) + gamma * (1 - intra)): Pearson
  correlation of student and teacher probabilities per sample (inter-class) and per class across
  the batch (intra-class), both at temperature T.
- ``bce``: binary cross-entropy with logits, each class's teacher probability its target
  (VanillaKD's ``--bce-loss``; timm's BinaryCrossEntropy), mean over samples and classes.
The teacher side of soft_ce, kl, dist and bce is the smoothed dense target of
:func:`tinydistill.targets.dense_targets`: the mass outside the stored top-K is spread evenly
over the other classes.
Labels may be soft (mixed views give mixed labels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .targets import dense_targets


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum(target * log_softmax(logits))."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def mixed_labels(label: torch.Tensor, partner_label: torch.Tensor, lam: torch.Tensor, num_classes: int,
                 smoothing: float = 0.0) -> torch.Tensor:
    """Soft labels of (possibly) mixed views: lam * y + (1 - lam) * y_partner, optionally smoothed."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    a = torch.full((len(label), num_classes), off, device=label.device).scatter_(1, label[:, None], on)
    b = torch.full((len(label), num_classes), off, device=label.device).scatter_(1, partner_label[:, None], on)
    lam = lam.float()[:, None]
    return a * lam + b * (1 - lam)


def pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of the rows of ``a`` and ``b`` [n, d] -> [n]."""
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


def dist_loss(logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0, beta: float = 1.0,
              gamma: float = 1.0) -> torch.Tensor:
    """DIST against teacher probabilities ``target`` [B, C] (already at the temperature):
    relations, not values, so a student need not match a much stronger teacher exactly."""
    student = F.softmax(logits.float() / temperature, dim=-1)
    inter = 1 - pearson(student, target).mean()
    intra = 1 - pearson(student.t(), target.t()).mean()
    return temperature**2 * (beta * inter + gamma * intra)


LOSSES = ("soft_ce", "kl", "hard", "dist", "bce")


class DistillLoss:
    """The student's loss against stored (or online) sparse teacher outputs."""

    def __init__(self, num_classes: int, kind: str = "soft_ce", temperature: float = 1.0, alpha: float = 1.0,
                 dist_beta: float = 1.0, dist_gamma: float = 1.0):
        if kind not in LOSSES:
            raise ValueError(f"unknown distillation loss {kind!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.num_classes, self.kind, self.t, self.alpha = num_classes, kind, float(temperature), float(alpha)
        self.beta, self.gamma = float(dist_beta), float(dist_gamma)

    @property
    def needs_labels(self) -> bool:
        """Whether the loss has a ground-truth term: ``hard``, or ``alpha`` < 1 (pure
        distillation, the default, trains on unlabeled data)."""
        return self.kind == "hard" or self.alpha < 1.0

    def kd(self, logits: torch.Tensor, logp: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The teacher term alone."""
        if self.kind == "hard":
            top1 = index.gather(1, logp.argmax(1, keepdim=True)).squeeze(1)
            return F.cross_entropy(logits.float(), top1)
        if self.kind == "soft_ce":
            return soft_cross_entropy(logits, dense_targets(logp, index, self.num_classes, self.t))
        target = dense_targets(logp, index, self.num_classes, self.t)
        if self.kind == "dist":
            return dist_loss(logits, target, self.t, self.beta, self.gamma)
        if self.kind == "bce":
            return F.binary_cross_entropy_with_logits(logits.float(), target)
        student = F.log_softmax(logits.float() / self.t, dim=-1)
        return F.kl_div(student, target, reduction="batchmean") * self.t**2

    def __call__(self, logits, logp, index, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``labels``: soft labels [B, C] for the ground-truth term (needed when alpha < 1 or hard)."""
        if labels is None and self.needs_labels:
            raise ValueError(f"the {self.kind} loss with alpha {self.alpha} needs labels")
        if self.kind == "hard":
            return 0.5 * soft_cross_entropy(logits, labels) + 0.5 * self.kd(logits, logp, index)
        kd = self.kd(logits, logp, index)
        if self.alpha >= 1.0:
            return kd
        return (1 - self.alpha) * soft_cross_entropy(logits, labels) + self.alpha * kd


class Objective:
    """The student's loss for one batch in any mode, kept out of the training loop.

    ``kd`` is None for training on labels alone (``--no-kd``). Students with a distillation
    token (DeiT) return two outputs: the class head learns the labels, the distillation head the
    teacher (or the labels too, without a teacher), each with weight 0.5. ``terms`` adds
    ``weight * kind.loss(student_maps, targets)`` for other target kinds (attention maps).
    """

    def __init__(self, kd: DistillLoss | None, terms: list | None = None):
        self.kd, self.terms = kd, list(terms or [])

    def needs_labels(self, two_heads: bool = False) -> bool:
        """Whether the loss uses ground-truth labels: without a teacher (``kd`` None), with a
        ground-truth term in ``kd``, or for a student with two heads (its class head learns them).
        When False, ``labels`` may be None."""
        return self.kd is None or self.kd.needs_labels or two_heads

    def __call__(self, out, labels: torch.Tensor | None, targets: dict | None = None,
                 maps: torch.Tensor | None = None, parts: dict | None = None) -> torch.Tensor:
        """``targets``: the teacher's values by field (``logp``, ``index``, ``attention``);
        ``maps``: the student's attention maps, for ``terms``. ``parts`` (a dict, optional)
        receives each term's weighted value by name, e.g. ``attention_loss``."""
        targets = targets or {}
        logp, index = targets.get("logp"), targets.get("index")
        if isinstance(out, tuple):
            cls, dist = out
            second = soft_cross_entropy(dist, labels) if self.kd is None else self.kd.kd(dist, logp, index)
            loss = 0.5 * soft_cross_entropy(cls, labels) + 0.5 * second
        elif self.kd is None:
            loss = soft_cross_entropy(out, labels)
        else:
            loss = self.kd(out, logp, index, labels)
        for weight, kind in self.terms:
            term = weight * kind.loss(maps, targets)
            if parts is not None:
                parts[f"{kind.name}_loss"] = term
            loss = loss + term
        return loss
