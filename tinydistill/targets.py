"""Dense soft targets from sparse top-K teacher outputs (TinyViT's label smoothing).

The top-K classes keep the teacher's probability; the mass the teacher put elsewhere,
``1 - sum(top-K)``, is spread evenly over the other ``C - K`` classes. fp16 log-probabilities
can round so the top-K sum slightly exceeds 1: then the top-K are rescaled to sum to 1 and the
other classes get nothing, so no entry is ever negative or NaN.

A temperature T sharpens or flattens the smoothed distribution ``q`` as ``q ** (1/T)``
renormalised, i.e. ``softmax(log(q) / T)``: the sparse store has no logits, so this is the
temperature applied to the distribution the student is trained against.
"""

from __future__ import annotations

import torch


def dense_targets(
    logp: torch.Tensor, index: torch.Tensor, num_classes: int, temperature: float = 1.0
) -> torch.Tensor:
    """Dense [n, C] float32 targets from top-K log-probs [n, K] and class ids [n, K]."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n, k = logp.shape
    if k > num_classes:
        raise ValueError(f"K={k} exceeds num_classes={num_classes}")
    p = logp.float().exp()
    total = p.sum(-1, keepdim=True)
    if k == num_classes:
        p = p / total  # no other classes to hold the rest: normalise
        rest = torch.zeros_like(total)
    else:
        p = torch.where(total > 1, p / total, p)
        rest = (1 - total).clamp_min(0) / (num_classes - k)
    out = rest.expand(n, num_classes).clone()
    out.scatter_(-1, index.long(), p)
    if temperature != 1.0:
        out = torch.softmax(out.log() / temperature, dim=-1)
    return out
