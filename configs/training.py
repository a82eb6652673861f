"""Typed training configs: optimiser, checkpointing, data, loop; presets for Nexus-Gen's AR stages and decoders.

Full-size presets follow the released Nexus-Gen scripts (``../shared/reference/nexus-gen.md`` section 4); ``tiny_*``
presets are for tests and CPU smoke runs.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal

from configs.mesh import MeshConfig
from configs.qwen2_5 import REMAT_POLICIES

ScheduleKind = Literal["cosine", "constant"]


REMAT_CHOICES = REMAT_POLICIES  # the --remat choices


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW + linear warmup + (cosine | constant) schedule + global-norm clipping.

    ``trainable`` / ``frozen`` are regular expressions matched against a parameter's ``/``-joined path
    (e.g. ``model/layers/0/self_attn/q_proj/kernel``); a parameter trains when it matches some ``trainable``
    pattern and no ``frozen`` pattern. ``nexus-jax train`` sets ``decay_steps`` to the run's total steps unless it
    is given explicitly (``--set optim.decay_steps=N``), so ``--steps`` longer than the preset keeps a live schedule.
    """

    learning_rate: float = 1e-5
    warmup_steps: int = 100
    schedule: ScheduleKind = "cosine"
    decay_steps: int = 10_000
    min_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    clip_norm: float | None = 1.0
    grad_accum: int = 1
    trainable: tuple[str, ...] = (".*",)
    frozen: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0 or self.decay_steps < 1:
            raise ValueError(f"warmup_steps >= 0 and decay_steps >= 1 required, got {self.warmup_steps}, "
                             f"{self.decay_steps}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax CheckpointManager settings. ``resume``: 'none' | 'latest' | 'latest-valid' | a step number."""

    directory: str = "checkpoints"
    every_steps: int = 1000
    keep_last: int = 3
    async_save: bool = True
    resume: str = "latest-valid"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Input pipeline: where records live and how batches are shaped.

    Sequences are bucketed per batch: each batch is padded to the smallest ``length_buckets`` entry that holds its
    longest sequence; records longer than the largest bucket are skipped and counted.
    """

    path: str = ""  # JSONL file, or an array_record dataset directory written by the TFDS builder
    image_root: str = ""
    seed: int = 0
    num_epochs: int | None = None  # None: repeat forever
    eval_path: str = ""  # optional held-out records for periodic eval
    length_buckets: tuple[int, ...] = (512, 1024, 2048, 4096)
    max_input_images: int = 2  # AR: input images per record (more: the record is skipped as broken)
    max_output_images: int = 1  # AR: output images per record
    image_size: int = 512  # decoders: short-side resize + centre crop to image_size x image_size
    num_threads: int = 4  # Grain prefetch threads
    prefetch: int = 64

    def __post_init__(self) -> None:
        if not self.length_buckets or list(self.length_buckets) != sorted(set(self.length_buckets)):
            raise ValueError(f"length_buckets must be strictly increasing and non-empty, got {self.length_buckets}")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Loop length, batch shape, logging and evaluation cadence."""

    total_steps: int = 10_000
    batch_size: int = 128  # global, per optimiser step (split into grad_accum micro-batches)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: no periodic eval
    eval_batches: int = 4
    compute_dtype: str = "bfloat16"
    remat: str = "none"  # per decoder layer / DiT block: "none" | "full" | "dots" | "dots_no_batch"
    log_dir: str = ""  # TensorBoard directory; "" = stdout only

    def __post_init__(self) -> None:
        if self.total_steps < 1 or self.batch_size < 1:
            raise ValueError(f"total_steps and batch_size must be >= 1, got {self.total_steps}, {self.batch_size}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compute_dtype must be 'float32' or 'bfloat16', got {self.compute_dtype!r}")
        if self.remat not in REMAT_CHOICES:
            raise ValueError(f"remat must be one of {REMAT_CHOICES}, got {self.remat!r}")


@dataclasses.dataclass(frozen=True)
class ARLossConfig:
    """Nexus-Gen AR loss weights: token_weight * CE + image_weight * (0.5 MSE + 0.5 (1 - cos))."""

    token_weight: float = 3.0
    image_weight: float = 3.0


@dataclasses.dataclass(frozen=True)
class FlowLossConfig:
    """Flow-matching decoder loss: shifted sigmas (shift 3), Gaussian timestep weighting as in DiffSynth.

    ``embed_noise``: conditioning augmentation, off by default (upstream trains without it). Each record's target
    embeddings ``embed`` [N, D] get Gaussian noise of std ``embed_noise * rms(embed)`` (that record's RMS) before the
    conditioner, so a decoder trained on a few distinct AR predictions also serves the unseen ones near them.

    ``cond_dropout``: classifier-free-guidance training, off by default (upstream's decoders are fine-tuned from FLUX,
    which already knows the empty prompt). That fraction of each batch's rows (``round(cond_dropout * batch)``, the
    last rows of the shuffled batch; at least one) is conditioned on the empty prompt (T5("") + CLIP(""), the negative
    branch of true CFG at sampling) instead of its embeddings, so ``cfg_scale != 1`` has an unconditional velocity to
    guide against. Needs ``--init-from`` (the checkpoint's ``empty_prompt.safetensors``).
    """

    shift: float = 3.0
    num_train_timesteps: int = 1000
    weighted: bool = True
    guidance: float = 3.5
    embed_noise: float = 0.0
    cond_dropout: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.embed_noise <= 10.0:
            raise ValueError(f"flow_loss.embed_noise must be in [0, 10] (a fraction of the embedding's RMS), "
                             f"got {self.embed_noise}")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"flow_loss.cond_dropout must be in [0, 1) (the fraction of rows conditioned on the empty "
                             f"prompt), got {self.cond_dropout}")

    def dropped_rows(self, batch: int) -> int:
        """How many of ``batch`` rows :attr:`cond_dropout` conditions on the empty prompt (0 when it is off)."""
        if self.cond_dropout == 0.0:
            return 0
        k = max(1, round(self.cond_dropout * batch))
        if k >= batch:
            raise ValueError(f"flow_loss.cond_dropout {self.cond_dropout} drops all {batch} rows of the batch; lower "
                             "it or raise the batch size")
        return k


@dataclasses.dataclass(frozen=True)
class UniPicLossConfig:
    """UniPic-1 training (nexus_jax.training.unipic_loop): task weights as upstream (image2text 0.01, text2image 1,
    image_edit 1; only the preset's task is present) and the prompt dropout of generation / editing rows (the row's
    prompt replaced by "Generate an image." / "Edit this image.")."""

    prompt_dropout: float = 0.1
    image2text_weight: float = 0.01
    text2image_weight: float = 1.0
    image_edit_weight: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"unipic_loss.prompt_dropout must be in [0, 1), got {self.prompt_dropout}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training job: which loop, which model preset, and all the sub-configs."""

    task: Literal["ar", "generation_decoder", "editing_decoder", "unipic_t2i", "unipic_edit",
                  "unipic_understanding"] = "ar"
    model_preset: str = "tiny"
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    data: DataConfig = DataConfig()
    loop: LoopConfig = LoopConfig()
    mesh: MeshConfig = MeshConfig()
    ar_loss: ARLossConfig = ARLossConfig()
    flow_loss: FlowLossConfig = FlowLossConfig()
    unipic_loss: UniPicLossConfig = UniPicLossConfig()


# --- Nexus-Gen presets -------------------------------------------------------------------------------------------
# The paper's per-stage table could not be read (nexus-gen.md section 4.1); the three stages below are an inferred
# schedule: (1) align the new heads on a frozen LLM, (2) multi-task pre-training of the whole LLM with the V1 recipe,
# (3) the released V2 fine-tuning recipe. ViT (and its merger) are frozen in every stage.
_VIT_FROZEN = (r"(^|/)visual/",)

AR_STAGE1 = TrainConfig(
    task="ar",
    model_preset="nexus_gen_v2",
    optim=OptimConfig(learning_rate=1e-4, warmup_steps=500, decay_steps=20_000, grad_accum=8,
                      trainable=(r"(^|/)vision_head/", r"(^|/)image_prefill_embeds(/|$)"), frozen=_VIT_FROZEN),
    loop=LoopConfig(total_steps=20_000, batch_size=128),
    ar_loss=ARLossConfig(token_weight=0.1, image_weight=1.0),
)
AR_STAGE2 = dataclasses.replace(
    AR_STAGE1,
    optim=OptimConfig(learning_rate=1e-4, warmup_steps=2_000, decay_steps=200_000, grad_accum=8, frozen=_VIT_FROZEN),
    loop=LoopConfig(total_steps=200_000, batch_size=128),
)
AR_STAGE3 = dataclasses.replace(
    AR_STAGE1,
    optim=OptimConfig(learning_rate=1e-5, warmup_steps=500, decay_steps=10_000, grad_accum=8, frozen=_VIT_FROZEN),
    loop=LoopConfig(total_steps=10_000, batch_size=128),
    ar_loss=ARLossConfig(token_weight=3.0, image_weight=3.0),
)
GENERATION_DECODER = TrainConfig(
    task="generation_decoder",
    model_preset="flux_dev",
    optim=OptimConfig(learning_rate=1e-5, warmup_steps=100, schedule="constant", grad_accum=16, weight_decay=0.01),
    loop=LoopConfig(total_steps=100_000, batch_size=128),
)
EDITING_DECODER = dataclasses.replace(GENERATION_DECODER, task="editing_decoder")

# Tiny presets: CPU-sized, float32, fast checkpoints.
TINY_AR = TrainConfig(
    task="ar",
    model_preset="tiny",
    optim=OptimConfig(learning_rate=3e-3, warmup_steps=2, decay_steps=40, weight_decay=0.0, clip_norm=1.0),
    checkpoint=CheckpointConfig(every_steps=10, keep_last=3, async_save=True),
    data=DataConfig(length_buckets=(128, 256, 512, 1024), num_threads=1, prefetch=8),
    loop=LoopConfig(total_steps=40, batch_size=4, log_every=5, compute_dtype="float32"),
    ar_loss=ARLossConfig(token_weight=1.0, image_weight=1.0),
)
TINY_GENERATION_DECODER = TrainConfig(
    task="generation_decoder",
    model_preset="tiny",
    optim=OptimConfig(learning_rate=3e-3, warmup_steps=2, decay_steps=40, weight_decay=0.0, clip_norm=1.0),
    checkpoint=CheckpointConfig(every_steps=10, keep_last=3, async_save=True),
    data=DataConfig(image_size=32, num_threads=1, prefetch=8),
    loop=LoopConfig(total_steps=40, batch_size=4, log_every=5, compute_dtype="float32"),
)
TINY_EDITING_DECODER = dataclasses.replace(TINY_GENERATION_DECODER, task="editing_decoder")
# the trained default model's generation decoder (a wider, deeper tiny DiT; scripts/train_default_model.py)
SHAPES_GENERATION_DECODER = dataclasses.replace(TINY_GENERATION_DECODER, model_preset="shapes")

# --- UniPic-1 presets (../shared/reference/unipic.md 4.2, stage 3/4 settings: AdamW (0.9, 0.95), eps 1e-15, wd 0.02,
# clip 1.0, cosine, global batch 512; generation / editing at 1024 px, understanding at 512 px). One task per preset;
# the KL-16 VAE is frozen (the task adds it); `--set optim.frozen=...` freezes more (stage 2: the LLM).
_UNIPIC_OPTIM = OptimConfig(learning_rate=1e-5, warmup_steps=200, decay_steps=20_000, b2=0.95, eps=1e-15,
                            weight_decay=0.02, clip_norm=1.0, grad_accum=32)
UNIPIC_T2I = TrainConfig(
    task="unipic_t2i",
    model_preset="unipic_1_5b",
    optim=_UNIPIC_OPTIM,
    data=DataConfig(image_size=1024, length_buckets=(128, 256, 512)),
    loop=LoopConfig(total_steps=20_000, batch_size=512),
)
UNIPIC_EDIT = dataclasses.replace(  # 4160 <image> slots (64 x 64 tokens + 64 buffers) + the instruction
    UNIPIC_T2I, task="unipic_edit", data=DataConfig(image_size=1024, length_buckets=(4352, 4608, 5120)))
UNIPIC_UNDERSTANDING = dataclasses.replace(  # 1088 <image> slots at 512 px + question + answer
    UNIPIC_T2I, task="unipic_understanding", data=DataConfig(image_size=512, length_buckets=(1280, 1536, 2048, 4096)))
TINY_UNIPIC_T2I = TrainConfig(
    task="unipic_t2i",
    model_preset="tiny",
    optim=OptimConfig(learning_rate=3e-3, warmup_steps=2, decay_steps=40, weight_decay=0.0, clip_norm=1.0),
    checkpoint=CheckpointConfig(every_steps=10, keep_last=3, async_save=True),
    data=DataConfig(image_size=64, length_buckets=(64, 128, 256), num_threads=1, prefetch=8),
    loop=LoopConfig(total_steps=40, batch_size=4, log_every=5, compute_dtype="float32"),
)
TINY_UNIPIC_EDIT = dataclasses.replace(TINY_UNIPIC_T2I, task="unipic_edit")
TINY_UNIPIC_UNDERSTANDING = dataclasses.replace(TINY_UNIPIC_T2I, task="unipic_understanding")

PRESETS: dict[str, TrainConfig] = {
    "ar_stage1": AR_STAGE1,
    "ar_stage2": AR_STAGE2,
    "ar_stage3": AR_STAGE3,
    "generation_decoder": GENERATION_DECODER,
    "editing_decoder": EDITING_DECODER,
    "tiny_ar": TINY_AR,
    "tiny_generation_decoder": TINY_GENERATION_DECODER,
    "tiny_editing_decoder": TINY_EDITING_DECODER,
    "shapes_generation_decoder": SHAPES_GENERATION_DECODER,
    "unipic_t2i": UNIPIC_T2I,
    "unipic_edit": UNIPIC_EDIT,
    "unipic_understanding": UNIPIC_UNDERSTANDING,
    "tiny_unipic_t2i": TINY_UNIPIC_T2I,
    "tiny_unipic_edit": TINY_UNIPIC_EDIT,
    "tiny_unipic_understanding": TINY_UNIPIC_UNDERSTANDING,
}


# --- dotted overrides (``nexus-jax train --set optim.decay_steps=500``) -------------------------------------------
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _parse_value(text: str, tp: Any, where: str) -> Any:
    """``text`` as a value of type ``tp`` (int, float, bool, str, Literal, X | None, tuple[X, ...])."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.strip().lower() in ("none", "null"):
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return _parse_value(text, a, where)
            except ValueError:
                pass
        raise ValueError(f"{where}: cannot read {text!r} as {tp}" + (" or None" if type(None) in args else ""))
    if origin is Literal:
        if text not in [str(a) for a in args]:
            raise ValueError(f"{where}: {text!r} is not one of {list(args)}")
        return next(a for a in args if str(a) == text)
    if origin is tuple:
        items = [t.strip() for t in text.split(",") if t.strip()]
        item_tp = args[0] if args else str
        return tuple(_parse_value(t, item_tp, where) for t in items)
    if tp is bool:
        low = text.strip().lower()
        if low not in _TRUE + _FALSE:
            raise ValueError(f"{where}: {text!r} is not a boolean (true/false)")
        return low in _TRUE
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise ValueError(f"{where}: {text!r} is not {'an integer' if tp is int else 'a number'}") from None
    if tp is str:
        return text
    raise ValueError(f"{where}: fields of type {tp} cannot be set from the command line")


def _set_path(node: Any, path: list[str], text: str, full: str) -> Any:
    """``node`` (a frozen dataclass) with the field at ``path`` set from ``text`` (validated by __post_init__)."""
    names = [f.name for f in dataclasses.fields(node)]
    if path[0] not in names:
        raise ValueError(f"--set {full}: {type(node).__name__} has no field {path[0]!r}; fields: {names}")
    hints = typing.get_type_hints(type(node))
    value = getattr(node, path[0])
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if len(path) == 1:
            sub = [f.name for f in dataclasses.fields(value)]
            raise ValueError(f"--set {full}: {path[0]!r} is a section; set one of its fields {sub}")
        new = _set_path(value, path[1:], text, full)
    elif len(path) > 1:
        raise ValueError(f"--set {full}: {path[0]!r} is a {type(value).__name__} value, not a section")
    else:
        new = _parse_value(text, hints[path[0]], f"--set {full}")
    try:
        return dataclasses.replace(node, **{path[0]: new})
    except (ValueError, TypeError) as e:
        raise ValueError(f"--set {full}: {e}") from None


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """``cfg`` with each ``section.field=value`` override applied in order (typed by the field's annotation).

    Raises ValueError naming an unknown field, a malformed override or a value the field rejects.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected section.field=value, e.g. optim.decay_steps=500")
        cfg = _set_path(cfg, key.strip().split("."), text, item)
    return cfg


def override_keys(overrides: Sequence[str]) -> set[str]:
    """The dotted field names of ``overrides`` (``{"optim.decay_steps"}``)."""
    return {item.partition("=")[0].strip() for item in overrides}
