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
from nexus_jax.generation.sampling import suppress_per_row, suppress_tokens
from nexus_jax.models.flux.packing import image_ids, latent_size, pack_latents, unpack_latents
from nexus_jax.models.nexus_ar import NexusGenAR
from nexus_jax.models.qwen2.cache import init_cache_for
from nexus_jax.nexus.batch import NexusBatch, VisionInputs
from nexus_jax.nexus.prefill import fill_slots, image_from_cache, position_after_image
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


@functools.partial(jax.jit, static_argnames=("graphdef", "capacity", "num_merged", "suppress_token_ids"))
def understanding_prefill(graphdef, state, ids, positions, mask, pixels, layout, input_mask, row_suppress=None, *,
                          capacity: int, num_merged: int, suppress_token_ids: tuple[int, ...] = ()):
    """ViT + prompt into a fresh KV cache. Returns (first greedy token [B], cache, next positions [B]);
    ``suppress_token_ids`` (and each row's ``row_suppress`` [B, K] ids, -1 = none) are never chosen."""
    model = nnx.merge(graphdef, state)
    feats = None if pixels is None else model.encode_images(pixels, layout, num_merged)
    cache = init_cache_for(model.config.vl.text, ids.shape[0], capacity)
    out = model(ids, positions=positions, slot_index=jnp.full(ids.shape, -1, jnp.int32), attention_mask=mask,
                input_features=feats, input_mask=input_mask if feats is not None else None, cache=cache)
    logits = suppress_per_row(suppress_tokens(out.logits[:, -1], suppress_token_ids), row_suppress)
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return first, out.cache, next_positions(positions, mask)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_merged"))
def _encode_images(graphdef, state, pixels, layout, *, num_merged: int) -> jax.Array:
    return nnx.merge(graphdef, state).encode_images(pixels, layout, num_merged)


@dataclasses.dataclass(frozen=True)
class FreeFormOutput:
    """:meth:`Runner.text_then_image` result. ``segments[b]``: row b's answer text as token arrays, one more than its
    images (image j sits between segments j and j + 1; markers and the stop token excluded); num_images [B];
    image_embeds [B, K, N, hidden] (K = the batch's largest image limit; zeros where a row has no image j; None if
    no row has an image)."""

    segments: tuple[tuple[np.ndarray, ...], ...]
    num_images: np.ndarray
    image_embeds: jax.Array | None

    @property
    def has_image(self) -> np.ndarray:
        return self.num_images > 0

    def text_tokens(self, row: int) -> np.ndarray:
        """Row ``row``'s answer tokens without the images (all segments, in order)."""
        return np.concatenate(self.segments[row]).astype(np.int32)


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
        max_images: int = 1,
        mesh: jax.sharding.Mesh | None = None,
        rules: sharding.Rules = sharding.INFERENCE_RULES,
    ):
        self.ar, self.vae, self.empty = ar, vae, empty
        self.decoders = {"generation": generation, "editing": editing}
        self.max_new_tokens, self.mesh, self.rules = max_new_tokens, mesh, rules
        if max_images < 0:
            raise ValueError(f"max_images must be >= 0, got {max_images}")
        self.max_images = max_images
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
    def _prefill(self, nb: NexusBatch, capacity: int, suppress: tuple[int, ...], row_suppress=None):
        """ViT + prompt into a KV cache of ``capacity`` slots -> (first greedy token [B], cache, next positions [B])."""
        graphdef, state = nnx.split(self.ar)
        p = self._placed(nb)
        pixels = layout = None
        num_merged = 0
        if nb.inputs is not None:
            pixels = jnp.asarray(nb.inputs.pixels)
            layout = {k: jnp.asarray(v) for k, v in nb.inputs.arrays().items()}
            num_merged = nb.inputs.num_merged
        return understanding_prefill(
            graphdef, state, p.input_ids, p.positions, p.attention_mask, pixels, layout, p.input_mask, row_suppress,
            capacity=capacity, num_merged=num_merged, suppress_token_ids=suppress,
        )

    def _decode_text(self, nb: NexusBatch, stop: tuple[int, ...], suppress: tuple[int, ...], extra_slots: int):
        """Prefill the prompt (ViT + text) and decode greedily until a ``stop`` id; returns the
        :class:`GenerationOutput` (with its cache) and each row's first generated position [B]."""
        capacity = nb.input_ids.shape[1] + self.max_new_tokens + extra_slots
        first, cache, position = self._prefill(nb, capacity, suppress)
        lm_graph, lm_state = nnx.split(self.ar.language_model)
        out = decode(lm_graph, lm_state, cache, first, position, jax.random.key(0), jnp.float32(0.0),
                     jnp.float32(1.0), max_new_tokens=self.max_new_tokens, eos_token_ids=stop,
                     pad_token_id=self.ar.config.tokens.endoftext, suppress_token_ids=suppress,
                     return_cache=extra_slots > 0)
        return out, position

    def understand(self, nb: NexusBatch) -> tuple[np.ndarray, np.ndarray]:
        """Greedy answers: (token ids [B, max_new_tokens], generated counts [B])."""
        tok = self.ar.config.tokens
        with self._context():
            out, _ = self._decode_text(nb, (tok.im_end, tok.endoftext), (), 0)
        return np.asarray(out.tokens), np.asarray(out.num_generated)

    def text_then_image(self, nb: NexusBatch, max_images: int | np.ndarray | None = None) -> FreeFormOutput:
        """Free-form answers, the reference ``_sample`` state machine batched, with several images per answer.

        Greedy text (``<|vision_end|>`` never chosen) until ``<|vision_start|>``, ``<|im_end|>``, ``<|endoftext|>``
        or ``max_new_tokens`` text tokens in all (``<|vision_start|>`` counts as one). Rows that stopped at
        ``<|vision_start|>`` then run their image in one (N + 2)-token forward on the decode's KV cache
        (``<|vision_start|>``, N slots, ``<|vision_end|>``, training positions: ``image_from_cache``), which also
        gives their next text token; those rows decode on (the others wait, masked) until the next stop, and so on.
        A row opens at most ``max_images`` [B] (or one int; default the runner's) images: after that
        ``<|vision_start|>`` is never chosen in that row. ``nb`` is an understanding-style batch."""
        tok, n = self.ar.config.tokens, self.ar.config.num_slots
        b, length = nb.input_ids.shape
        limits = np.broadcast_to(np.asarray(self.max_images if max_images is None else max_images, np.int64), (b,))
        if (limits < 0).any():
            raise ValueError(f"max_images must be >= 0, got {limits.tolist()}")
        k = int(limits.max())
        stop, suppress, budget = (tok.vision_start, tok.im_end, tok.endoftext), (tok.vision_end,), self.max_new_tokens
        capacity = length + (k + 1) * budget + k * (n + 2)  # <= k + 1 decode rounds of < budget slots, k images
        num_images, used = np.zeros(b, np.int64), np.zeros(b, np.int64)
        segments: list[list[list[int]]] = [[[]] for _ in range(b)]
        active = np.ones(b, bool)
        images: list[tuple[np.ndarray, np.ndarray, jax.Array]] = []  # (rows, image index, embeds [B, N, hidden])

        def bans() -> np.ndarray:  # [B, 1]: <|vision_start|> where the row's image budget is spent
            return np.where(num_images >= limits, tok.vision_start, -1)[:, None].astype(np.int32)

        lm_graph, lm_state = nnx.split(self.ar.language_model)
        with self._context():
            first, cache, position = self._prefill(nb, capacity, suppress, self._put(bans()))
            position = np.asarray(position, np.int64)
            while True:
                out = decode(lm_graph, lm_state, cache, first, self._put(position.astype(np.int32)),
                             jax.random.key(0), jnp.float32(0.0), jnp.float32(1.0), max_new_tokens=budget,
                             eos_token_ids=stop, pad_token_id=tok.endoftext, suppress_token_ids=suppress,
                             return_cache=True, active=self._put(active),
                             limit=self._put((budget - used).astype(np.int32)), row_suppress=self._put(bans()))
                cache = out.cache
                tokens, counts = np.asarray(out.tokens), np.asarray(out.num_generated, np.int64)
                last = tokens[np.arange(b), np.maximum(counts - 1, 0)]
                ended = active & np.isin(last, stop)
                for r in np.flatnonzero(active):
                    segments[r][-1].extend(tokens[r, : counts[r] - int(ended[r])].tolist())
                used += counts
                opening = active & (last == tok.vision_start)
                if not opening.any():
                    break
                at = position + counts - 1  # where <|vision_start|> goes (the stop token was not fed)
                index = num_images.copy()
                num_images += opening
                embeds, first, cache = image_from_cache(self.ar, cache, at, opening, suppress_token_ids=suppress,
                                                        row_suppress=bans())
                images.append((opening, index, embeds))
                for r in np.flatnonzero(opening):
                    segments[r].append([])
                position = np.where(opening, position_after_image(self.ar.config, at), position)
                active = opening & (used < budget)
                if not active.any():
                    break
            embeds_all = None
            if images:
                embeds_all = jnp.zeros((b, k, n, self.ar.config.vl.text.hidden_size), images[0][2].dtype)
                for rows, index, e in images:
                    put = jnp.asarray(rows[:, None] & (np.arange(k)[None] == index[:, None]))
                    embeds_all = jnp.where(put[:, :, None, None], e[:, None], embeds_all)
        segs = tuple(tuple(np.asarray(s, np.int32) for s in row) for row in segments)
        return FreeFormOutput(segs, num_images, embeds_all)

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

    def _decoder(self, task: str, batch: int, seeds: np.ndarray) -> ImageDecoder:
        """The ``task`` decoder, after checking that it, the VAE, the empty prompt and one seed per row exist."""
        decoder = self.decoders.get(task)
        if decoder is None:
            raise ValueError(f"the checkpoint has no {task} decoder")
        if self.vae is None or self.empty is None:
            raise ValueError("the checkpoint has no VAE / empty-prompt conditioning (needed by the decoders)")
        if np.asarray(seeds).shape != (batch,):
            raise ValueError(f"need one seed per row: seeds shape {np.asarray(seeds).shape}, batch {batch}")
        return decoder

    def images(self, task: str, nb: NexusBatch, seeds: np.ndarray, refs: VisionInputs | None = None) -> np.ndarray:
        """Generation / editing: pixels [B, H, W, 3] in ~[-1, 1] (float32, before PNG encoding). ``seeds`` [B]
        give each row's initial noise; ``refs`` are the editing decoder's reference images."""
        self._decoder(task, nb.input_ids.shape[0], seeds)  # fail before the AR work
        return self.decode_images(task, self.slot_embeddings(nb), seeds, refs)

    def decode_images(self, task: str, embeds: jax.Array, seeds: np.ndarray, refs: VisionInputs | None = None
                      ) -> np.ndarray:
        """The ``task`` decoder on predicted image embeddings [B, N, hidden] -> pixels [B, H, W, 3] in ~[-1, 1]."""
        b = embeds.shape[0]
        decoder = self._decoder(task, b, seeds)
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
