"""The run configs: every option of ``gen-logits`` and ``train-student``, defined once.

Each field is one command-line option (its flag is ``--field-name``), one recipe key, and one
library argument, with the same default everywhere; :mod:`tinydistill.options` turns them
into click options. Defaults that depend on the machine (device, AMP dtype, renderer) are None
here and decided when a run starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import click

from .augment import RENDERERS, AugSpec
from .errors import TinydistillError
from .options import option
from .store.format import DEFAULT_CHUNK_ROWS  # the store layout's default


def parse_epochs(text: str) -> tuple[int, int]:
    """``"E"`` -> (0, E); ``"A:B"`` -> (A, B)."""
    try:
        if ":" in str(text):
            a, b = (int(x) for x in str(text).split(":"))
        else:
            a, b = 0, int(text)
    except ValueError:
        raise TinydistillError(f"`epochs` {text}: expected a count E or a range A:B") from None
    if not 0 <= a < b:
        raise TinydistillError(f"`epochs` {text}: need 0 <= A < B")
    return a, b


DECODES = ("auto", "device", "worker")


def decode_option():
    """``--decode``, the same field in gen-logits, train-student and verify."""
    return option("auto", "Where the torch renderer's JPEGs are decoded: device (bytes to the main process, "
                          "decoded in batches on --device: nvjpeg on CUDA) or worker (DataLoader workers, on the "
                          "CPU); auto: device on cuda, worker elsewhere.", type=click.Choice(DECODES))


@dataclass
class GenConfig:
    """Options of ``gen-logits`` (each field is one command-line option; see :mod:`tinydistill.config`)."""

    data: str = option(help="SRC: ImageFolder directory, webdataset shards, or digits[:train|:val].")
    teacher: str = option(help="timm model name, timm:NAME, an alias (see `tinydistill teachers`), "
                               "or open_clip:ARCH/PRETRAINED.")
    out: str = option(help="Store path or URL (s3://, gs://, file://).")
    k: int = option(10, "Classes kept per view.", type=click.IntRange(min=1))
    attention_grid: int = option(0, "Also store the teacher's G x G spatial attention map per view (class-token "
                                    "attention of a ViT's last block, or a CNN's feature energy); 0 = off.",
                                 type=click.IntRange(min=0))
    epochs: tuple[int, int] = option((0, 1), "E (epochs 0..E-1) or a range A:B, so several jobs can fill one store.",
                                     type=str, cli_default="1", show_default=True, convert=lambda v: parse_epochs(v))
    total_epochs: int | None = option(None, "Epochs the store holds when it is created by a job filling a range.",
                                      type=click.IntRange(min=1))
    teacher_weights: str | None = option(None, "Local checkpoint or .safetensors state_dict.",
                                         type=click.Path(dir_okay=False))
    teacher_input_size: int | None = option(None, "Teacher input size [default: its pretrained config's].",
                                            type=click.IntRange(min=1))
    seed: int = option(0, "Base seed of every view.")
    batch_size: int = option(64, "Teacher batch size (per rank).", type=click.IntRange(min=1))
    workers: int = option(4, "DataLoader workers (per rank).", type=click.IntRange(min=0))
    device: str | None = option(None, "cpu or cuda [default: cuda when available].")
    decode: str = decode_option()
    amp: str | None = option(None, "[default: bf16 on cuda, none on cpu]", type=click.Choice(["bf16", "fp16", "none"]))
    compile: bool = option(False, "torch.compile the teacher.")
    chunk_rows: int = option(DEFAULT_CHUNK_ROWS, "Rows per store chunk (storage layout only).", type=click.IntRange(min=2))
    shard_rows: int | None = option(None, "Rows per shard (written whole by one process) [default: 16 chunks].",
                                    type=click.IntRange(min=2))
    skip_bad: bool = option(False, "Skip unreadable images (counted, recorded in the store) instead of stopping.")
    overwrite: bool = option(False, "Replace an existing store instead of resuming it.")
    progress: bool = option(True, "Show a progress bar (views/s, ETA).")
    spec: AugSpec = option(AugSpec(), cli=False)  # the augmentation options (--img-size, ..., --render) fill it


def parse_kv(pairs) -> dict:
    """KEY=VALUE strings (or a mapping, from a YAML recipe) -> dict, values parsed as YAML scalars."""
    import yaml

    if isinstance(pairs, dict):
        return dict(pairs)
    out = {}
    for p in pairs or ():
        if "=" not in p:
            raise TinydistillError(f"`model_kwargs` {p}: expected KEY=VALUE")
        k, v = p.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


@dataclass
class TrainConfig:
    """Options of ``train-student`` (each field is one command-line option; see :mod:`tinydistill.config`)."""

    data: str = option(help="SRC the store was made from (training data).")
    student: str = option(help="timm model name (randomly initialised, unless --init or --pretrained).")
    out: str = option(help="Directory for checkpoints and metrics.", type=click.Path(file_okay=False))
    logits: str | None = option(None, "The logit store (offline KD). Not with --no-kd / --online-teacher.")
    val_data: str | None = option(None, "SRC evaluated (top-1/top-5) after every epoch.")
    epochs: int = option(10, "Training epochs.", type=click.IntRange(min=1))
    batch_size: int = option(128, "Batch size per rank.", type=click.IntRange(min=1))
    lr: float = option(1e-3, "Peak learning rate.")
    min_lr: float = option(1e-6, "Learning rate at the end of the cosine schedule.")
    weight_decay: float = option(0.05, "Weight decay.")
    warmup_epochs: float = option(1.0, "Linear warmup, in epochs (per-step schedule).")
    warmup_lr: float = option(1e-6, "Learning rate at the start of warmup.")
    opt: str = option("adamw", "timm optimizer name.")
    clip_grad: float | None = option(5.0, "Max gradient norm (0 = off).", convert=lambda v: v or None)
    drop_path: float = option(0.0, "Stochastic depth rate of the student.")
    ema: float | None = option(None, "Keep an EMA of the weights (ModelEmaV3); --ema alone uses decay 0.9998.",
                               is_flag=False, flag_value=0.9998)
    amp: str | None = option(None, "[default: bf16 on cuda, none on cpu]", type=click.Choice(["bf16", "fp16", "none"]))
    workers: int = option(4, "DataLoader workers (per rank).", type=click.IntRange(min=0))
    device: str | None = option(None, "cpu or cuda [default: cuda when available].")
    decode: str = decode_option()
    seed: int = option(0, "Student init and the order of every epoch.")
    resume: bool = option(False, "Continue from DIR/last.pth (model, optimizer, scheduler, EMA, epoch, step); "
                                 "options that change the result must be the checkpoint's.")
    overwrite: bool = option(False, "Start afresh in an --out that holds a run: its checkpoints and logs "
                                    "(last.pth, best.pth, metrics.jsonl, steps.jsonl, config.json, tb/) are deleted.")
    cycle_epochs: bool = option(False, "Reuse the store's epochs when --epochs exceeds them.")
    loss: str = option("soft_ce", "soft_ce: TinyViT; kl: KL with temperature; hard: DeiT hard distillation; "
                                  "dist: DIST (Pearson relations, Huang et al. 2022); bce: binary cross-entropy "
                                  "on the teacher's probabilities (VanillaKD).",
                       type=click.Choice(["soft_ce", "kl", "hard", "dist", "bce"]))
    temperature: float = option(1.0, "Temperature of --loss kl and dist (and of the soft_ce/bce targets).")
    dist_beta: float = option(1.0, "--loss dist: weight of the inter-class (per sample) relation.",
                              type=click.FloatRange(min=0))
    dist_gamma: float = option(1.0, "--loss dist: weight of the intra-class (per class, across the batch) "
                                    "relation.", type=click.FloatRange(min=0))
    alpha: float = option(1.0, "Weight of the teacher term; 1 - alpha goes to ground truth.")
    attention_weight: float = option(0.0, "Weight W of the attention term: W x MSE between the student's "
                                           "spatial attention map and the teacher's (stored, or live with "
                                           "--online-teacher); 0 = off.", type=click.FloatRange(min=0))
    attention_grid: int | None = option(None, "--online-teacher: grid of the maps [default: the --like store's, "
                                              "else 7]. Offline KD uses the store's.", type=click.IntRange(min=1))
    smoothing: float = option(0.1, "Label smoothing for --no-kd.")
    no_kd: bool = option(False, "Baseline: supervised on ground-truth labels, no store.")
    online_teacher: str | None = option(None, "Baseline: the same loss with this teacher run every step.")
    teacher_weights: str | None = option(None, "Weights of --online-teacher.", type=click.Path(dir_okay=False))
    teacher_input_size: int | None = option(None, "Input size of --online-teacher.", type=click.IntRange(min=1))
    k: int | None = option(None, "Online teacher: classes kept [default: all].", type=click.IntRange(min=1))
    view_seed: int | None = option(None, "Base seed of views for --no-kd/--online-teacher [default: --seed].")
    like: str | None = option(None, "--no-kd/--online-teacher: the views of this store (its augmentation and seed), "
                                    "so the baseline sees the same batches as offline KD from it (--no-kd: and the "
                                    "store's head size, when larger than the data's classes).", metavar="STORE")
    input_size: int | None = option(None, "Student input size [default: the views' size].", type=click.IntRange(min=1))
    init: str | None = option(None, "Start the student from these weights: a train-student checkpoint (last.pth / "
                                    "best.pth), a timm checkpoint or a state dict (.safetensors too). The classifier "
                                    "is kept when its shape fits, re-initialised otherwise.",
                              type=click.Path(dir_okay=False), metavar="PATH")
    pretrained: bool = option(False, "Start the student from timm's pretrained weights, found in the local cache "
                                     "(HF_HOME); never downloaded. The classifier as for --init.")
    model_kwargs: dict = option(factory=dict, help="Extra timm.create_model argument for the student, e.g. "
                                "patch_size=4 (repeatable).", multiple=True, metavar="KEY=VALUE", convert=parse_kv)
    num_classes: int | None = option(None, "Student classes; must match the store's.", type=click.IntRange(min=1))
    val_crop_pct: float | None = option(None, "Eval centre-crop fraction [default: the student's].")
    render: str | None = option(None, "Renderer of views: a store's own by default; --no-kd/--online-teacher "
                                      "without --like: torch on cuda, pil on cpu.", type=click.Choice(RENDERERS))
    allow_renderer_change: bool = option(False, "Replay a store's views with another --render than the store's; "
                                                "the replay canary then reports the pixel difference instead of refusing.")
    progress: bool = option(True, "Show progress bars.")
    log_interval: int = option(50, "Steps between reads of the loss from the device (steps.jsonl lines, the "
                                   "progress bar, the non-finite-loss check). Each read waits for the GPU to "
                                   "finish; reading every step would stop the CPU from queueing work ahead.",
                               type=click.IntRange(min=1))
    spec: AugSpec = option(factory=AugSpec, cli=False)  # views for no_kd / online (a store brings its own)
    expect_spec: bool = option(False, cli=False)  # offline: ``spec`` came from a recipe and must equal the store's


@dataclass
class VerifyConfig:
    """Options of ``verify`` (the store itself is its argument)."""

    data: str = option(help="SRC the store was made from.")
    teacher: str = option(help="The teacher the store was made with.")
    teacher_weights: str | None = option(None, "Local checkpoint or .safetensors state_dict.",
                                         type=click.Path(dir_okay=False))
    samples: int = option(64, "Random views to replay (distinct; all of them when the store holds fewer).",
                          type=click.IntRange(min=1))
    seed: int = option(0, "Which random views.")
    device: str | None = option(None, "[default: cuda when available]")
    decode: str = decode_option()
    amp: str | None = option(None, "[default: the store's]", type=click.Choice(["bf16", "fp16", "none"]))
    max_logp_diff: float = option(0.0, "Largest allowed |delta log-prob| (after fp16 rounding). 0 = exact: "
                                       "same hardware and dtype.")
    min_id_agreement: float = option(1.0, "Smallest allowed fraction of views with the same top-K class ids.")
    max_attention_diff: float = option(0.0, "Stores with attention maps: largest allowed |delta| of a map cell, "
                                            "in units of the map's mass (maps sum to 1). 0 = exact.")
    render: str | None = option(None, "Renderer of views [default: the store's].", type=click.Choice(RENDERERS))
    allow_renderer_change: bool = option(False, "Replay with another --render than the store's; the canary then "
                                                "reports the pixel difference.")
