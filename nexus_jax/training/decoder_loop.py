"""Decoder trainer: rectified-flow (flow-matching) loss on VAE latents, conditioned on precomputed Nexus-Gen embeddings.

Per step (DiffSynth's recipe, nexus-gen.md 4.2/4.3; schedule helpers from :mod:`nexus_jax.diffusion.flow_match`): the
frozen VAE encodes the target image to model-space latents ``x0``; a training timestep index ``i ~ U{0..T-1}`` picks
``sigma_i`` on the shift-3 schedule; ``x_t = (1 - sigma) x0
+ sigma * noise``; the DiT predicts the velocity from the conditioning (generation: ``adapter(embed)`` with zero text
ids; editing: ``merger(embed, ref_embed)`` with the edit text ids); the loss is ``w_i * mean((v - (noise - x0))^2)``
with DiffSynth's Gaussian timestep weights ``w`` (mean 1), averaged over the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.training import FlowLossConfig, TrainConfig
from nexus_jax.data.decoder_examples import DecoderEncoder
from nexus_jax.data.pipeline import BatchIterator, build_dataset, stack
from nexus_jax.data.sources import open_source
from nexus_jax.diffusion import flow_match
from nexus_jax.models.flux.packing import image_ids, pack_latents
from nexus_jax.training.loop import TrainTask

VAE_FROZEN = (r"(^|/)vae/",)
# condition(model, batch) -> (context [B, Lt, context_dim], txt_ids [Lt, 3] or [B, Lt, 3])
ConditionFn = Callable[[nnx.Module, dict[str, jax.Array]], tuple[jax.Array, jax.Array]]


class DecoderTrainModel(nnx.Module):
    """What the decoder trainer optimises: ``conditioner`` + ``dit`` (trained), ``vae`` (frozen), ``pooled`` (the
    precomputed CLIP("") pooled vector [pooled_dim]; an nnx.Variable, not a Param, so never trained)."""

    def __init__(self, conditioner: nnx.Module, dit: nnx.Module, vae: nnx.Module, pooled: np.ndarray):
        self.conditioner = conditioner
        self.dit = dit
        self.vae = vae
        self.pooled = nnx.Variable(jnp.asarray(pooled, jnp.float32))


def make_flow_loss(cfg: FlowLossConfig, condition: ConditionFn):
    """loss_fn(model, batch, rng): batch["pixels"] [B, H, W, 3] in [-1, 1] plus the conditioning arrays."""
    sigmas_np, weights_np = flow_match.training_schedule(cfg.shift, cfg.num_train_timesteps)
    if not cfg.weighted:
        weights_np = np.ones_like(weights_np)

    def loss_fn(model: DecoderTrainModel, batch: dict[str, jax.Array], rng: jax.Array):
        x0_img = jax.lax.stop_gradient(model.vae.encode(batch["pixels"]))  # posterior mean, model space
        b, h, w, _ = x0_img.shape
        x0 = pack_latents(x0_img)
        k_t, k_n = jax.random.split(rng)
        sigma, weight = flow_match.sample_training_sigmas(k_t, b, sigmas_np, weights_np)
        sigma = sigma.astype(x0.dtype)
        noise = jax.random.normal(k_n, x0.shape, x0.dtype)
        xt = flow_match.add_noise(x0, noise, sigma)
        context, txt_ids = condition(model, batch)
        pooled = jnp.broadcast_to(model.pooled[...].astype(x0.dtype), (b, model.pooled.shape[-1]))
        guidance = jnp.full((b,), cfg.guidance, x0.dtype)
        v = model.dit(xt, sigma, context, pooled, txt_ids, image_ids(h, w), guidance)
        target = flow_match.velocity_target(x0, noise).astype(jnp.float32)
        per_sample = jnp.mean(jnp.square(v.astype(jnp.float32) - target), axis=(1, 2))
        loss = jnp.mean(per_sample * weight)
        return loss, {"flow_mse": jnp.mean(per_sample), "sigma": jnp.mean(sigma.astype(jnp.float32))}

    return loss_fn


def generation_condition(model: DecoderTrainModel, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Generation decoder: ``adapter(embed)`` replaces the T5 tokens; all text ids are zero."""
    context = model.conditioner(batch["embed"])
    return context, jnp.zeros((context.shape[1], 3), jnp.float32)


@dataclasses.dataclass(frozen=True)
class DecoderParts:
    """Constructors of one decoder family (filled from the model modules by :func:`decoder_parts`)."""

    conditioner: Callable[[nnx.Rngs], nnx.Module]
    dit: Callable[[nnx.Rngs], nnx.Module]
    vae: Callable[[nnx.Rngs], nnx.Module]
    condition: ConditionFn
    embed_rows: int
    embed_dim: int
    ref_rows: int
    pooled_dim: int


def decoder_task(cfg: TrainConfig, parts: DecoderParts, *, pooled: np.ndarray | None = None,
                 image_root: str | Path | None = None) -> TrainTask:
    """The decoder :class:`TrainTask` (records at ``cfg.data.path``)."""
    root = str(image_root if image_root is not None else (cfg.data.image_root or Path(cfg.data.path).parent))
    encoder = DecoderEncoder(cfg.data.image_size, parts.embed_rows, parts.embed_dim, parts.ref_rows, root)
    pooled = np.zeros(parts.pooled_dim, np.float32) if pooled is None else np.asarray(pooled, np.float32)
    if pooled.shape != (parts.pooled_dim,):
        raise ValueError(f"pooled vector has shape {pooled.shape}, expected ({parts.pooled_dim},)")

    def ctor() -> DecoderTrainModel:
        rngs = nnx.Rngs(cfg.loop.seed)
        return DecoderTrainModel(parts.conditioner(rngs), parts.dit(rngs), parts.vae(rngs), pooled)

    def batches(path: str, seed: int, epochs: int | None) -> BatchIterator:
        ds = build_dataset(open_source(path), encoder, seed=seed, num_epochs=epochs)
        return BatchIterator(ds, cfg.loop.batch_size, stack, num_threads=cfg.data.num_threads,
                             prefetch=cfg.data.prefetch)

    def count(batch: dict[str, Any]) -> int:
        return int(np.prod(batch["pixels"].shape[:3])) // 256  # packed latent tokens (16x16 pixels each)

    return TrainTask(
        name=cfg.task,
        model_ctor=ctor,
        loss_fn=make_flow_loss(cfg.flow_loss, parts.condition),
        make_batches=lambda seed: batches(cfg.data.path, seed, cfg.data.num_epochs),
        make_eval_batches=(lambda: batches(cfg.data.eval_path, 0, 1)) if cfg.data.eval_path else None,
        count_tokens=count,
        frozen=VAE_FROZEN,
    )
