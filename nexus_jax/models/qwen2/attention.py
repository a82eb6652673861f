"""Qwen2 grouped-query self-attention: biased q/k/v projections, rotate-half RoPE, optional fixed-size KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from configs.qwen2_5 import Qwen2TextConfig
from nexus_jax import layers, sharding
from nexus_jax.models.qwen2.cache import LayerKVCache

HEADS_AXES = ("batch", "length", "act_heads", None)
KV_AXES = ("batch", "length", "act_kv_heads", None)


def grouped_query_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Softmax attention (fp32 scores), GQA without repeating k / v.

    q [B, Lq, Hq, D]; k, v [B, Lk, Hkv, D]; mask broadcastable to [B, Hq, Lq, Lk] (True = attend) or None.
    Returns [B, Lq, Hq, D]. The Hq // Hkv query heads sharing a KV head are stacked with the queries into one
    [G * Lq, D] @ [D, Lk] matmul per KV head (about 3x faster on CPU than a 5-D einsum). A row whose keys are all
    masked averages the values (such rows are padding).
    """
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads {hq} not divisible by kv heads {hkv}")
    g = hq // hkv
    qg = q.reshape(b, lq, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * lq, d)
    scores = jnp.einsum("bhmd,bkhd->bhmk", qg, k, preferred_element_type=jnp.float32) * (d**-0.5)
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        if mask.shape[1] == 1:
            mask = mask[:, :, None]  # [B, 1, 1, Lq, Lk]
        else:
            mask = jnp.broadcast_to(mask, (mask.shape[0], hq, lq, lk)).reshape(mask.shape[0], hkv, g, lq, lk)
        scores = scores.reshape(b, hkv, g, lq, lk)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min).reshape(b, hkv, g * lq, lk)
    probs = layers.softmax(scores).astype(v.dtype)
    out = jnp.einsum("bhmk,bkhd->bhmd", probs, v).reshape(b, hkv, g, lq, d)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, lq, hq, d)


def causal_chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, chunk: int,
                             attend=grouped_query_attention) -> jax.Array:
    """:func:`grouped_query_attention` for a *causal* mask, in query chunks of ``chunk`` rows.

    Query chunk ``[s, e)`` attends to keys ``[0, e)`` only (later keys are masked by causality), so the scores
    computed shrink to about half of the dense ``L x L``; each chunk runs under ``jax.checkpoint``, so only one chunk's
    fp32 scores ``[B, Hkv, G * chunk, e]`` are live at a time, in the forward and in the backward pass. The chunks are a
    Python loop (a loop-free program). q [B, L, Hq, D]; k, v [B, L, Hkv, D]; mask [B, 1 or Hq, L, L] (True = attend;
    it must hide every key after its query) or None (plain causal). ``attend(q, k, v, mask)`` computes one chunk
    (default :func:`grouped_query_attention`). Returns [B, L, Hq, D]; equal to the dense call on every row with at
    least one visible key (fully masked padding rows average fewer values).
    """
    length = q.shape[1]
    if k.shape[1] != length:
        raise ValueError(f"causal chunked attention needs as many keys as queries, got {k.shape[1]} and {length}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if mask is None:
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    part = jax.checkpoint(attend)
    outs = []
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        outs.append(part(q[:, start:end], k[:, :end], v[:, :end], mask[..., start:end, :end]))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


class Qwen2Attention(nnx.Module):
    """q_proj [hidden, Hq*D] (bias), k_proj / v_proj [hidden, Hkv*D] (bias), o_proj [Hq*D, hidden] (no bias)."""

    def __init__(self, config: Qwen2TextConfig, *, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.attention_impl = config.attention_impl
        common = {"param_dtype": config.jnp_param_dtype, "dtype": config.jnp_dtype, "rngs": rngs}
        hidden = config.hidden_size
        self.q_proj = layers.Linear(hidden, config.q_size, axes=("embed", "heads"), use_bias=True, **common)
        self.k_proj = layers.Linear(hidden, config.kv_size, axes=("embed", "kv_heads"), use_bias=True, **common)
        self.v_proj = layers.Linear(hidden, config.kv_size, axes=("embed", "kv_heads"), use_bias=True, **common)
        self.o_proj = layers.Linear(config.q_size, hidden, axes=("heads", "embed"), use_bias=False, **common)

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array | layers.SegmentMask | None = None,
        cache: LayerKVCache | None = None,
        cache_index: jax.Array | int = 0,
        query_chunk: int = 0,
    ) -> tuple[jax.Array, LayerKVCache | None]:
        """x [B, L, hidden]; cos / sin [B, L, D]; mask broadcastable to [B, Hq, L, Lk] (True = attend, None = all).

        Without a cache Lk = L. With a cache, k / v are written at slots ``cache_index ..`` and the queries attend
        over all S cache slots (the mask must then cover [.., L, S]). ``query_chunk`` > 0 (no cache, causal ``mask``
        only): :func:`causal_chunked_attention` when L > query_chunk. ``config.attention_impl`` picks the kernel
        (layers.resolve_attention_impl); a :class:`layers.SegmentMask` (cache-free only) goes to that kernel whole
        (no query chunks); a dense mask goes to jax.nn for "jax_nn", else to :func:`grouped_query_attention`.
        Returns ([B, L, hidden], updated cache).
        """
        b, l, _ = x.shape
        q = self.q_proj(x).reshape(b, l, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, l, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, l, self.num_kv_heads, self.head_dim)
        cos, sin = cos[:, :, None, :].astype(q.dtype), sin[:, :, None, :].astype(q.dtype)
        q = sharding.constrain(layers.apply_rotary_half(q, cos, sin), HEADS_AXES)
        k = sharding.constrain(layers.apply_rotary_half(k, cos, sin), KV_AXES)
        v = sharding.constrain(v, KV_AXES)
        if cache is not None:
            cache = cache.write(k, v, cache_index)
            k, v = cache.key.astype(q.dtype), cache.value.astype(q.dtype)
        impl = layers.resolve_attention_impl(self.attention_impl, mask)
        if isinstance(mask, layers.SegmentMask):
            if cache is not None:
                raise ValueError("a SegmentMask is for cache-free calls; KV-cache calls take a dense mask")
            out = layers.dot_product_attention(q, k, v, mask=mask, impl=impl)
        else:
            # "auto" off TPU keeps grouped_query_attention: faster than jax.nn on CPU at 9/3 and 28/4 heads
            attend = layers.jax_nn_attention if self.attention_impl == "jax_nn" else grouped_query_attention
            if query_chunk and cache is None and l > query_chunk:
                out = causal_chunked_attention(q, k, v, mask, query_chunk, attend)
            else:
                out = attend(q, k, v, mask)
        out = sharding.constrain(out, HEADS_AXES).reshape(b, l, self.num_heads * self.head_dim)
        return self.o_proj(out), cache
