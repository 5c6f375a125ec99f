"""Teachers: a name -> a classifier, its input config, and a digest of its weights.

Names are timm model names (``timm:NAME`` or bare), the aliases in :data:`ALIASES`, or
``open_clip:ARCH/PRETRAINED`` (a zero-shot classifier built from the store's class names;
needs ``pip install 'tinydistill[clip]'``). ``weights`` loads a local checkpoint or
safetensors file instead of fetching pretrained weights; the head size comes from it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .attention import AttentionError, AttentionTap
from .dist import amp_dtype, gpu_defaults
from .errors import TinydistillError, one_line

ALIASES = {
    "clip-vit-l14": "vit_large_patch14_clip_224.openai_ft_in12k_in1k",
    "clip-vit-l14-in12k": "vit_large_patch14_clip_224.openai_ft_in12k",
    "clip-vit-l14-336": "vit_large_patch14_clip_336.openai_ft_in12k_in1k",
    "clip-vit-b16": "vit_base_patch16_clip_224.openai_ft_in12k_in1k",
    "clip-vit-b16-in12k": "vit_base_patch16_clip_224.openai_ft_in12k",
}

OPENCLIP_TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a photo of the large {}.",
                      "a photo of the small {}.", "a close-up photo of a {}.", "a good photo of a {}.")


class TeacherError(TinydistillError):
    """A teacher name or weights file that cannot be turned into a classifier."""


@dataclass
class Teacher:
    name: str
    model: torch.nn.Module
    num_classes: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    weights_digest: str
    class_names: list[str] | None = None
    meta: dict = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: str = "none"
    tap: AttentionTap | None = None  # the attention maps of each forward (attention_grid > 0)
    channels_last: bool = False  # a CNN: weights and inputs NHWC (wants_channels_last), set by place()

    def place(self, device, amp: str | None = "none", compile: bool = False, attention_grid: int = 0) -> "Teacher":
        """Move the model to ``device`` (channels-last for a CNN, optionally compiled), set the
        autocast dtype every forward uses, and with ``attention_grid`` G > 0 keep each forward's
        G x G attention maps (:mod:`tinydistill.attention`; hooked before compiling)."""
        self.device, self.amp = torch.device(device), amp or "none"
        gpu_defaults()  # TF32; no cudnn.benchmark: verify must recompute stored values to the bit
        self.model = self.model.to(self.device).eval()
        self.channels_last = wants_channels_last(self.model)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.tap is not None:  # placed again: one set of hooks
            self.tap.remove()
            self.tap = None
        if attention_grid:
            self.tap = AttentionTap(self.model, attention_grid, name=f"teacher {self.name}")
        if compile:
            self.model = torch.compile(self.model)
        return self

    @torch.inference_mode()
    def targets(self, images: torch.Tensor, kinds, pad_to: int | None = None) -> dict[str, torch.Tensor]:
        """The one teacher forward (gen-logits, online KD and verify all call it): views
        [B, 3, H, W] in [0, 1] -> each target kind's values (:mod:`tinydistill.kinds`: top-K
        log-probabilities, float32 and descending, and class ids; attention maps), on the
        teacher's device. Resize, interpolation, normalisation, memory layout and autocast are
        the teacher's own. ``pad_to``: a shorter batch is padded with black views to that many
        (outputs dropped), so a compiled teacher sees one shape and a batch's values never
        depend on which shapes were compiled first."""
        from .views import prepare

        n = images.shape[0]
        if pad_to is not None and n < pad_to:
            images = torch.cat([images, images.new_zeros((pad_to - n,) + tuple(images.shape[1:]))])
        x = prepare(images.to(self.device, non_blocking=True), self.input_size, self.mean, self.std,
                    self.interpolation)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dt = amp_dtype(self.amp)
        with torch.autocast(self.device.type, dtype=dt, enabled=dt is not None):
            logits = self.model(x)
        maps = self.tap.pop()[:n] if self.tap is not None else None
        out = {}
        for kind in kinds:
            if kind.needs_maps and maps is None:
                raise AttentionError(f"teacher {self.name}: placed without an attention grid")
            out.update(kind.extract(logits[:n], maps))
        return out

    def topk(self, images: torch.Tensor, k: int, pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-K log-probabilities (float32, descending) and class ids of views (see :meth:`targets`)."""
        from .kinds import TopK

        out = self.targets(images, [TopK(k, self.num_classes)], pad_to)
        return out["logp"], out["index"]

    def describe(self) -> dict:
        """What the store records about the teacher."""
        return {"name": self.name, "weights_digest": self.weights_digest, "num_classes": self.num_classes,
                "input_size": self.input_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, **self.meta}


def wants_channels_last(model: torch.nn.Module) -> bool:
    """Whether ``model`` runs channels-last (its weights and inputs NHWC): CNNs, i.e. more
    than one 2-D convolution (a ViT has one, its patch embedding), on every device."""
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 1


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def state_dict_digest(model: torch.nn.Module) -> str:
    """Hash of every tensor (names, shapes, bytes): identifies weights that came from a hub."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256-state:" + h.hexdigest()


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A teacher's weights file as a state dict (a checkpoint's ``state_dict``, ``model`` or
    ``model_ema`` taken out of it)."""
    from .weights import read_file, tensors_only

    sd = read_file(path, TeacherError, "teacher weights", verb="load")
    for key in ("state_dict", "model", "model_ema"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    return tensors_only(sd, path, TeacherError)


def resolve_name(name: str) -> tuple[str, str]:
    """(kind, model name): kind is 'timm' or 'open_clip'."""
    if name.startswith("open_clip:"):
        return "open_clip", name.split(":", 1)[1]
    if name.startswith("timm:"):
        name = name.split(":", 1)[1]
    return "timm", ALIASES.get(name, name)


def load_teacher(name: str, weights: str | None = None, class_names: Sequence[str] | None = None,
                 input_size: int | None = None) -> Teacher:
    """Build a teacher in eval mode on the CPU (the caller moves it to its device).

    ``input_size``: the size the teacher sees. A timm model whose layout depends on it (a ViT's
    position embedding) is built at that size, so weights trained at another size than the
    pretrained config's load."""
    kind, model_name = resolve_name(name)
    if kind == "open_clip":
        teacher = _load_open_clip(name, model_name, weights, class_names)
    else:
        teacher = _load_timm(name, model_name, weights, input_size)
    if input_size:
        teacher.input_size = int(input_size)
    return teacher


def _create(model_name: str, input_size: int | None, **kw):
    import timm

    if input_size:
        try:
            return timm.create_model(model_name, img_size=int(input_size), **kw)
        except TypeError:  # models without an img_size argument (CNNs)
            pass
    return timm.create_model(model_name, **kw)


def _load_timm(name: str, model_name: str, weights: str | None, input_size: int | None = None) -> Teacher:
    import timm
    from timm.data import resolve_data_config

    arch = model_name.split(".")[0]
    if not timm.is_model(arch):
        raise TeacherError(f"{name}: unknown teacher (not an alias, not a timm model; `tinydistill teachers` lists aliases)")
    try:
        if weights:
            sd = load_state_dict(weights)
            from timm.models import get_pretrained_cfg

            pcfg = get_pretrained_cfg(model_name)  # config only: no second model build
            clf = (pcfg.classifier if pcfg else None) or timm.create_model(model_name).default_cfg.get("classifier", "head")
            clf = clf[0] if isinstance(clf, (list, tuple)) else clf
            if f"{clf}.weight" not in sd:
                raise TeacherError(f"{weights}: no '{clf}.weight' in the weights: not a {arch} classifier")
            model = _create(model_name, input_size, pretrained=False, num_classes=sd[f"{clf}.weight"].shape[0])
            try:
                model.load_state_dict(sd, strict=True)
            except RuntimeError as e:
                raise TeacherError(f"{weights}: does not fit {model_name} ({one_line(e)}"
                                   f" {str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else ''})") from e
            digest = file_digest(weights)
        else:
            try:
                model = _create(model_name, input_size, pretrained=True)
            except Exception as e:
                raise TeacherError(f"{name}: cannot fetch pretrained weights for {model_name} "
                                   f"({type(e).__name__}); pass --teacher-weights PATH") from e
            digest = state_dict_digest(model)
    except TeacherError:
        raise
    except Exception as e:
        raise TeacherError(f"{name}: cannot build {model_name} ({one_line(e)})") from e
    model.eval()
    cfg = resolve_data_config({}, model=model)
    names = None
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if subset:
            info = ImageNetInfo(subset)
            if len(info) == model.num_classes:
                names = [info.index_to_description(i) for i in range(len(info))]
    except Exception:
        names = None
    return Teacher(name=name, model=model, num_classes=model.num_classes, input_size=int(cfg["input_size"][-1]),
                   mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), interpolation=cfg.get("interpolation", "bicubic"),
                   weights_digest=digest, class_names=names, meta={"timm_model": model_name})


class _ZeroShot(torch.nn.Module):
    def __init__(self, clip, text_features: torch.Tensor):
        super().__init__()
        self.clip = clip
        self.register_buffer("text", text_features)

    def forward(self, x):
        f = self.clip.encode_image(x)
        f = f / f.norm(dim=-1, keepdim=True)
        return self.clip.logit_scale.exp() * f @ self.text.T


def _load_open_clip(name: str, spec: str, weights: str | None, class_names: Sequence[str] | None) -> Teacher:
    try:
        import open_clip
    except ImportError as e:
        raise TeacherError(f"{name}: needs open_clip: pip install 'tinydistill[clip]'") from e
    if not class_names:
        raise TeacherError(f"{name}: a zero-shot teacher needs the data's class names")
    arch, _, pretrained = spec.partition("/")
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=weights or pretrained or None)
        tokenizer = open_clip.get_tokenizer(arch)
    except Exception as e:
        raise TeacherError(f"{name}: cannot build open_clip {spec} ({one_line(e)})") from e
    clip.eval()
    with torch.inference_mode():
        feats = []
        for c in class_names:
            t = clip.encode_text(tokenizer([tpl.format(c) for tpl in OPENCLIP_TEMPLATES]))
            t = t / t.norm(dim=-1, keepdim=True)
            m = t.mean(0)
            feats.append(m / m.norm())
        text = torch.stack(feats)
    cfg = getattr(clip.visual, "preprocess_cfg", {}) or {}
    size = clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    digest = file_digest(weights) if weights else state_dict_digest(clip)
    return Teacher(name=name, model=_ZeroShot(clip, text), num_classes=len(class_names), input_size=int(size),
                   mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                   std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
                   interpolation=cfg.get("interpolation", "bicubic"), weights_digest=digest,
                   class_names=list(class_names), meta={"templates": list(OPENCLIP_TEMPLATES)})
