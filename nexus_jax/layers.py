"""Shared building blocks in flax.nnx with logical axis names on every parameter.

Conventions: Linear kernels are stored ``[in, out]`` (torch stores ``[out, in]``); ``param_dtype`` is the storage
dtype, ``dtype`` the compute dtype (None = same as the inputs' promotion with the params).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]

# Rematerialisation (jax.checkpoint) policies by name, for per-block remat ("none" = no remat; not in the table).
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def make_param(
    rngs: nnx.Rngs | None,
    init: jax.nn.initializers.Initializer,
    shape: Sequence[int],
    axes: Axes,
    dtype: jnp.dtype = jnp.float32,
) -> nnx.Param:
    """An nnx.Param of ``shape`` with logical ``axes`` (lazy-sharding friendly: no eager placement)."""
    if len(axes) != len(shape):
        raise ValueError(f"{len(axes)} logical axes {axes} for a parameter of shape {tuple(shape)}")
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False)


class Linear(nnx.Module):
    """y = x @ kernel + bias.  kernel [in, out] with logical axes ``axes``; bias [out] with ``axes[1]``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: Axes = ("embed", "mlp"),
        use_bias: bool = True,
        param_dtype: jnp.dtype = jnp.float32,
        dtype: jnp.dtype | None = None,
        kernel_init: jax.nn.initializers.Initializer | None = None,
        rngs: nnx.Rngs,
    ):
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        kinit = kernel_init or nnx.initializers.normal(0.02)
        self.kernel = make_param(rngs, kinit, (in_features, out_features), axes, param_dtype)
        self.bias = (
            make_param(rngs, nnx.initializers.zeros_init(), (out_features,), (axes[1],), param_dtype)
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> [..., out]."""
        dtype = self.dtype or jnp.result_type(x.dtype, self.kernel.dtype)
        y = jnp.dot(x.astype(dtype), self.kernel[...].astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class RMSNorm(nnx.Module):
    """Qwen/T5-style RMSNorm: statistics in fp32, ``weight * normed.astype(input dtype)``."""

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-6,
        axes: Axes = ("norm",),
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        self.eps = eps
        self.weight = make_param(rngs, nnx.initializers.ones_init(), (dim,), axes, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., dim] -> same shape and dtype."""
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis (torch semantics), optional affine parameters; statistics in fp32."""

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-5,
        affine: bool = True,
        axes: Axes = ("norm",),
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        self.eps = eps
        self.weight = make_param(rngs, nnx.initializers.ones_init(), (dim,), axes, param_dtype) if affine else None
        self.bias = make_param(rngs, nnx.initializers.zeros_init(), (dim,), axes, param_dtype) if affine else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., dim] -> same shape and dtype."""
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class Embed(nnx.Module):
    """Token embedding table [vocab, dim] with logical axes ("vocab", "embed")."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        axes: Axes = ("vocab", "embed"),
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.embedding = make_param(rngs, nnx.initializers.normal(0.02), (num_embeddings, features), axes, param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids [...] int -> [..., dim]."""
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output projection: x [..., dim] -> logits [..., vocab]."""
        return jnp.dot(x, self.embedding[...].astype(x.dtype).T)


def rotate_half(x: jax.Array) -> jax.Array:
    """[x1, x2] -> [-x2, x1] over the last axis (HF/Qwen convention)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary_half(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE. x [..., D]; cos/sin broadcastable to x with last dim D."""
    return x * cos + rotate_half(x) * sin


def apply_rotary_interleaved(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Interleaved-pair RoPE (BFL/FLUX convention). x [..., D]; cos/sin [..., D/2] broadcastable."""
    xr = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xr[..., 0], xr[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Grouped-query attention with an fp32 softmax.

    q [B, Lq, Hq, D]; k, v [B, Lk, Hkv, D] with Hq % Hkv == 0; mask broadcastable to [B, Hq, Lq, Lk] (True = attend).
    Returns [B, Lq, Hq, D] in q's dtype. Rows with no allowed key return zeros.
    """
    b, lq, hq, d = q.shape
    hkv = k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads {hq} not divisible by kv heads {hkv}")
    groups = hq // hkv
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(b, lq, hkv, groups, d)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        m = jnp.broadcast_to(mask, (b, hq, lq, k.shape[1])).reshape(b, hkv, groups, lq, k.shape[1])
        logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        probs = jnp.where(m, probs, 0.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v)
    return out.reshape(b, lq, hq, d)
