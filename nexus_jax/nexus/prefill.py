"""Image-embedding generation by prefilled autoregression: all N slots in one parallel causal forward pass.

The slot inputs (V1: the ``<|image_pad|>`` embedding, V2: ``image_prefill_embeds[k]``) never depend on earlier
outputs, so the token-by-token loop of the reference implementation equals one forward pass over
``prompt <|vision_start|> slot_0 .. slot_{N-1}``: the ``vision_head`` output at ``<|vision_start|>`` is embedding 0
and the output at slot k is embedding k + 1. :func:`fill_slots_sequential` runs that loop with a KV cache (one slot
per step) as the reference and the benchmark baseline.

Batches are left-padded and every row ends with its N slots, so the predictions are the static slice
``[L - N - 1, L - 1)`` of every row.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nexus_jax.models.nexus_ar import NexusGenAR
from nexus_jax.models.qwen2 import init_cache_for
from nexus_jax.nexus import templates
from nexus_jax.nexus.batch import NexusBatch, Sample, make_batch


def generation_samples(prompts: Sequence[str], language: templates.Language = "en") -> list[Sample]:
    """Text-to-image requests (the answer text the model was trained with precedes the slots)."""
    return [Sample(templates.generation_messages(p, language)) for p in prompts]


def editing_samples(
    instructions: Sequence[str], images: Sequence[object], language: templates.Language = "en"
) -> list[Sample]:
    """Edit requests: each instruction with its source image (smart-resized, e.g. 512x512 -> 504x504 = 324 tokens)."""
    if len(instructions) != len(images):
        raise ValueError(f"{len(instructions)} edit instructions but {len(images)} source images")
    return [Sample(templates.editing_messages(t, language), input_images=[im]) for t, im in zip(instructions, images)]


def slot_batch(samples: Sequence[Sample], encode: templates.Encode, model_or_cfg, **kwargs) -> NexusBatch:
    """Batch for :func:`fill_slots`: each sequence stops after the N slots of its first output image."""
    cfg = getattr(model_or_cfg, "config", model_or_cfg)
    return make_batch(samples, encode, cfg, training=False, stop_after_slots=True, **kwargs)


def _check_slot_layout(batch: NexusBatch, n: int) -> None:
    tail = batch.slot_index[:, -n:]
    if batch.slot_index.shape[1] < n + 1 or not np.all(tail == np.arange(n)):
        raise ValueError(f"every row must end with its {n} image slots (build the batch with slot_batch)")
    if np.any(batch.slot_index[:, : -n] >= 0):
        raise ValueError("a row holds more than one output image; fill_slots fills exactly one per row")


def _input_features(model: NexusGenAR, batch: NexusBatch) -> jax.Array | None:
    if batch.inputs is None:
        return None
    return _encode(model, jnp.asarray(batch.inputs.pixels), batch.inputs.arrays(), batch.inputs.num_merged)


@partial(nnx.jit, static_argnums=(3,))
def _encode(model: NexusGenAR, pixels: jax.Array, layout: dict, num_merged: int) -> jax.Array:
    return model.encode_images(pixels, layout, num_merged)


def _parallel(model: NexusGenAR, ids, positions, slot_index, mask, feats, input_mask) -> jax.Array:
    n = model.config.num_slots
    embeds = model.embed_inputs(ids, slot_index, feats, input_mask if feats is not None else None)
    hidden, _ = model.language_model.model(inputs_embeds=embeds, positions=positions, attention_mask=mask)
    return model.head(hidden[:, -n - 1 : -1])


_parallel_jit = nnx.jit(_parallel)


def fill_slots(model: NexusGenAR, batch: NexusBatch, *, jit: bool = True) -> jax.Array:
    """One parallel forward pass -> predicted image embeddings [B, N, hidden] (N = ``num_slots``)."""
    _check_slot_layout(batch, model.config.num_slots)
    fn = _parallel_jit if jit else _parallel
    return fn(
        model, jnp.asarray(batch.input_ids), jnp.asarray(batch.positions), jnp.asarray(batch.slot_index),
        jnp.asarray(batch.attention_mask), _input_features(model, batch), jnp.asarray(batch.input_mask),
    )


def _step(graphdef, state, cache, ids, positions, slot_index, mask, feats, input_mask):
    model = nnx.merge(graphdef, state)
    embeds = model.embed_inputs(ids, slot_index, feats, input_mask if feats is not None else None)
    hidden, cache = model.language_model.model(
        inputs_embeds=embeds, positions=positions, attention_mask=mask, cache=cache
    )
    return model.head(hidden[:, -1]), cache


_step_jit = jax.jit(_step, static_argnums=(0,), donate_argnums=(2,))


def fill_slots_sequential(model: NexusGenAR, batch: NexusBatch) -> jax.Array:
    """Reference: prefill the prompt through ``<|vision_start|>``, then N - 1 single-slot KV-cache steps.

    Same inputs and positions as :func:`fill_slots`; returns [B, N, hidden].
    """
    n = model.config.num_slots
    _check_slot_layout(batch, n)
    b, length = batch.input_ids.shape
    prefix = length - n
    graphdef, state = nnx.split(model)
    cache = init_cache_for(model.config.vl.text, b, length)
    ids, pos = jnp.asarray(batch.input_ids), jnp.asarray(batch.positions)
    slots, mask = jnp.asarray(batch.slot_index), jnp.asarray(batch.attention_mask)
    feats = _input_features(model, batch)
    in_mask = jnp.asarray(batch.input_mask[:, :prefix])
    out, cache = _step_jit(
        graphdef, state, cache, ids[:, :prefix], pos[:, :, :prefix], slots[:, :prefix], mask[:, :prefix], feats,
        in_mask,
    )
    outs = [out]
    for t in range(prefix, length - 1):
        sl = slice(t, t + 1)
        out, cache = _step_jit(graphdef, state, cache, ids[:, sl], pos[:, :, sl], slots[:, sl], mask[:, sl], None, None)
        outs.append(out)
    return jnp.stack(outs, axis=1)
