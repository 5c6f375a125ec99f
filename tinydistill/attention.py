"""Spatial attention maps of a timm model, taken from the forward that gives its logits.

One definition serves the teacher (gen-logits, online KD, verify) and the student (the loss):

- a ViT (a module with ``qkv`` and ``num_heads`` and a model with a class token): the class
  token's attention over the patch tokens in the last attention block, averaged over heads. It
  is recomputed from the block's ``qkv`` output, which every attention path computes, so fused
  attention (``scaled_dot_product_attention``, which never forms the weights) is kept on;
  prefix tokens (class, distillation, registers) are dropped and the patches renormalised;
- a CNN or a hybrid without a class token (a model whose ``global_pool`` or ``head`` takes a
  spatial map, [B, C, H, W], or [B, H, W, C] for timm's ``output_fmt`` NHWC models): the map's
  spatial energy, the mean over channels of the squared activations (attention transfer).
  A ViT built without a class token has neither and is refused.

Either way the map is resized to G x G by area (``adaptive_avg_pool2d``) and normalised to sum
to 1, computed in float32 from the forward's (possibly bf16/fp16) activations: autocast is off
inside the hooks, so an ``--amp`` forward does not compute the map in half precision. The hooks
keep the autograd graph, so a student's map trains its weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import TinydistillError


class AttentionError(TinydistillError):
    """A model that yields no attention map (no class-token attention, no spatial feature map)."""


def area_resize(maps: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, h, w] non-negative maps -> [B, G, G] float32 maps that sum to 1 (resized by area). A
    map of zeros (a feature map with no energy at all) becomes the uniform map: no preference."""
    m = F.adaptive_avg_pool2d(maps.float()[:, None], grid)[:, 0]
    total = m.sum((1, 2), keepdim=True)
    return torch.where(total > 0, m / total.clamp_min(1e-30), torch.full_like(m, 1.0 / (grid * grid)))


def _last_attention(model: torch.nn.Module):
    found = None
    for m in model.modules():
        if isinstance(getattr(m, "qkv", None), torch.nn.Linear) and hasattr(m, "num_heads"):
            found = m
    return found


class AttentionTap:
    """Hooks on ``model`` that keep the map of its last forward; :meth:`pop` returns it.

    ``name`` names the model in the one-line :class:`AttentionError` raised when it has no map.
    Install it before ``torch.compile``: compiled graphs keep the hooks they were traced with.
    """

    def __init__(self, model: torch.nn.Module, grid: int, name: str = "model"):
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        self.grid, self.name = int(grid), name
        self.maps: torch.Tensor | None = None
        attn = _last_attention(model)
        if attn is not None and getattr(model, "cls_token", None) is not None:
            self.kind, self.attn = "vit", attn
            self.prefix = int(getattr(model, "num_prefix_tokens", 1))
            self.handle = attn.qkv.register_forward_hook(self._from_qkv)
            return
        if hasattr(model, "cls_token"):  # a ViT built without one (global average pooling)
            raise AttentionError(f"{name}: a ViT without a class token yields no class-token attention map")
        self.channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"  # e.g. Swin, MambaOut
        pool = getattr(model, "global_pool", None)
        target = pool if isinstance(pool, torch.nn.Module) else getattr(model, "head", None)
        if not isinstance(target, torch.nn.Module):
            raise AttentionError(f"{name}: yields no attention map (no attention block with a class token, "
                                 "no global_pool or head module taking a spatial feature map)")
        self.kind = "cnn"
        self.handle = target.register_forward_pre_hook(self._from_features)

    def _from_qkv(self, module, inputs, out) -> None:
        with torch.autocast(out.device.type, enabled=False):  # the map in float32 under --amp too
            self._map_from_qkv(out.float())

    def _map_from_qkv(self, out: torch.Tensor) -> None:
        a = self.attn
        b, n, _ = out.shape
        qkv = out.reshape(b, n, 3, a.num_heads, -1)
        q = a.q_norm(qkv[:, :1, 0].transpose(1, 2)).float()  # [B, heads, 1, d]: the class token's query
        k = a.k_norm(qkv[:, :, 1].transpose(1, 2)).float()  # [B, heads, N, d]
        w = torch.softmax((q * a.scale) @ k.transpose(-2, -1), dim=-1).mean(1)[:, 0]  # [B, N], heads averaged
        patches = w[:, self.prefix:]
        side = math.isqrt(patches.shape[1])
        if side * side != patches.shape[1]:
            raise AttentionError(f"{self.name}: {patches.shape[1]} patch tokens do not form a square grid")
        self.maps = area_resize(patches.reshape(b, side, side), self.grid)

    def _from_features(self, module, inputs) -> None:
        f = inputs[0]
        if f.ndim != 4:
            raise AttentionError(f"{self.name}: its {type(module).__name__} takes {f.ndim}-D features, "
                                 "not a [B, C, H, W] map: no attention map")
        with torch.autocast(f.device.type, enabled=False):  # float32 under --amp too
            self.maps = area_resize(f.float().pow(2).mean(3 if self.channels_last else 1), self.grid)

    def pop(self) -> torch.Tensor:
        """The [B, G, G] maps of the last forward (float32, each summing to 1)."""
        maps, self.maps = self.maps, None
        if maps is None:
            raise AttentionError(f"{self.name}: its forward produced no attention map")
        return maps

    def remove(self) -> None:
        self.handle.remove()
