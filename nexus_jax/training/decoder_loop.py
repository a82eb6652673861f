"""Decoder trainer: rectified-flow (flow-matching) loss on VAE latents, conditioned on precomputed Nexus-Gen embeddings.

Per step (DiffSynth's recipe, nexus-gen.md 4.2/4.3; schedule helpers from :mod:`nexus_jax.diffusion.flow_match`): the
frozen VAE encodes the target image to model-space latents ``x0``; a training timestep index ``i ~ U{0..T-1}`` picks
``sigma_i`` on the shift-3 schedule; ``x_t = (1 - sigma) x0
+ sigma * noise``; the DiT predicts the velocity from the conditioning (generation: ``adapter(embed)`` with zero text
ids; editing: ``merger(embed, ref_embed)`` with the edit text ids); the loss is ``w_i * mean((v - (noise - x0))^2)``
with DiffSynth's Gaussian timestep weights ``w`` (mean 1), averaged over the batch. With ``embed_noise > 0`` the
target embeddings are augmented first (:func:`noisy_embed`); with ``cond_dropout > 0`` the batch's last rows are
conditioned on the empty prompt instead (classifier-free-guidance training, a second DiT call on those rows).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.nexus_decoders import NexusDecoderConfig
from configs.training import FlowLossConfig, TrainConfig
from configs.vae import FluxVAEConfig
from nexus_jax.data.decoder_examples import DecoderEncoder
from nexus_jax.data.pipeline import BatchIterator, build_dataset, stack
from nexus_jax.data.sources import open_source
from nexus_jax.diffusion import flow_match
from nexus_jax.diffusion.sampler import Conditioning
from nexus_jax.models.flux.packing import image_ids, pack_latents
from nexus_jax.models.nexus_decoders import EditingDecoder, GenerationDecoder, negative_conditioning
from nexus_jax.models.vae import FluxVAE
from nexus_jax.training.loop import TrainTask, local_batch_size

VAE_FROZEN = (r"(^|/)vae/",)


class DecoderTrainModel(nnx.Module):
    """What the decoder trainer optimises: ``decoder`` (a Nexus-Gen Generation/EditingDecoder: conditioner + DiT,
    trained), ``vae`` (frozen) and ``pooled`` (precomputed CLIP("") pooled vector [pooled_dim]; an nnx.Variable, not a
    Param, so never trained)."""

    def __init__(self, decoder: nnx.Module, vae: nnx.Module, pooled: np.ndarray):
        self.decoder = decoder
        self.vae = vae
        self.pooled = nnx.Variable(jnp.asarray(pooled, jnp.float32))

    def conditioning(self, batch: dict[str, jax.Array], latent_hw: tuple[int, int]) -> Conditioning:
        pooled = self.pooled[...][None]
        if isinstance(self.decoder, EditingDecoder):
            return self.decoder.conditioning(batch["embed"], batch.get("ref_embed"), pooled, latent_hw)
        return self.decoder.conditioning(batch["embed"], pooled)


def noisy_embed(embed: jax.Array, rng: jax.Array, scale: float) -> jax.Array:
    """embed [B, N, D] + N(0, (scale * rms_b)^2), rms_b the RMS of record b's embeddings."""
    rms = jnp.sqrt(jnp.mean(jnp.square(embed.astype(jnp.float32)), axis=(1, 2), keepdims=True))
    noise = jax.random.normal(rng, embed.shape, jnp.float32) * rms * scale
    return (embed.astype(jnp.float32) + noise).astype(embed.dtype)


def make_flow_loss(cfg: FlowLossConfig, negative_context: np.ndarray | None = None):
    """loss_fn(model, batch, rng): batch["pixels"] [B, H, W, 3] in [-1, 1], "embed" [B, N, D] (+ "ref_embed").
    ``negative_context``: T5("") [Lt, context_dim], the context of the rows ``cfg.cond_dropout`` drops."""
    sigmas_np, weights_np = flow_match.training_schedule(cfg.shift, cfg.num_train_timesteps)
    if not cfg.weighted:
        weights_np = np.ones_like(weights_np)
    if cfg.cond_dropout > 0 and negative_context is None:
        raise ValueError("flow_loss.cond_dropout needs the empty prompt's T5 context (train with --init-from a "
                         "checkpoint holding empty_prompt.safetensors)")
    neg_context = None if negative_context is None else np.asarray(negative_context, np.float32)[None]

    def loss_fn(model: DecoderTrainModel, batch: dict[str, jax.Array], rng: jax.Array):
        x0_img = jax.lax.stop_gradient(model.vae.encode(batch["pixels"]))  # posterior mean, model space
        b, h, w, _ = x0_img.shape
        x0 = pack_latents(x0_img)
        if cfg.embed_noise > 0:  # its own key first, so runs without it keep their random streams
            rng, k_e = jax.random.split(rng)
            batch = {**batch, "embed": noisy_embed(batch["embed"], k_e, cfg.embed_noise)}
        k_t, k_n = jax.random.split(rng)
        sigma, weight = flow_match.sample_training_sigmas(k_t, b, sigmas_np, weights_np)
        sigma = sigma.astype(x0.dtype)
        noise = jax.random.normal(k_n, x0.shape, x0.dtype)
        xt = flow_match.add_noise(x0, noise, sigma)
        cond = model.conditioning(batch, (h, w))
        guidance = jnp.full((b,), cfg.guidance, x0.dtype)
        dit, ids = model.decoder.dit, image_ids(h, w)
        dropped = cfg.dropped_rows(b)
        if dropped == 0:
            v = dit(xt, sigma, cond.context, cond.pooled.astype(x0.dtype), cond.txt_ids, ids, guidance)
        else:  # rows [0, n) on their embeddings, [n, b) on the empty prompt (contexts of different lengths)
            n = b - dropped
            neg = negative_conditioning(jnp.asarray(neg_context, cond.context.dtype), cond.pooled[:1], dropped)
            v = jnp.concatenate([
                dit(xt[:n], sigma[:n], cond.context[:n], cond.pooled[:n].astype(x0.dtype), cond.txt_ids, ids,
                    guidance[:n]),
                dit(xt[n:], sigma[n:], neg.context, neg.pooled.astype(x0.dtype), neg.txt_ids, ids, guidance[n:])])
        target = flow_match.velocity_target(x0, noise).astype(jnp.float32)
        per_sample = jnp.mean(jnp.square(v.astype(jnp.float32) - target), axis=(1, 2))
        if "weight" not in batch:
            loss = jnp.mean(per_sample * weight)
            return loss, {"flow_mse": jnp.mean(per_sample), "sigma": jnp.mean(sigma.astype(jnp.float32))}
        real = batch["weight"].astype(jnp.float32)  # 0 for filler rows (broken records)
        count = jnp.maximum(jnp.sum(real), 1.0)
        loss = jnp.sum(per_sample * weight * real) / count
        return loss, {"flow_mse": jnp.sum(per_sample * real) / count,
                      "sigma": jnp.sum(sigma.astype(jnp.float32) * real) / count}

    return loss_fn


@dataclasses.dataclass(frozen=True)
class DecoderParts:
    """Model configs of one decoder job and the conditioning shapes its records must have."""

    decoder: NexusDecoderConfig
    vae: FluxVAEConfig
    editing: bool

    @property
    def embed_rows(self) -> int:
        """Target embeddings per record: the AR slots of one output image (81 at full size, 9 tiny)."""
        g, m = self.decoder.merger.target_grid, self.decoder.merger.spatial_merge
        return (g[0] // m) * (g[1] // m)

    @property
    def embed_dim(self) -> int:
        return self.decoder.merger.layer.hidden_size if self.editing else self.decoder.adapter.in_dim

    @property
    def ref_rows(self) -> int:
        g, m = self.decoder.merger.ref_grid, self.decoder.merger.spatial_merge
        return (g[0] // m) * (g[1] // m) if self.editing else 0


def decoder_parts(task: str, preset: str, remat: str = "none") -> DecoderParts:
    """task 'generation_decoder' | 'editing_decoder'; preset 'tiny' | 'shapes' | 'flux_dev'; ``remat`` per DiT
    block."""
    if task not in ("generation_decoder", "editing_decoder"):
        raise ValueError(f"decoder task must be 'generation_decoder' or 'editing_decoder', got {task!r}")
    editing = task == "editing_decoder"
    if preset == "tiny":
        dec, vae = NexusDecoderConfig.tiny(), FluxVAEConfig.tiny()
    elif preset == "shapes":  # the trained default's generation decoder (scripts/train_default_model.py)
        dec, vae = NexusDecoderConfig.shapes(), FluxVAEConfig.tiny()
    elif preset == "flux_dev":
        dec, vae = NexusDecoderConfig.editing() if editing else NexusDecoderConfig.generation(), FluxVAEConfig.full()
    else:
        raise ValueError(f"unknown decoder model preset {preset!r}; choose 'tiny', 'shapes' or 'flux_dev'")
    if remat != "none":
        dec = dataclasses.replace(dec, dit=dataclasses.replace(dec.dit, remat=remat))
    return DecoderParts(dec, vae, editing)


def decoder_task(cfg: TrainConfig, parts: DecoderParts, *, pooled: np.ndarray | None = None,
                 negative_context: np.ndarray | None = None, image_root: str | Path | None = None) -> TrainTask:
    """The decoder :class:`TrainTask` (records at ``cfg.data.path``). ``pooled``: CLIP("") [pooled_dim] (zeros when
    None); ``negative_context``: T5("") [Lt, context_dim], needed by ``flow_loss.cond_dropout``."""
    root = str(image_root if image_root is not None else (cfg.data.image_root or Path(cfg.data.path).parent))
    encoder = DecoderEncoder(cfg.data.image_size, parts.embed_rows, parts.embed_dim, parts.ref_rows, root)
    pooled_dim = parts.decoder.dit.pooled_dim
    pooled = np.zeros(pooled_dim, np.float32) if pooled is None else np.asarray(pooled, np.float32)
    if pooled.shape != (pooled_dim,):
        raise ValueError(f"pooled vector has shape {pooled.shape}, expected ({pooled_dim},) (CLIP('') pooled output)")
    if negative_context is not None:
        negative_context = np.asarray(negative_context, np.float32)
        if negative_context.ndim != 2 or negative_context.shape[1] != parts.decoder.dit.context_dim:
            raise ValueError(f"empty-prompt T5 context has shape {negative_context.shape}, expected (Lt, "
                             f"{parts.decoder.dit.context_dim}) (the DiT's context_dim)")

    decoder_cls = EditingDecoder if parts.editing else GenerationDecoder

    def ctor() -> DecoderTrainModel:
        rngs = nnx.Rngs(cfg.loop.seed)
        return DecoderTrainModel(decoder_cls(parts.decoder, rngs=rngs), FluxVAE(parts.vae, rngs=rngs), pooled)

    def batches(path: str, seed: int, epochs: int | None) -> BatchIterator:
        ds = build_dataset(open_source(path), encoder, seed=seed, num_epochs=epochs, global_batch=cfg.loop.batch_size)
        return BatchIterator(ds, local_batch_size(cfg.loop.batch_size), stack, num_threads=cfg.data.num_threads,
                             prefetch=cfg.data.prefetch, filler=encoder.filler)

    def count(batch: dict[str, Any]) -> int:
        return int(np.prod(batch["pixels"].shape[:3])) // 256  # packed latent tokens (16x16 pixels each)

    return TrainTask(
        name=cfg.task,
        model_ctor=ctor,
        loss_fn=make_flow_loss(cfg.flow_loss, negative_context),
        make_batches=lambda seed: batches(cfg.data.path, seed, cfg.data.num_epochs),
        make_eval_batches=(lambda: batches(cfg.data.eval_path, 0, 1)) if cfg.data.eval_path else None,
        count_tokens=count,
        frozen=VAE_FROZEN,
    )
