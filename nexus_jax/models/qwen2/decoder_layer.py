"""One pre-norm Qwen2 decoder layer (also used bidirectionally by the Nexus-Gen editing merger)."""

from __future__ import annotations

import jax
from flax import nnx

from configs.qwen2_5 import Qwen2TextConfig
from nexus_jax import layers, sharding
from nexus_jax.models.qwen2.attention import Qwen2Attention
from nexus_jax.models.qwen2.cache import LayerKVCache
from nexus_jax.models.qwen2.mlp import Qwen2MLP

HIDDEN_AXES = ("batch", "length", "act_embed")


class Qwen2DecoderLayer(nnx.Module):
    """x + attn(input_layernorm(x)), then + mlp(post_attention_layernorm(.))."""

    def __init__(self, config: Qwen2TextConfig, *, rngs: nnx.Rngs):
        norm = {"eps": config.rms_norm_eps, "param_dtype": config.jnp_param_dtype, "rngs": rngs}
        self.input_layernorm = layers.RMSNorm(config.hidden_size, **norm)
        self.self_attn = Qwen2Attention(config, rngs=rngs)
        self.post_attention_layernorm = layers.RMSNorm(config.hidden_size, **norm)
        self.mlp = Qwen2MLP(config, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array | None = None,
        cache: LayerKVCache | None = None,
        cache_index: jax.Array | int = 0,
        query_chunk: int = 0,
    ) -> tuple[jax.Array, LayerKVCache | None]:
        """x [B, L, hidden]; cos / sin [B, L, head_dim]; mask [B, 1, L, Lk] bool or None (= bidirectional, no
        padding); ``query_chunk``: see :class:`Qwen2Attention` (causal masks only). Returns (x [B, L, hidden], the
        updated cache or None)."""
        attn, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_index, query_chunk)
        x = sharding.constrain(x + attn, HIDDEN_AXES)
        x = sharding.constrain(x + self.mlp(self.post_attention_layernorm(x)), HIDDEN_AXES)
        return x, cache
