"""Qwen2.5 text decoder in flax.nnx (the Qwen2.5-VL language model)."""

from nexus_jax.models.qwen2.cache import KVCache, LayerKVCache, init_cache, init_cache_for
from nexus_jax.models.qwen2.decoder_layer import Qwen2DecoderLayer
from nexus_jax.models.qwen2.model import CausalLMOutput, Qwen2ForCausalLM, Qwen2Model, check_token_ids
from nexus_jax.models.qwen2.rope import rope_cos_sin

__all__ = [
    "CausalLMOutput",
    "KVCache",
    "LayerKVCache",
    "Qwen2DecoderLayer",
    "Qwen2ForCausalLM",
    "Qwen2Model",
    "check_token_ids",
    "init_cache",
    "init_cache_for",
    "rope_cos_sin",
]
