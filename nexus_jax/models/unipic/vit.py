"""timm-style ViT ``Block`` (pre-LN, fused-qkv MHSA, exact-GELU MLP) with an optional key mask, in flax.nnx.

Submodule names follow timm (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``) so a torch
state dict maps by renaming only (Linear ``weight [out, in]`` -> ``kernel [in, out]``). The fused ``qkv`` output is
laid out ``q | k | v``, each ``heads x head_dim``, as timm's ``reshape(B, N, 3, H, D)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nexus_jax.layers import LayerNorm, Linear, dot_product_attention
from nexus_jax.sharding import constrain

ACT = ("batch", "length", "act_embed")


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout with probability ``rate``; identity when ``key`` is None or ``rate`` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _split_key(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    return [None] * n if key is None else list(jax.random.split(key, n))


class Attention(nnx.Module):
    """Multi-head self-attention with a fused ``qkv`` Linear(C, 3C) and an output ``proj`` Linear(C, C)."""

    def __init__(
        self, dim: int, num_heads: int, *, qkv_bias: bool = True, proj_dropout: float = 0.0,
        param_dtype: jnp.dtype = jnp.float32, dtype: jnp.dtype | None = None, rngs: nnx.Rngs,
    ):
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim, self.proj_dropout = num_heads, dim // num_heads, proj_dropout
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.qkv = Linear(dim, 3 * dim, axes=("embed", "heads"), use_bias=qkv_bias, **kw)
        self.proj = Linear(dim, dim, axes=("heads", "embed"), **kw)

    def __call__(
        self, x: jax.Array, key_mask: jax.Array | None = None, *, dropout_key: jax.Array | None = None
    ) -> jax.Array:
        """x [B, L, C], key_mask [B, L] bool (True = may be attended) -> [B, L, C]."""
        b, length, c = x.shape
        qkv = self.qkv(x).reshape(b, length, 3, self.num_heads, self.head_dim)
        heads = ("batch", "length", "act_heads", None)
        q, k, v = (constrain(qkv[:, :, i], heads) for i in range(3))
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = dot_product_attention(q, k, v, mask=mask).reshape(b, length, c)
        return dropout(self.proj(out), self.proj_dropout, dropout_key)


class Mlp(nnx.Module):
    """fc1 -> GELU (exact erf, torch ``nn.GELU()``) -> fc2. x [..., C] -> [..., C]."""

    def __init__(
        self, dim: int, hidden: int, *, proj_dropout: float = 0.0, param_dtype: jnp.dtype = jnp.float32,
        dtype: jnp.dtype | None = None, rngs: nnx.Rngs,
    ):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.proj_dropout = proj_dropout
        self.fc1 = Linear(dim, hidden, axes=("embed", "mlp"), **kw)
        self.fc2 = Linear(hidden, dim, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        k1, k2 = _split_key(dropout_key, 2)
        h = jax.nn.gelu(self.fc1(x), approximate=False)
        h = dropout(constrain(h, ("batch", "length", "act_mlp")), self.proj_dropout, k1)
        return dropout(self.fc2(h), self.proj_dropout, k2)


class Block(nnx.Module):
    """Pre-LN transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    Dropout (timm ``proj_drop``: after ``attn.proj``, after the GELU and after ``fc2``) applies only when a
    ``dropout_key`` is passed; attention-probability dropout (timm ``attn_drop``) is not implemented.
    """

    def __init__(
        self, dim: int, num_heads: int, *, mlp_ratio: float = 4.0, qkv_bias: bool = True, eps: float = 1e-6,
        proj_dropout: float = 0.0, param_dtype: jnp.dtype = jnp.float32, dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        kw = dict(proj_dropout=proj_dropout, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.norm1 = LayerNorm(dim, eps=eps, param_dtype=param_dtype, rngs=rngs)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, **kw)
        self.norm2 = LayerNorm(dim, eps=eps, param_dtype=param_dtype, rngs=rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), **kw)

    def __call__(
        self, x: jax.Array, key_mask: jax.Array | None = None, *, dropout_key: jax.Array | None = None
    ) -> jax.Array:
        """x [B, L, C], key_mask [B, L] bool (True = may be attended; None = all) -> [B, L, C].

        Queries at excluded positions still produce (don't-care) outputs; they never influence other positions.
        """
        if x.ndim != 3:
            raise ValueError(f"Block expects x [B, L, C], got shape {x.shape}")
        if key_mask is not None and key_mask.shape != x.shape[:2]:
            raise ValueError(f"key_mask shape {key_mask.shape} does not match x's [B, L] = {x.shape[:2]}")
        k1, k2 = _split_key(dropout_key, 2)
        x = constrain(x + self.attn(self.norm1(x), key_mask, dropout_key=k1), ACT)
        return constrain(x + self.mlp(self.norm2(x), dropout_key=k2), ACT)
