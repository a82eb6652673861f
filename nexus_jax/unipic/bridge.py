"""The UniPic-1 LLM bridge (unipic.md 2.5) in static shapes (3.6).

Torch drops the masked image tokens and runs the LLM over ``[text ; visible tokens ; buffers]`` with a KV cache of the
text that is truncated after each iteration. Here the text is prefilled once into a fixed-capacity cache
(:func:`prefill_context`, capacity ``L_ctx + N + buffers``) that is never mutated; each iteration writes a fresh image
segment ``[all N image slots in raster order ; buffers]`` behind it (:func:`bridge`), with the masked slots excluded as
attention keys and these position ids (right-padded prompts, ``T`` = the row's true text length)::

    image slot j : T + cumsum(visible)[j] - 1        buffer i : T + N_vis + i

which equals torch's ``cumsum(attention_mask) - 1`` over the dropped sequence. Causal attention in raster order is kept
because the slots stay in raster order. The outputs at masked slots are finite but meaningless (the MAR decoder
replaces them). The segment's cache is discarded, which is upstream's ``curtail_cache``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from nexus_jax.diffusion.maskgit import gather_predicted, put_rows, take_rows
from nexus_jax.models.qwen2 import KVCache, Qwen2ForCausalLM, init_cache_for

Proj = Callable[[jax.Array], jax.Array]


def prefill_context(
    llm: Qwen2ForCausalLM, ctx_embeds: jax.Array, ctx_mask: jax.Array, segment_len: int
) -> KVCache:
    """Text (or source image + instruction) context -> its KV cache, with room for one image segment.

    ctx_embeds [B, Lc, hidden] right-padded, ctx_mask [B, Lc] (1 = token). Positions are ``arange(Lc)`` (upstream
    prefills with ``position_ids=None``; exact for right padding). Returns a cache of capacity ``Lc + segment_len``
    whose ``index`` is Lc and whose ``valid`` marks the real context tokens.
    """
    b, lc, _ = ctx_embeds.shape
    if ctx_mask.shape != (b, lc):
        raise ValueError(f"ctx_mask shape {ctx_mask.shape} != {(b, lc)}")
    if segment_len < 1:
        raise ValueError(f"segment_len must be >= 1, got {segment_len}")
    cache = init_cache_for(llm.config, b, lc + segment_len)
    _, cache = llm.model(inputs_embeds=ctx_embeds, attention_mask=ctx_mask, cache=cache)
    return cache


def segment_positions(ctx_mask: jax.Array, visible: jax.Array, buffer_size: int) -> jax.Array:
    """Position ids [B, N + buffers] of the image segment (module docstring); ctx_mask [B, Lc], visible [B, N]."""
    text_len = ctx_mask.astype(jnp.int32).sum(-1, keepdims=True)
    vis = visible.astype(jnp.int32)
    image = text_len + jnp.maximum(jnp.cumsum(vis, axis=-1) - 1, -1)
    buffers = text_len + vis.sum(-1, keepdims=True) + jnp.arange(buffer_size, dtype=jnp.int32)
    return jnp.maximum(jnp.concatenate([image, buffers], axis=-1), 0)


def _segment_delta(
    llm: Qwen2ForCausalLM, proj_in: Proj, proj_out: Proj, x_enc: jax.Array, visible: jax.Array, prefix: KVCache,
    ctx_mask: jax.Array,
) -> jax.Array:
    """proj_out(h) [B, buffers + M, C] for x_enc [B, buffers + M, C] whose M image rows are in raster order."""
    b, total, _ = x_enc.shape
    m = visible.shape[1]
    nb = total - m
    z = proj_in(x_enc)
    z = jnp.concatenate([z[:, nb:], z[:, :nb]], axis=1)  # buffers to the end
    keys = jnp.concatenate([visible.astype(bool), jnp.ones((b, nb), bool)], axis=1)
    positions = segment_positions(ctx_mask, visible, nb)
    h, _ = llm.model(inputs_embeds=z, positions=positions, attention_mask=keys, cache=prefix)
    h = jnp.concatenate([h[:, m:], h[:, :m]], axis=1)  # buffers back to the front
    return proj_out(h).astype(x_enc.dtype)


def bridge(
    llm: Qwen2ForCausalLM,
    proj_in: Proj,
    proj_out: Proj,
    x_enc: jax.Array,
    visible: jax.Array,
    prefix: KVCache,
    ctx_mask: jax.Array,
    capacity: int | None = None,
) -> jax.Array:
    """x_enc [B, buffers + N, C] (MAR encoder output, buffers first), visible [B, N] (1 = known token),
    prefix from :func:`prefill_context`, ctx_mask [B, Lc] -> x_enc + proj_out(h) [B, buffers + N, C].

    h is the LLM's final-normed hidden state of the segment ``[image slots ; buffers]``, rotated back to buffers-first.
    ``capacity`` (static, >= every row's visible count): the LLM runs on the visible rows gathered in raster order
    into ``capacity`` slots (padding excluded as keys) instead of all N, attending over the prefix's first
    ``Lc + buffers + capacity`` slots only, and the result is scattered back (masked rows get no update). Same numbers
    at the visible rows, less work in the early iterations.
    """
    b, total, _ = x_enc.shape
    n = visible.shape[1]
    nb = total - n
    if visible.shape[0] != b or nb < 0:
        raise ValueError(f"visible {visible.shape} does not fit x_enc {x_enc.shape} (buffers + N tokens)")
    if prefix.capacity < ctx_mask.shape[1] + total:
        raise ValueError(f"prefix cache capacity {prefix.capacity} < context {ctx_mask.shape[1]} + segment {total}")
    if capacity is None:
        return x_enc + _segment_delta(llm, proj_in, proj_out, x_enc, visible, prefix, ctx_mask)
    if not 0 <= capacity <= n:
        raise ValueError(f"capacity must be in [0, N={n}], got {capacity}")
    idx, valid = gather_predicted(visible.astype(bool), capacity)
    gathered = take_rows(x_enc[:, nb:], idx)
    # the segment is buffers + capacity rows: the prefix's slots past it would be empty keys of every layer
    segment_prefix = prefix.truncated(ctx_mask.shape[1] + nb + capacity)
    delta = _segment_delta(llm, proj_in, proj_out, jnp.concatenate([x_enc[:, :nb], gathered], axis=1), valid,
                           segment_prefix, ctx_mask)
    image = put_rows(jnp.zeros((b, n, x_enc.shape[-1]), delta.dtype), delta[:, nb:], idx, valid)
    return x_enc + jnp.concatenate([delta[:, :nb], image], axis=1)
