"""Workloads: what the planner compiles. Each turns a :class:`configs.plans.PlanConfig` into a program builder.

A :class:`Workload` builds an abstract, sharded :class:`launch.compiled.Program` for a mesh, optionally at reduced
depth (``overrides`` such as ``{"layers": 2}``; the planner uses those loop-free reduced programs to extrapolate
costs when the full program has while loops, see :func:`launch.compiled.extrapolate`). Model-independent workloads
are in :data:`BUILDERS`; a model family declares its own with the family (``nexus_jax.families``, ``workloads``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from configs.nexus_decoders import MergerConfig
from configs.plans import PlanConfig
from configs.training import OptimConfig
from launch import flops, kernels
from launch.compiled import NO_WINDOWED_EINSUM, Program, no_windowed_einsum_note
from launch.train_program import LowerInContext, abstract_batch, train_program
from nexus_jax import layers, sharding

Overrides = Mapping[str, int]


@dataclasses.dataclass(frozen=True)
class Workload:
    """A plannable program family.

    ``depths``: full-size repeat counts of identical blocks (knob -> count), for cost extrapolation.
    ``cost_multiplier``: the full program repeats the depth-extrapolated program this many times (sampling steps;
    extrapolation then builds with ``{"steps": 1}``). ``model_flops``: analytic FLOPs per step, whole slice.
    """

    name: str
    build: Callable[[Mesh, Overrides | None], Program]
    depths: Mapping[str, int]
    model_flops: float
    tokens_per_step: int
    rules: sharding.Rules
    cost_multiplier: int = 1
    notes: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    compiler_options: Mapping[str, Any] | None = None  # XLA options every compile of the plan uses
    # per-device work of the Mosaic kernels in the step for mesh (data, fsdp, tensor), which XLA's cost model does
    # not price (launch.kernels); None = the program has no kernels
    kernel_cost: Callable[[tuple[int, int, int]], kernels.KernelCost] | None = None


def _optim(frozen: tuple[str, ...] = ()) -> OptimConfig:
    return OptimConfig(learning_rate=1e-5, warmup_steps=100, frozen=frozen)


# --- matmul-only ----------------------------------------------------------------------------------------------
def matmul_workload(plan: PlanConfig, remat: str) -> Workload:
    from launch.matmul_model import MatmulStack, matmul_loss, train_flops

    cfg = plan.model

    def build(mesh: Mesh, overrides: Overrides | None) -> Program:
        c = dataclasses.replace(cfg, num_layers=overrides["layers"]) if overrides else cfg
        return train_program(
            lambda: MatmulStack(c, remat=remat, rngs=nnx.Rngs(0)), matmul_loss,
            {"x": ((plan.global_batch, c.dim), jnp.dtype(plan.compute_dtype), ("batch", None))},
            _optim(), plan.compute_dtype, mesh, sharding.TRAIN_RULES,
        )

    return Workload("matmul_train", build, {"layers": cfg.num_layers}, train_flops(cfg, plan.global_batch),
                    plan.global_batch, sharding.TRAIN_RULES, notes={"loss": "mean(y^2)", "optimizer": "adamw"})


# --- Mosaic kernels -------------------------------------------------------------------------------------------
def _splash_shard(sizes: tuple[int, int, int], batch: int, heads: int, kv_heads: int) -> tuple[int, int]:
    """(sequences, query heads) one device's splash kernel runs on mesh (data, fsdp, tensor): the batch split over
    data x fsdp, the heads over tensor when the kv heads split too, else all heads (layers.splash_attention)."""
    data, fsdp, tensor = sizes
    return batch // (data * fsdp), heads // tensor if kv_heads % tensor == 0 else heads


# --- Nexus-Gen AR ---------------------------------------------------------------------------------------------
def _ar_loss(model: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
    """The Nexus-Gen AR objective with the token CE over :class:`LazyLogits` (logits chunked over tokens, like
    ``nexus_jax.nexus.loss.model_loss``): the full fp32 [B, L, 152064] logits never exist."""
    from nexus_jax.nexus.loss import LazyLogits, nexus_ar_loss

    del rng
    cfg = model.config
    out = model(batch["input_ids"], positions=batch["positions"], slot_index=batch["slot_index"],
                attention_mask=batch["attention_mask"], with_logits=False)
    logits = LazyLogits(out.hidden_states, model.language_model.logits, cfg.vl.text.vocab_size)
    loss, parts = nexus_ar_loss(logits, out.image_embeds, batch["labels"], batch["image_targets"],
                                image_token_id=cfg.tokens.image_pad, token_weight=cfg.token_loss_weight,
                                image_weight=cfg.image_loss_weight)
    return loss, {k: v for k, v in parts.items() if k.endswith("loss")}


def ar_workload(plan: PlanConfig, remat: str) -> Workload:
    from nexus_jax.models.nexus_ar import NexusGenAR

    cfg = plan.model
    # "auto" attention resolves as on the TPU the plan is for (the splash kernel), not as on this host
    attention = layers.resolve_attention_impl(cfg.vl.text.attention_impl, platform="tpu")
    text = cfg.vl.text.replace(remat=remat, attention_impl=attention)
    b, s, d = plan.global_batch, plan.seq_len, text.hidden_size
    if s < cfg.num_slots + 2:
        raise ValueError(f"seq_len={s} cannot hold the {cfg.num_slots} output-image slots plus their markers")
    i32 = jnp.int32
    batch = {
        "input_ids": ((b, s), i32, ("batch", "length")),
        "labels": ((b, s), i32, ("batch", "length")),
        "attention_mask": ((b, s), i32, ("batch", "length")),
        "slot_index": ((b, s), i32, ("batch", "length")),
        "positions": ((3, b, s), i32, (None, "batch", "length")),
        "image_targets": ((b, s, d), jnp.dtype(text.dtype), ("batch", "length", "act_embed")),
    }

    def build(mesh: Mesh, overrides: Overrides | None) -> Program:
        t = text.replace(num_layers=overrides["layers"]) if overrides else text
        c = cfg.replace(vl=dataclasses.replace(cfg.vl, text=t))
        return train_program(lambda: NexusGenAR(c, rngs=nnx.Rngs(0)), _ar_loss, batch,
                             _optim(frozen=(r"(^|/)visual/",)), plan.compute_dtype, mesh, sharding.TRAIN_RULES)

    model_flops = flops.ar_train_flops(text, b, s, extra_matmul_params=d * d)
    kernel_cost = None
    if attention == "splash":
        attention_note = (f"Pallas splash kernel, causal, {layers.splash_block(s, causal=True)}-token tiles "
                          "(nexus_jax.layers.splash_attention); priced outside XLA's cost model (launch.kernels)")

        def kernel_cost(sizes: tuple[int, int, int]) -> kernels.KernelCost:
            sequences, heads = _splash_shard(sizes, b, text.num_heads, text.num_kv_heads)
            return text.num_layers * kernels.splash_cost(
                sequences, heads, s, text.head_dim, causal=True, itemsize=jnp.dtype(plan.compute_dtype).itemsize,
                forward_passes=1 if remat == "none" else 2, backward_passes=1)
    elif attention in ("xla", "jax_nn"):
        attention_note = (f"causal query chunks of 512 ({attention}; nexus_jax.models.qwen2.attention."
                          "causal_chunked_attention)")
    else:
        raise ValueError(f"unexpected attention implementation {attention!r}")
    notes = {
        "loss": "nexus_jax.nexus.loss.nexus_ar_loss (token CE + 0.5 MSE + 0.5 (1 - cos) on output slots); CE over "
                "LazyLogits: fp32 logits in 512-token chunks, recomputed in the backward pass",
        "attention": attention_note,
        "model": "nexus_jax.models.nexus_ar.NexusGenAR (ViT parameters frozen, held in HBM)",
        "inputs": "image targets are precomputed frozen-ViT features (the ViT forward is not in the step: "
                  "~0.4 TFLOP per 252x252 target vs ~190 TFLOP per 4096-token sequence)",
        "optimizer": "adamw + global-norm clip (nexus_jax.training.optim), grad_accum 1",
    }
    return Workload("ar_train", build, {"layers": text.num_layers}, model_flops, b * s, sharding.TRAIN_RULES,
                    notes=notes, kernel_cost=kernel_cost)


# --- generation decoder ---------------------------------------------------------------------------------------
def _dit_attention(plan: PlanConfig) -> str:
    """The DiT's attention as on the TPU the plan is for ("auto" -> the splash kernel)."""
    return layers.resolve_attention_impl(plan.model.attention_impl, platform="tpu")


def _dit_kernel(plan: PlanConfig, lengths: tuple[int, ...], forward_passes: int, backward_passes: int,
                repeats: int = 1) -> tuple[Callable[[tuple[int, int, int]], kernels.KernelCost] | None, str]:
    """(per-device splash work for a mesh, attention note) of DiT passes over sequences of ``lengths`` tokens
    (image + context; one per pass kind, e.g. CFG's positive and negative), ``repeats`` times (sampling steps)."""
    attention = _dit_attention(plan)
    cfg = plan.model
    if attention != "splash":
        return None, f"full joint attention by XLA ({attention})"

    def kernel_cost(sizes: tuple[int, int, int]) -> kernels.KernelCost:
        sequences, heads = _splash_shard(sizes, plan.global_batch, cfg.num_heads, cfg.num_heads)
        per_layer = kernels.KernelCost()
        for n in lengths:
            per_layer += kernels.splash_cost(sequences, heads, n, cfg.head_dim, causal=False,
                                             itemsize=jnp.dtype(plan.compute_dtype).itemsize,
                                             forward_passes=forward_passes, backward_passes=backward_passes)
        return repeats * (cfg.num_double_blocks + cfg.num_single_blocks) * per_layer

    return kernel_cost, (f"Pallas splash kernel, full joint attention over {' / '.join(map(str, lengths))} tokens, "
                          f"{' / '.join(str(layers.splash_block(n)) for n in lengths)}-token tiles; priced outside "
                          "XLA's cost model (launch.kernels)")


def _dit_cfg(plan: PlanConfig, overrides: Overrides | None) -> Any:
    cfg = dataclasses.replace(plan.model, param_dtype=jnp.dtype(plan.param_dtype),
                              dtype=jnp.dtype(plan.compute_dtype), attention_impl=_dit_attention(plan))
    if overrides:
        cfg = dataclasses.replace(cfg, num_double_blocks=overrides.get("double_blocks", cfg.num_double_blocks),
                                  num_single_blocks=overrides.get("single_blocks", cfg.num_single_blocks))
    return cfg


EDIT_TOKENS = 81 + 324  # 81 AR-predicted target embeddings + 324 source-image ViT embeddings


def decoder_train_workload(plan: PlanConfig, remat: str) -> Workload:
    """Generation decoder (81 context tokens: adapter) or editing decoder (405: merger) train step."""
    from launch.decoder_model import ADAPTER_IN, editing_decoder, flow_matching_loss, generation_decoder

    if plan.context_len not in (81, EDIT_TOKENS):
        raise ValueError(f"context_len must be 81 (generation decoder) or {EDIT_TOKENS} (editing decoder), "
                         f"got {plan.context_len}")
    editing = plan.context_len == EDIT_TOKENS
    mcfg = plan.merger or MergerConfig()
    embed_dim = mcfg.layer.hidden_size if editing else ADAPTER_IN
    b, t = plan.global_batch, (plan.image_size // 16) ** 2
    dt, f32 = jnp.dtype(plan.compute_dtype), jnp.float32
    cfg0 = plan.model
    batch = {
        "latents": ((b, t, cfg0.in_channels), dt, ("batch", "length", None)),
        "noise": ((b, t, cfg0.in_channels), dt, ("batch", "length", None)),
        "embeds": ((b, plan.context_len, embed_dim), dt, ("batch", "length", None)),
        "pooled": ((b, cfg0.pooled_dim), dt, ("batch", None)),
        "sigma": ((b,), f32, ("batch",)),
        "weight": ((b,), f32, ("batch",)),
    }
    loss = functools.partial(flow_matching_loss, image_size=plan.image_size)

    def build(mesh: Mesh, overrides: Overrides | None) -> Program:
        cfg = _dit_cfg(plan, overrides)
        if editing:
            ctor = lambda: editing_decoder(cfg, mcfg, remat=remat, rngs=nnx.Rngs(0))  # noqa: E731
        else:
            ctor = lambda: generation_decoder(cfg, remat=remat, rngs=nnx.Rngs(0))  # noqa: E731
        return train_program(ctor, loss, batch, _optim(), plan.compute_dtype, mesh, sharding.TRAIN_RULES)

    model_flops = flops.decoder_train_flops(cfg0, b, t, plan.context_len)
    if editing:  # the merger replaces the adapter: one bidirectional Qwen layer + projector on 405 tokens
        layer = mcfg.layer
        merger = flops.merger_forward_flops(plan.context_len, layer.hidden_size, layer.intermediate_size,
                                            layer.num_heads, layer.num_kv_heads, layer.head_dim, mcfg.projector_dim,
                                            mcfg.out_dim)
        model_flops += 3.0 * b * (merger - flops.adapter_forward_flops(cfg0, plan.context_len))
    notes = {
        "loss": "weighted flow matching MSE (launch.decoder_model.flow_matching_loss)",
        "model": "nexus_jax.models.nexus_decoders." + ("EditingDecoder = merger" if editing else
                                                        "GenerationDecoder = adapter")
                 + " + nexus_jax.models.flux.FluxDiT",
        "inputs": "VAE latents precomputed (frozen VAE not in the step)",
        "param_dtype": plan.param_dtype,
        "compiler_options": no_windowed_einsum_note("from 4 images per chip under fsdp"),
    }
    kernel_cost, notes["attention"] = _dit_kernel(plan, (t + plan.context_len,), 1 if remat == "none" else 2, 1)
    return Workload("editing_decoder_train" if editing else "decoder_train", build,
                    {"double_blocks": cfg0.num_double_blocks, "single_blocks": cfg0.num_single_blocks},
                    model_flops, b * t, sharding.TRAIN_RULES, notes=notes, kernel_cost=kernel_cost,
                    compiler_options=NO_WINDOWED_EINSUM)


# --- sampling (batch inference) -------------------------------------------------------------------------------
NEGATIVE_TOKENS = 512  # T5("") padded to 512 tokens (negative branch of CFG)


def decoder_sample_workload(plan: PlanConfig, remat: str) -> Workload:
    from launch.decoder_model import ADAPTER_IN, generation_decoder, sample

    del remat  # no backward pass
    rules = sharding.INFERENCE_RULES
    b, t = plan.global_batch, (plan.image_size // 16) ** 2
    dt = jnp.dtype(plan.compute_dtype)
    cfg0 = plan.model
    inputs = {
        "noise": ((b, t, cfg0.in_channels), dt, ("batch", "length", None)),
        "embeds": ((b, plan.context_len, ADAPTER_IN), dt, ("batch", "length", None)),
        "pooled": ((b, cfg0.pooled_dim), dt, ("batch", None)),
        "neg_context": ((b, NEGATIVE_TOKENS, cfg0.context_dim), dt, ("batch", "length", None)),
        "neg_pooled": ((b, cfg0.pooled_dim), dt, ("batch", None)),
    }

    def build(mesh: Mesh, overrides: Overrides | None) -> Program:
        cfg = _dit_cfg(plan, overrides)
        steps = overrides.get("steps", plan.num_steps) if overrides else plan.num_steps
        ctor = lambda: generation_decoder(cfg, rngs=nnx.Rngs(0))  # noqa: E731
        graphdef, abs_state = nnx.split(nnx.eval_shape(ctor))
        state_sh = sharding.state_shardings(abs_state, mesh, rules)
        state_sh = jax.tree.map(lambda x: x if isinstance(x, NamedSharding) else NamedSharding(mesh, x), state_sh)
        state_args = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state,
                                  state_sh)
        args = abstract_batch(inputs, mesh, rules)

        def run(state, noise, embeds, pooled, neg_context, neg_pooled):
            model = nnx.merge(graphdef, state)
            return sample(model, noise, embeds, pooled, neg_context, neg_pooled, image_size=plan.image_size,
                          steps=steps, cfg_scale=plan.cfg_scale, unroll=overrides is not None)

        fn = jax.jit(run, out_shardings=args["noise"].sharding)
        return Program(LowerInContext(fn, mesh, rules), (state_args, *args.values()))

    model_flops = flops.sample_flops(cfg0, b, t, plan.context_len, NEGATIVE_TOKENS, plan.num_steps, plan.cfg_scale)
    notes = {
        "program": f"{plan.num_steps}-step Euler flow-matching sampler with CFG {plan.cfg_scale} "
                   "(positive: adapter(81 AR embeddings); negative: T5('') 512 tokens), latents out",
        "model": "nexus_jax.models.nexus_decoders.GenerationDecoder = adapter + nexus_jax.models.flux.FluxDiT",
        "excluded": "VAE decode (separate program) and the AR prefill",
    }
    lengths = (t + plan.context_len,) + ((t + NEGATIVE_TOKENS,) if plan.cfg_scale != 1.0 else ())
    kernel_cost, notes["attention"] = _dit_kernel(plan, lengths, 1, 0, repeats=plan.num_steps)
    return Workload("decoder_sample", build,
                    {"double_blocks": cfg0.num_double_blocks, "single_blocks": cfg0.num_single_blocks},
                    model_flops, b, rules, cost_multiplier=plan.num_steps, notes=notes, kernel_cost=kernel_cost)


# --- UniPic-1 text-to-image training ---------------------------------------------------------------------------
def unipic_train_flops(cfg: Any, batch: int, prompt_len: int, image_tokens: int) -> float:
    """One text-to-image train step (3 x forward, static shapes as compiled): the LLM over prompt + buffers + image
    slots (no lm_head), the MAR encoder and decoder over buffers + image slots (bidirectional), proj_in / proj_out,
    and the diffusion head on ``diffusion_batch_mul`` copies of every image token. The frozen VAE encode is left out."""
    text, mar, head = cfg.text, cfg.mar, cfg.head
    slots = mar.buffer_size + image_tokens
    seq = prompt_len + slots
    llm = flops.qwen_matmul_params(text) - text.hidden_size * text.vocab_size
    proj = 2 * (mar.width * text.hidden_size + text.hidden_size * text.hidden_size)
    dense = 6.0 * batch * (seq * llm + slots * proj)
    causal = 3.0 * 2.0 * seq * text.q_size * text.num_layers * batch * seq
    c = mar.width
    block = 4 * c * c + 2 * c * mar.mlp_dim
    blocks = mar.encoder_depth + mar.decoder_depth
    dense += 6.0 * batch * slots * (blocks * block + 2 * c * c)  # + z_proj / decoder_embed / head-input projections
    bidir = 3.0 * 4.0 * slots * c * blocks * batch * slots
    w = head.width
    per_row = head.depth * (3 * w * w + 2 * w * w) + head.z_channels * w + 2 * w * w + w * head.out_channels
    rows = cfg.diffusion.diffusion_batch_mul * batch * image_tokens
    return dense + causal + bidir + 6.0 * rows * per_row


def unipic_train_workload(plan: PlanConfig, remat: str) -> Workload:
    """UniPic-1 text-to-image train step: the trainer's own model and loss (nexus_jax.training.unipic_loop) with
    the KL-16 VAE frozen and run in the step; depth knobs: LLM layers, MAR encoder / decoder blocks, head blocks."""
    from configs.training import UniPicLossConfig
    from nexus_jax.training.unipic_loop import VAE_FROZEN, UniPicTrainModel, make_unipic_loss

    cfg0 = plan.model
    b, r, s = plan.global_batch, plan.image_size, plan.seq_len
    n = (r // cfg0.vae_stride) ** 2
    i32, f32 = jnp.int32, jnp.float32
    batch = {
        "pixels": ((b, r, r, 3), f32, ("batch", None, None, None)),
        "input_ids": ((b, s), i32, ("batch", "length")),
        "attention_mask": ((b, s), i32, ("batch", "length")),
        "null_ids": ((b, s), i32, ("batch", "length")),
        "null_mask": ((b, s), i32, ("batch", "length")),
        "weight": ((b,), f32, ("batch",)),
    }
    loss = make_unipic_loss("unipic_t2i", UniPicLossConfig())
    pdt = jnp.dtype(plan.param_dtype)

    def build(mesh: Mesh, overrides: Overrides | None) -> Program:
        o = dict(overrides or {})
        text = cfg0.text.replace(remat=remat, param_dtype=plan.param_dtype,
                                 num_layers=o.get("llm_layers", cfg0.text.num_layers))
        mar = dataclasses.replace(cfg0.mar, remat=remat, param_dtype=pdt,
                                  encoder_depth=o.get("mar_blocks", cfg0.mar.encoder_depth),
                                  decoder_depth=o.get("mar_blocks", cfg0.mar.decoder_depth))
        head = dataclasses.replace(cfg0.head, depth=o.get("head_blocks", cfg0.head.depth))
        cfg = cfg0.replace(text=text, mar=mar, head=head, resolution=r)
        return train_program(lambda: UniPicTrainModel(cfg, rngs=nnx.Rngs(0)), loss, batch,
                             _optim(frozen=VAE_FROZEN), plan.compute_dtype, mesh, sharding.TRAIN_RULES)

    if cfg0.mar.encoder_depth != cfg0.mar.decoder_depth:
        raise ValueError("unipic_train extrapolates MAR encoder and decoder depth together; they must be equal")
    notes = {
        "loss": "nexus_jax.unipic.loss text2image (hybrid IDDPM loss of the head on the masked tokens, "
                "diffusion_batch_mul copies), prompt dropout 0.1",
        "model": "nexus_jax.training.unipic_loop.UniPicTrainModel (UniPic trained, KL-16 VAE frozen, run in the step)",
        "static_shapes": "MAR encoder and LLM run on all buffer + image slots (masked tokens excluded as keys), so "
                         "model FLOPs count every slot; torch drops the ~70-100% masked tokens in the encoder",
        "model_flops": "launch.workloads.unipic_train_flops (VAE encode not counted)",
        "compiler_options": no_windowed_einsum_note("under fsdp 8"),
    }
    return Workload("unipic_train", build, {"llm_layers": cfg0.text.num_layers, "mar_blocks": cfg0.mar.encoder_depth,
                                            "head_blocks": cfg0.head.depth},
                    unipic_train_flops(cfg0, b, s, n), b * (s + cfg0.mar.buffer_size + n), sharding.TRAIN_RULES,
                    notes=notes, compiler_options=NO_WINDOWED_EINSUM)


BUILDERS: dict[str, Callable[[PlanConfig, str], Workload]] = {
    "matmul_train": matmul_workload,
}


def make_workload(plan: PlanConfig, remat: str | None = None) -> Workload:
    """The workload of ``plan`` with remat policy ``remat`` (default: the plan's): from :data:`BUILDERS` or the
    family that declares it (:func:`nexus_jax.families.workload_builder`)."""
    from nexus_jax import families

    builder = BUILDERS.get(plan.workload) or families.workload_builder(plan.workload)
    if builder is None:
        known = sorted([*BUILDERS, *families.workload_names()])
        raise ValueError(f"unknown workload {plan.workload!r}; known: {known}")
    return builder(plan, plan.remat if remat is None else remat)
