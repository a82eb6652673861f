"""FLUX conditioning embeddings: sinusoidal timestep features, Linear-SiLU-Linear embedders, 3-axis RoPE tables."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nexus_jax.layers import Axes, Linear


def timestep_sinusoid(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal features of (possibly fractional) timesteps, ``[cos | sin]`` order (flip_sin_to_cos, shift 0).

    t [B] -> [B, dim] float32. FLUX feeds ``1000 * sigma`` and ``1000 * guidance``.
    """
    if dim % 2:
        raise ValueError(f"timestep embedding dim must be even, got {dim}")
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / half).astype(np.float32)
    args = t.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def silu_mlp(seq: nnx.List, x: jax.Array) -> jax.Array:
    """Apply a ``[Linear, None(SiLU), Linear]`` list (torch ``Sequential(Linear, SiLU, Linear)`` layout)."""
    return seq[2](jax.nn.silu(seq[0](x)))


def make_silu_mlp(
    in_dim: int, out_dim: int, *, param_dtype: jnp.dtype, dtype: jnp.dtype | None, rngs: nnx.Rngs,
    in_axes: Axes = (None, "mlp"), out_axes: Axes = ("mlp", "embed"), hidden_dim: int | None = None,
) -> nnx.List:
    """``[Linear(in, hidden), None, Linear(hidden, out)]`` (hidden defaults to out): indices 0 and 2 hold weights,
    as in the torch checkpoints."""
    hidden = out_dim if hidden_dim is None else hidden_dim
    return nnx.List([
        Linear(in_dim, hidden, axes=in_axes, param_dtype=param_dtype, dtype=dtype, rngs=rngs),
        None,
        Linear(hidden, out_dim, axes=out_axes, param_dtype=param_dtype, dtype=dtype, rngs=rngs),
    ])


class TimestepEmbedder(nnx.Module):
    """sinusoid(256) -> ``timestep_embedder`` MLP. t [B] (already x1000) -> [B, hidden]."""

    def __init__(self, freq_dim: int, hidden: int, *, param_dtype: jnp.dtype, dtype: jnp.dtype | None,
                 rngs: nnx.Rngs):
        self.freq_dim = freq_dim
        self.timestep_embedder = make_silu_mlp(freq_dim, hidden, param_dtype=param_dtype, dtype=dtype, rngs=rngs)

    def __call__(self, t: jax.Array) -> jax.Array:
        feats = timestep_sinusoid(t, self.freq_dim)
        return silu_mlp(self.timestep_embedder, feats.astype(self.timestep_embedder[0].kernel.dtype))


def rope_tables(ids: jax.Array, axes_dim: Sequence[int], theta: float) -> tuple[jax.Array, jax.Array]:
    """Interleaved-pair RoPE cos/sin for multi-axis integer or fractional positions.

    ids [..., L, n_axes] -> (cos, sin) each [..., L, sum(axes_dim) / 2] float32, axis blocks concatenated in order.
    """
    if ids.shape[-1] != len(axes_dim):
        raise ValueError(
            f"position ids have {ids.shape[-1]} axes, rope_axes_dim {tuple(axes_dim)} needs {len(axes_dim)}"
        )
    pos = ids.astype(jnp.float32)
    angles = []
    for i, d in enumerate(axes_dim):
        inv = (1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)).astype(np.float32)
        angles.append(pos[..., i : i + 1] * jnp.asarray(inv))
    ang = jnp.concatenate(angles, axis=-1)
    return jnp.cos(ang), jnp.sin(ang)
