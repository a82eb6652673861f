"""Matmul-only model: a stack of bias-free square Linear layers, the planner's hand-checkable workload.

Per train step on ``tokens`` rows of width ``d`` with ``L`` layers the matmul FLOPs are exactly
``2 * tokens * d^2 * (3L - 1)``: forward ``2 t d^2 L``, weight gradients ``2 t d^2 L``, input gradients
``2 t d^2 (L - 1)`` (the input of the first layer needs none).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from configs.plans import MatmulConfig
from launch.remat import remat_call
from nexus_jax import sharding
from nexus_jax.layers import Linear


def train_flops(cfg: MatmulConfig, tokens: int) -> float:
    """Exact matmul FLOPs of one forward + backward pass over ``tokens`` rows."""
    return 2.0 * tokens * cfg.dim**2 * (3 * cfg.num_layers - 1)


class MatmulStack(nnx.Module):
    """x [B, d] -> x @ W_1 @ ... @ W_L; kernels alternate logical axes (embed, mlp) / (mlp, embed) (Megatron pairs)."""

    def __init__(self, cfg: MatmulConfig, *, remat: str = "none", rngs: nnx.Rngs):
        self.cfg, self.remat = cfg, remat
        dtype = jnp.dtype(cfg.param_dtype)
        axes = [("embed", "mlp") if i % 2 == 0 else ("mlp", "embed") for i in range(cfg.num_layers)]
        self.layers = nnx.List(
            [Linear(cfg.dim, cfg.dim, axes=a, use_bias=False, param_dtype=dtype, rngs=rngs) for a in axes]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = remat_call(layer, self.remat, x)
            x = sharding.constrain(x, ("batch", "act_mlp" if i % 2 == 0 else "act_embed"))
        return x


def matmul_loss(model: MatmulStack, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
    """loss = mean(model(x)^2) over batch["x"] [B, d]."""
    del rng
    y = model(batch["x"])
    return jnp.mean(jnp.square(y.astype(jnp.float32))), {}
