"""Device side of batch inference: jitted, compiled-once programs per batch shape.

* understanding: one prefill (ViT + text decoder into a fixed-size KV cache), then the text decoder's jitted
  greedy ``while_loop`` decode (``nexus_jax.generation.generate.decode``);
* generation / editing: the AR slot prediction (``nexus_jax.nexus.prefill.fill_slots``: one parallel causal
  forward over the N slots), the decoder's conditioner (generation adapter / editing merger), then flow-matching
  sampling (``nexus_jax.diffusion.sampler.denoise``) and VAE decode in one jitted program.

Initial noise of a request comes from its own seed (``jax.random.key(seed)``), never from its batch position, so a
request gives the same image alone or batched. Batch arrays are placed with the batch over the data-parallel mesh
axes; parameters follow the inference sharding rules (weights over ``tensor``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.nexus_decoders import SamplerConfig
from nexus_jax import sharding
from nexus_jax.diffusion.sampler import Conditioning, denoise, schedule_sigmas
from nexus_jax.generation.generate import decode, next_positions
from nexus_jax.models.flux.packing import image_ids, latent_size, pack_latents, unpack_latents
from nexus_jax.models.nexus_ar import NexusGenAR
from nexus_jax.models.qwen2.cache import init_cache_for
from nexus_jax.nexus.batch import NexusBatch, VisionInputs
from nexus_jax.nexus.prefill import fill_slots
from nexus_jax.pipelines.decode import EmptyPrompt  # pooled CLIP("") and T5("") (the negative branch of true CFG)


@dataclasses.dataclass
class ImageDecoder:
    """A Nexus-Gen decoder model (``GenerationDecoder`` / ``EditingDecoder``: ``dit`` + conditioner) and its
    sampler settings."""

    model: nnx.Module
    sampler: SamplerConfig

    @property
    def is_editing(self) -> bool:
        return hasattr(self.model, "embedding_merger")


def seed_noise(seeds: jax.Array, h: int, w: int, channels: int) -> jax.Array:
    """[B, h, w, C] standard normal latents; row i depends on ``seeds[i]`` only."""
    return jax.vmap(lambda s: jax.random.normal(jax.random.key(s), (h, w, channels), jnp.float32))(seeds)


def sample_pixels(dit: nnx.Module, vae: nnx.Module, seeds: jax.Array, cond: Conditioning, neg: Conditioning | None,
                  cfg: SamplerConfig) -> jax.Array:
    """Seeds [B] + conditioning -> pixels [B, H, W, 3] in ~[-1, 1] (pure; call under jit)."""
    h, w = latent_size(cfg.height, cfg.width)
    b = seeds.shape[0]
    z = seed_noise(seeds, h, w, dit.cfg.latent_channels)
    sigmas = jnp.asarray(schedule_sigmas(cfg, cfg.height, cfg.width))
    g = jnp.full((b,), cfg.guidance, jnp.float32) if dit.cfg.guidance_embed else None
    use_cfg = neg is not None and cfg.cfg_scale != 1.0
    tokens = denoise(dit, pack_latents(z), image_ids(h, w), sigmas, cond, neg if use_cfg else None, g, cfg.cfg_scale)
    return vae.decode(unpack_latents(tokens, h, w))


@functools.lru_cache(maxsize=16)
def _decoder_program(dec_graph, vae_graph, cfg: SamplerConfig) -> Callable:
    """Jitted conditioning + sampling + VAE decode for one decoder (compiled once per batch shape)."""
    from nexus_jax.models.nexus_decoders import negative_conditioning

    def run(dec_state, vae_state, seeds, embeds, ref, pooled, neg_context, neg_pooled):
        decoder = nnx.merge(dec_graph, dec_state)
        b = embeds.shape[0]
        if hasattr(decoder, "embedding_merger"):
            with jax.ensure_compile_time_eval():  # the RoPE ids are host constants (bf16-rounded with jnp)
                cond = decoder.conditioning(embeds, ref, pooled, latent_size(cfg.height, cfg.width))
        else:
            cond = decoder.conditioning(embeds, pooled)
        neg = None if neg_context is None else negative_conditioning(neg_context, neg_pooled, b)
        return sample_pixels(decoder.dit, nnx.merge(vae_graph, vae_state), seeds, cond, neg, cfg)

    return jax.jit(run)


@functools.partial(jax.jit, static_argnames=("graphdef", "capacity", "num_merged"))
def understanding_prefill(graphdef, state, ids, positions, mask, pixels, layout, input_mask, *, capacity: int,
                          num_merged: int):
    """ViT + prompt into a fresh KV cache. Returns (first greedy token [B], cache, next positions [B])."""
    model = nnx.merge(graphdef, state)
    feats = None if pixels is None else model.encode_images(pixels, layout, num_merged)
    cache = init_cache_for(model.config.vl.text, ids.shape[0], capacity)
    out = model(ids, positions=positions, slot_index=jnp.full(ids.shape, -1, jnp.int32), attention_mask=mask,
                input_features=feats, input_mask=input_mask if feats is not None else None, cache=cache)
    return jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32), out.cache, next_positions(positions, mask)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_merged"))
def _encode_images(graphdef, state, pixels, layout, *, num_merged: int) -> jax.Array:
    return nnx.merge(graphdef, state).encode_images(pixels, layout, num_merged)


class Runner:
    """Runs collated batches. ``mesh=None`` runs unsharded on the default device."""

    def __init__(
        self,
        ar: NexusGenAR,
        *,
        vae: nnx.Module | None = None,
        generation: ImageDecoder | None = None,
        editing: ImageDecoder | None = None,
        empty: EmptyPrompt | None = None,
        max_new_tokens: int = 32,
        mesh: jax.sharding.Mesh | None = None,
        rules: sharding.Rules = sharding.INFERENCE_RULES,
    ):
        self.ar, self.vae, self.empty = ar, vae, empty
        self.decoders = {"generation": generation, "editing": editing}
        self.max_new_tokens, self.mesh, self.rules = max_new_tokens, mesh, rules
        if mesh is not None:
            for m in (ar, vae, *(d.model for d in (generation, editing) if d)):
                if m is not None:
                    sharding.shard_module(m, mesh, rules)

    # ------------------------------------------------------------------ placement
    def _context(self):
        import contextlib

        return sharding.sharding_context(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext()

    def _put(self, x: Any) -> Any:
        """Batch-major array -> device array (batch over data x fsdp when a mesh is set)."""
        x = jnp.asarray(x)
        if self.mesh is None:
            return x
        return jax.device_put(x, sharding.data_sharding(self.mesh, x.ndim, self.rules))

    def _placed(self, nb: NexusBatch) -> NexusBatch:
        pos = jnp.asarray(nb.positions)
        if self.mesh is not None:  # positions are [3, B, L]: batch on axis 1
            spec = sharding.logical_to_spec((None, "batch", None), self.rules)
            pos = jax.device_put(pos, jax.sharding.NamedSharding(self.mesh, spec))
        return dataclasses.replace(nb, input_ids=self._put(nb.input_ids), attention_mask=self._put(nb.attention_mask),
                                   positions=pos, input_mask=self._put(nb.input_mask))

    # ------------------------------------------------------------------ tasks
    def understand(self, nb: NexusBatch) -> tuple[np.ndarray, np.ndarray]:
        """Greedy answers: (token ids [B, max_new_tokens], generated counts [B])."""
        tok = self.ar.config.tokens
        capacity = nb.input_ids.shape[1] + self.max_new_tokens
        graphdef, state = nnx.split(self.ar)
        with self._context():
            p = self._placed(nb)
            pixels = layout = None
            num_merged = 0
            if nb.inputs is not None:
                pixels = jnp.asarray(nb.inputs.pixels)
                layout = {k: jnp.asarray(v) for k, v in nb.inputs.arrays().items()}
                num_merged = nb.inputs.num_merged
            first, cache, position = understanding_prefill(
                graphdef, state, p.input_ids, p.positions, p.attention_mask, pixels, layout, p.input_mask,
                capacity=capacity, num_merged=num_merged,
            )
            lm_graph, lm_state = nnx.split(self.ar.language_model)
            out = decode(lm_graph, lm_state, cache, first, position, jax.random.key(0), jnp.float32(0.0),
                         jnp.float32(1.0), max_new_tokens=self.max_new_tokens,
                         eos_token_ids=(tok.im_end, tok.endoftext), pad_token_id=tok.endoftext)
        return np.asarray(out.tokens), np.asarray(out.num_generated)

    def slot_embeddings(self, nb: NexusBatch) -> jax.Array:
        """AR slot prediction: [B, N, hidden] image embeddings from one parallel forward."""
        with self._context():
            return fill_slots(self.ar, self._placed(nb))

    def reference_embeddings(self, refs: VisionInputs, batch: int) -> jax.Array:
        """Editing: frozen-ViT features of each row's reference (source) image -> [B, M, hidden]."""
        if refs.grid_thw.shape[0] != batch or np.any(refs.grid_thw != refs.grid_thw[0]):
            raise ValueError(f"editing batch: expected {batch} reference images of one grid, got "
                             f"{refs.grid_thw.tolist()}")
        graphdef, state = nnx.split(self.ar)
        with self._context():
            feats = _encode_images(graphdef, state, jnp.asarray(refs.pixels),
                                   {k: jnp.asarray(v) for k, v in refs.arrays().items()}, num_merged=refs.num_merged)
        return feats.reshape(batch, -1, feats.shape[-1])

    def images(self, task: str, nb: NexusBatch, seeds: np.ndarray, refs: VisionInputs | None = None) -> np.ndarray:
        """Generation / editing: pixels [B, H, W, 3] in ~[-1, 1] (float32, before PNG encoding). ``seeds`` [B]
        give each row's initial noise; ``refs`` are the editing decoder's reference images."""
        decoder = self.decoders.get(task)
        if decoder is None:
            raise ValueError(f"the checkpoint has no {task} decoder")
        if self.vae is None or self.empty is None:
            raise ValueError("the checkpoint has no VAE / empty-prompt conditioning (needed by the decoders)")
        b = nb.input_ids.shape[0]
        if np.asarray(seeds).shape != (b,):
            raise ValueError(f"need one seed per row: seeds shape {np.asarray(seeds).shape}, batch {b}")
        embeds = self.slot_embeddings(nb)
        ref = None
        if decoder.is_editing:
            if refs is None:
                raise ValueError("the editing decoder needs reference images (prepare_request(..., ref_grid=...))")
            ref = self.reference_embeddings(refs, b)
        pooled = jnp.asarray(self.empty.pooled, jnp.float32).reshape(1, -1)
        use_cfg = decoder.sampler.cfg_scale != 1.0
        t5 = jnp.asarray(self.empty.t5, jnp.float32)
        neg_ctx = t5.reshape(1, *t5.shape[-2:]) if use_cfg else None
        dg, ds = nnx.split(decoder.model)
        vg, vs = nnx.split(self.vae)
        program = _decoder_program(dg, vg, decoder.sampler)
        with self._context():
            ref_d = None if ref is None else self._put(ref)
            pixels = program(ds, vs, self._put(np.asarray(seeds, np.uint32)), self._put(embeds), ref_d, pooled,
                             neg_ctx, pooled if use_cfg else None)
        return np.asarray(pixels, np.float32)
