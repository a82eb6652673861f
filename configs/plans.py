"""Plan configs for ``nexus-jax plan``: what to compile (workload + model + batch) and the slice it is meant for.

Full-size presets follow the Nexus-Gen recipes (../shared/reference/nexus-gen.md sections 4.1-4.3: global batch 128,
4096-token AR sequences, 512x512 decoder images, 50-step sampling with CFG 3); ``tiny_*`` presets are for tests
(compiled for v5p:2x2x1). ``mesh`` is (data, fsdp, tensor); one entry may be -1 (takes the remaining devices).
Whether a config can run on a slice (mesh size, batch vs hosts and data x fsdp, model dims vs mesh axes) is checked
by :func:`launch.checks.check_plan` before ``plan`` compiles or ``launch`` prints anything.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from configs import nexus_gen, unipic
from configs.flux import FluxDiTConfig
from configs.nexus_decoders import MergerConfig
from configs.qwen2_5 import REMAT_POLICIES

WorkloadKind = Literal["matmul_train", "ar_train", "decoder_train", "decoder_sample", "unipic_train"]
REMAT_CHOICES = REMAT_POLICIES  # the --remat choices


@dataclasses.dataclass(frozen=True)
class MatmulConfig:
    """Matmul-only model: ``num_layers`` bias-free square Linear layers of width ``dim`` (hand-checkable)."""

    dim: int = 256
    num_layers: int = 4
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dim < 1 or self.num_layers < 1:
            raise ValueError(f"dim and num_layers must be >= 1, got dim={self.dim} num_layers={self.num_layers}")


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """One plannable job.

    ``global_batch`` is per optimiser step (training) or per sampling call (inference); ``seq_len`` the AR sequence
    length; ``image_size`` the decoder resolution (pixels, square); ``context_len`` the decoder conditioning tokens
    (81 generation, 405 editing); ``num_steps``/``cfg_scale`` the sampler; ``param_dtype``/``compute_dtype`` the
    storage / compute dtypes of the model.
    """

    name: str
    workload: WorkloadKind
    model: Any  # MatmulConfig | NexusGenConfig | FluxDiTConfig | UniPicConfig
    topology: str
    mesh: tuple[int, int, int] = (1, -1, 1)
    remat: str = "full"
    global_batch: int = 8
    seq_len: int = 0
    image_size: int = 512
    context_len: int = 81
    num_steps: int = 50
    cfg_scale: float = 3.0
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    description: str = ""
    merger: Any = None  # MergerConfig of the editing decoder (None: full size)
    job: tuple[str, ...] = ()  # the nexus-jax command a launched slice runs (data / run-dir flags are appended)

    def __post_init__(self) -> None:
        if self.remat not in REMAT_CHOICES:
            raise ValueError(f"remat={self.remat!r} is not one of {REMAT_CHOICES}")
        if self.global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {self.global_batch}")
        if len(self.mesh) != 3:
            raise ValueError(f"mesh must be (data, fsdp, tensor), got {self.mesh}")
        if self.workload.startswith("decoder") and self.image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 (8x VAE, 2x2 packing), got {self.image_size}")

    def replace(self, **changes: Any) -> PlanConfig:
        return dataclasses.replace(self, **changes)


def _ar_model(**text_overrides: Any) -> Any:
    cfg = nexus_gen.nexus_gen_v2()
    return cfg.replace(vl=dataclasses.replace(cfg.vl, text=cfg.vl.text.replace(**text_overrides)))


def _tiny_ar_model(**text_overrides: Any) -> Any:
    cfg = nexus_gen.tiny()
    return cfg.replace(vl=dataclasses.replace(cfg.vl, text=cfg.vl.text.replace(**text_overrides)))


PLANS: dict[str, PlanConfig] = {}


def _add(plan: PlanConfig) -> PlanConfig:
    PLANS[plan.name] = plan
    return plan


# --- full size --------------------------------------------------------------------------------------------------
AR_TRAIN = _add(PlanConfig(
    name="ar_train",
    workload="ar_train",
    model=_ar_model(param_dtype="float32", dtype="bfloat16"),
    topology="v5p:4x4x4",
    mesh=(1, -1, 1),
    remat="none",  # 95 GiB HBM holds every layer's activations (attention scores are recomputed per query chunk)
    global_batch=128,
    seq_len=4096,
    description="Nexus-GenV2 AR full fine-tune (8.3B; ViT frozen), 128 x 4096 tokens per step, fp32 master weights",
    job=("train", "--preset", "ar_stage3", "--mesh", "1,-1,1", "--batch-size", "128", "--grad-accum", "1",
         "--compute-dtype", "bfloat16"),
))
AR_TRAIN_V6E = _add(AR_TRAIN.replace(
    name="ar_train_v6e", topology="v6e:8x8", global_batch=64, remat="full",
    description="AR full fine-tune on v6e-64: 64 x 4096 tokens per step (global batch 128 = 2 accumulation steps)",
    job=("train", "--preset", "ar_stage3", "--mesh", "1,-1,1", "--batch-size", "128", "--grad-accum", "2",
         "--compute-dtype", "bfloat16"),
))
GENERATION_DECODER_TRAIN = _add(PlanConfig(
    name="generation_decoder_train",
    workload="decoder_train",
    model=FluxDiTConfig.full(),
    topology="v6e:2x4",
    mesh=(1, -1, 1),
    remat="full",
    global_batch=128,  # the recipe's batch in one step, 16 images per chip: amortises the fsdp weight traffic
    image_size=512,
    context_len=81,
    param_dtype="bfloat16",
    description="generation decoder (FLUX.1-dev DiT + adapter, 11.9B) full fine-tune at 512x512 on v6e-8, 128 images "
                "per step; bf16 weights and Adam moments (fp32 master + moments need 16 B/param = 24 GiB/chip "
                "before activations)",
    job=("train", "--preset", "generation_decoder", "--mesh", "1,-1,1", "--batch-size", "128", "--grad-accum", "1",
         "--compute-dtype", "bfloat16"),
))
EDITING_DECODER_TRAIN = _add(GENERATION_DECODER_TRAIN.replace(
    name="editing_decoder_train", context_len=405, topology="v5p:2x2x2", param_dtype="float32", global_batch=8,
    description="editing decoder (DiT + 1-layer Qwen merger, 12.3B) at 512x512, 81 + 324 conditioning tokens; v5p-16",
    job=("train", "--preset", "editing_decoder", "--mesh", "1,-1,1", "--batch-size", "8", "--grad-accum", "1",
         "--compute-dtype", "bfloat16"),
))
GENERATION_SAMPLE = _add(PlanConfig(
    name="generation_sample_512",
    workload="decoder_sample",
    model=FluxDiTConfig.full(),
    topology="v6e:2x4",
    mesh=(2, 1, 4),  # the mesh of benchmarks/results/plan_generation_sample_512_v6e-2x4.json
    remat="none",
    global_batch=8,
    image_size=512,
    context_len=81,
    num_steps=50,
    cfg_scale=3.0,
    param_dtype="bfloat16",
    description="batch inference: 8 images at 512x512, 50 Euler steps, CFG 3 (negative: 512 T5 tokens), bf16",
    job=("infer", "--mesh", "2,1,4"),  # the inference CLI's default mesh is data-only
))
FLUX_DEV_SAMPLE_1024 = _add(GENERATION_SAMPLE.replace(
    name="flux_dev_sample_1024",
    topology="v6e:2x2",
    mesh=(4, 1, 1),  # one image per chip, weights replicated (23.8 GB bf16 of 32 GiB)
    global_batch=4,
    image_size=1024,
    context_len=512,
    num_steps=28,
    cfg_scale=1.0,
    description="MaxDiffusion's published FLUX.1-dev figure (4 images at 1024x1024, 28 steps, no true CFG, v6e-4: "
                "5.5 s) planned with this project's sampler: the DiT with embedded guidance over 4096 image + 512 "
                "context tokens (the generation adapter in front of the context: <0.1% of the FLOPs)",
    job=("infer", "--mesh", "4,1,1"),
))
UNIPIC_TRAIN = _add(PlanConfig(
    name="unipic_train",
    workload="unipic_train",
    model=unipic.full(),
    topology="v6e:2x4",
    mesh=(1, -1, 1),
    remat="full",
    global_batch=16,
    seq_len=128,  # prompt tokens (the LLM runs over 128 + 64 buffers + 4096 image slots)
    image_size=1024,
    description="UniPic-1 (1.5B LLM + MAR-Huge + head, 2.5B trained; KL-16 VAE frozen) text-to-image step at "
                "1024x1024 (4096 image tokens), 16 images per step, fp32 master weights, bf16 compute",
    job=("train", "--preset", "unipic_t2i", "--mesh", "1,-1,1", "--batch-size", "16", "--grad-accum", "1",
         "--compute-dtype", "bfloat16"),
))
# --- tiny (tests) -----------------------------------------------------------------------------------------------
TINY_MATMUL = _add(PlanConfig(
    name="tiny_matmul", workload="matmul_train", model=MatmulConfig(dim=256, num_layers=4), topology="v5p:2x2x1",
    mesh=(1, 4, 1), remat="none", global_batch=4096, compute_dtype="float32",
    description="matmul-only stack for hand-checked memory / FLOPs",
))
TINY_AR = _add(PlanConfig(
    name="tiny_ar_train", workload="ar_train", model=_tiny_ar_model(), topology="v5p:2x2x1", mesh=(1, 4, 1),
    remat="full", global_batch=8, seq_len=256, compute_dtype="float32",
))
TINY_DECODER = _add(PlanConfig(
    name="tiny_decoder_train", workload="decoder_train", model=FluxDiTConfig.tiny(), topology="v5p:2x2x1",
    mesh=(1, 4, 1), remat="full", global_batch=4, image_size=64, context_len=81, compute_dtype="float32",
))
TINY_EDIT = _add(PlanConfig(
    name="tiny_editing_decoder_train", workload="decoder_train", model=FluxDiTConfig.tiny(), topology="v5p:2x2x1",
    mesh=(1, 4, 1), remat="full", global_batch=4, image_size=64, context_len=405, compute_dtype="float32",
    merger=MergerConfig.tiny(out_dim=32),
))
TINY_SAMPLE = _add(PlanConfig(  # 2 heads: tensor=2 must divide the head count (launch.checks)
    name="tiny_decoder_sample", workload="decoder_sample", model=FluxDiTConfig.tiny(num_heads=2), topology="v5p:2x2x1",
    mesh=(2, 1, 2), remat="none", global_batch=4, image_size=64, context_len=81, num_steps=4,
    compute_dtype="float32",
))
TINY_UNIPIC = _add(PlanConfig(  # v6e:2x4 with fsdp 8: XLA windows the weight all-gathers (see launch.compiled)
    name="tiny_unipic_train", workload="unipic_train", model=unipic.tiny(), topology="v6e:2x4", mesh=(1, -1, 1),
    remat="full", global_batch=8, seq_len=32, image_size=256,  # bf16 compute, as the full plan
))


def get_plan(name: str) -> PlanConfig:
    """The preset called ``name``; ValueError listing the known presets otherwise."""
    if name not in PLANS:
        raise ValueError(f"unknown plan config {name!r}; known configs: {sorted(PLANS)}")
    return PLANS[name]
