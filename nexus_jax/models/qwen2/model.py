"""Qwen2.5 text decoder: ``Qwen2Model`` (embed_tokens / layers / norm) and ``Qwen2ForCausalLM`` (+ lm_head)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.qwen2_5 import Qwen2TextConfig
from nexus_jax import layers, sharding
from nexus_jax.models.qwen2 import masks
from nexus_jax.models.qwen2.cache import KVCache
from nexus_jax.models.qwen2.decoder_layer import HIDDEN_AXES, Qwen2DecoderLayer
from nexus_jax.models.qwen2.rope import rope_cos_sin

# Full-sequence (cache-free) calls longer than this attend in causal query chunks of this many rows
# (qwen2.attention.causal_chunked_attention: about half the score FLOPs, one chunk's fp32 scores live at a time).
QUERY_CHUNK = 512


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CausalLMOutput:
    """logits [B, L, V] (or [B, 1, V] with ``only_last_logits``), hidden_states [B, L, hidden] after the final norm,
    and the updated cache (None without one)."""

    logits: jax.Array
    hidden_states: jax.Array
    cache: KVCache | None


def check_token_ids(input_ids: jax.Array, vocab_size: int) -> None:
    """Raise ValueError if a concrete id is < 0 or >= vocab_size (no-op while tracing)."""
    if isinstance(input_ids, jax.core.Tracer):
        return
    ids = np.asarray(input_ids)
    if ids.size and (ids.max() >= vocab_size or ids.min() < 0):
        bad = int(ids.max()) if ids.max() >= vocab_size else int(ids.min())
        raise ValueError(f"token id {bad} is out of range: ids must be in [0, vocab_size={vocab_size})")


def _layer_runner(query_chunk: int):
    def run(layer, x, cos, sin, mask, layer_cache, index):
        return layer(x, cos, sin, mask, layer_cache, index, query_chunk)

    return run


class Qwen2Model(nnx.Module):
    """Token embedding, ``num_layers`` decoder layers and the final RMSNorm."""

    def __init__(self, config: Qwen2TextConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = layers.Embed(
            config.vocab_size, config.hidden_size, param_dtype=config.jnp_param_dtype, rngs=rngs
        )
        self.layers = nnx.List([Qwen2DecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = layers.RMSNorm(
            config.hidden_size, eps=config.rms_norm_eps, param_dtype=config.jnp_param_dtype, rngs=rngs
        )

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Exactly one of input_ids [B, L] (int) or inputs_embeds [B, L, hidden].

        positions: [B, L] or [3, B, L] (int or float); default ``arange(L)`` (+ cache.index with a cache).
        attention_mask: [B, L], 1 = token, 0 = padding; default all ones.
        cache: fixed-size cache; the L new tokens are written at slots ``cache.index ..``.
        Returns (final-normed hidden states [B, L, hidden], updated cache or None).
        """
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            check_token_ids(input_ids, cfg.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != cfg.hidden_size:
            raise ValueError(f"inputs_embeds must be [B, L, hidden_size={cfg.hidden_size}], got {inputs_embeds.shape}")
        x = sharding.constrain(inputs_embeds.astype(cfg.jnp_dtype), HIDDEN_AXES)
        b, length, _ = x.shape
        if attention_mask is not None and attention_mask.shape != (b, length):
            raise ValueError(f"attention_mask shape {attention_mask.shape} != (batch, length) = {(b, length)}")
        start = jnp.zeros((), jnp.int32) if cache is None else cache.index
        if positions is None:
            positions = jnp.broadcast_to(start + jnp.arange(length), (b, length))
        if positions.shape[-2:] != (b, length):
            raise ValueError(f"positions shape {positions.shape} does not end in (batch, length) = {(b, length)}")
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)

        if cache is None and layers.resolve_attention_impl(cfg.attention_impl) == "splash":
            # the kernel's structured form; padding tokens form their own segment (their rows differ from the dense
            # mask's, whose padding queries see earlier real keys; padding rows are never read)
            tokens = jnp.ones((b, length), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
            mask = layers.SegmentMask(tokens, causal=True)
        elif cache is None:
            mask = masks.causal_padding_mask(attention_mask, length, b)
        else:
            if length > cache.capacity:
                raise ValueError(f"{length} new tokens do not fit the KV cache capacity of {cache.capacity} slots")
            new_valid = jnp.ones((b, length), bool) if attention_mask is None else attention_mask.astype(bool)
            valid = jax.lax.dynamic_update_slice(cache.valid, new_valid, (0, cache.index))
            mask = masks.cache_mask(valid, cache.index, length)

        run = _layer_runner(QUERY_CHUNK if cache is None else 0)
        if cfg.remat != "none":
            run = nnx.remat(run, policy=layers.REMAT_POLICIES[cfg.remat], prevent_cse=True)
        new_layers = []
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[i]
            x, layer_cache = run(layer, x, cos, sin, mask, layer_cache, start)
            new_layers.append(layer_cache)
        hidden = sharding.constrain(self.norm(x), HIDDEN_AXES)
        if cache is not None:
            cache = KVCache(tuple(new_layers), valid, cache.index + length)
        return hidden, cache


class Qwen2ForCausalLM(nnx.Module):
    """``model`` plus ``lm_head`` [hidden, vocab] (absent when ``tie_word_embeddings``: logits use embed_tokens)."""

    def __init__(self, config: Qwen2TextConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = Qwen2Model(config, rngs=rngs)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else layers.Linear(
                config.hidden_size,
                config.vocab_size,
                axes=("embed", "vocab"),
                use_bias=False,
                param_dtype=config.jnp_param_dtype,
                dtype=config.jnp_dtype,
                rngs=rngs,
            )
        )

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., hidden] -> float32 logits [..., vocab]."""
        if self.lm_head is None:
            out = self.model.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden)
        logical = ("batch", "length", "act_vocab") if out.ndim == 3 else (None,) * (out.ndim - 1) + ("act_vocab",)
        return sharding.constrain(out.astype(jnp.float32), logical)

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        positions: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        only_last_logits: bool = False,
    ) -> CausalLMOutput:
        """Same inputs as :meth:`Qwen2Model.__call__`; ``only_last_logits`` computes logits for the last slot only."""
        hidden, cache = self.model(
            input_ids, inputs_embeds=inputs_embeds, positions=positions, attention_mask=attention_mask, cache=cache
        )
        logits = self.logits(hidden[:, -1:] if only_last_logits else hidden)
        return CausalLMOutput(logits, hidden, cache)
