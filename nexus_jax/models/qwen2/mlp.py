"""Qwen2 SwiGLU MLP: down_proj(silu(gate_proj(x)) * up_proj(x)), no biases."""

from __future__ import annotations

import jax
from flax import nnx

from configs.qwen2_5 import Qwen2TextConfig
from nexus_jax import layers, sharding


class Qwen2MLP(nnx.Module):
    """gate_proj / up_proj [hidden, mlp], down_proj [mlp, hidden]."""

    def __init__(self, config: Qwen2TextConfig, *, rngs: nnx.Rngs):
        common = {"param_dtype": config.jnp_param_dtype, "dtype": config.jnp_dtype, "use_bias": False, "rngs": rngs}
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = layers.Linear(hidden, inner, axes=("embed", "mlp"), **common)
        self.up_proj = layers.Linear(hidden, inner, axes=("embed", "mlp"), **common)
        self.down_proj = layers.Linear(inner, hidden, axes=("mlp", "embed"), **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, L, hidden] -> [B, L, hidden]."""
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        h = sharding.constrain(h, ("batch", "length", "act_mlp"))
        return self.down_proj(h)
