"""FLUX transformer blocks with DiffSynth ``FluxDiT`` submodule names.

Double-stream ``blocks[i]``: ``norm1_a/norm1_b.linear`` (AdaLN, 6 chunks), ``attn`` (fused ``a_to_qkv``/``b_to_qkv``,
``norm_{q,k}_{a,b}``, ``a_to_out``/``b_to_out``), ``ff_a``/``ff_b`` = ``[Linear, GELU-tanh, Linear]``.
Single-stream ``single_blocks[j]``: ``norm.linear`` (3 chunks), ``to_qkv_mlp`` (q;k;v;mlp), ``norm_{q,k}_a``,
``proj_out``. Suffix ``a`` is the image stream, ``b`` the text/conditioning stream.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from configs.flux import FluxDiTConfig
from nexus_jax.layers import Linear, RMSNorm, apply_rotary_interleaved, dot_product_attention
from nexus_jax.sharding import constrain

ACT = ("batch", "length", "act_embed")
ACT_HEADS = ("batch", "length", "act_heads", None)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """Non-affine LayerNorm over the last axis with fp32 statistics; keeps x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """x [B, L, D] * (1 + scale[B, D]) + shift[B, D]."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def split_heads(x: jax.Array, head_dim: int) -> jax.Array:
    """[B, L, H*hd] -> [B, L, H, hd] (constrained over heads)."""
    b, l, _ = x.shape
    return constrain(x.reshape(b, l, -1, head_dim), ACT_HEADS)


class AdaLNModulation(nnx.Module):
    """``linear(silu(temb))`` split into ``chunks`` vectors of width ``dim``. temb [B, D] -> chunks x [B, D]."""

    def __init__(self, dim: int, chunks: int, *, cfg: FluxDiTConfig, rngs: nnx.Rngs):
        self.chunks = chunks
        self.linear = Linear(dim, chunks * dim, axes=("embed", "mlp"), param_dtype=cfg.param_dtype, dtype=cfg.dtype,
                             rngs=rngs)

    def __call__(self, temb: jax.Array) -> tuple[jax.Array, ...]:
        mods = jnp.split(self.linear(jax.nn.silu(temb)), self.chunks, axis=-1)
        return tuple(constrain(m, ("batch", "act_embed")) for m in mods)


def _gelu_ff(dim: int, hidden: int, cfg: FluxDiTConfig, rngs: nnx.Rngs) -> nnx.List:
    return nnx.List([
        Linear(dim, hidden, axes=("embed", "mlp"), param_dtype=cfg.param_dtype, dtype=cfg.dtype, rngs=rngs),
        None,
        Linear(hidden, dim, axes=("mlp", "embed"), param_dtype=cfg.param_dtype, dtype=cfg.dtype, rngs=rngs),
    ])


def _apply_ff(ff: nnx.List, x: jax.Array) -> jax.Array:
    h = jax.nn.gelu(ff[0](x), approximate=True)
    return ff[2](constrain(h, ("batch", "length", "act_mlp")))


def _rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    return apply_rotary_interleaved(x, cos, sin)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, cos: jax.Array, sin: jax.Array, impl: str = "auto"
            ) -> jax.Array:
    """RoPE on q, k then full (unmasked) attention by ``impl`` (FluxDiTConfig.attention_impl).

    q, k, v [B, L, H, hd] -> [B, L, H*hd]."""
    out = dot_product_attention(_rope(q, cos, sin), _rope(k, cos, sin), v, impl=impl)
    b, l, h, d = out.shape
    return constrain(out.reshape(b, l, h * d), ACT)


class JointAttention(nnx.Module):
    """Joint attention over ``[text; image]`` with separate projections per stream."""

    def __init__(self, cfg: FluxDiTConfig, *, rngs: nnx.Rngs):
        d, kw = cfg.hidden_size, dict(param_dtype=cfg.param_dtype, dtype=cfg.dtype, rngs=rngs)
        self.head_dim, self.attention_impl = cfg.head_dim, cfg.attention_impl
        self.a_to_qkv = Linear(d, 3 * d, axes=("embed", "heads"), **kw)
        self.b_to_qkv = Linear(d, 3 * d, axes=("embed", "heads"), **kw)
        nkw = dict(eps=cfg.eps, param_dtype=cfg.param_dtype, rngs=rngs)
        self.norm_q_a, self.norm_k_a = RMSNorm(cfg.head_dim, **nkw), RMSNorm(cfg.head_dim, **nkw)
        self.norm_q_b, self.norm_k_b = RMSNorm(cfg.head_dim, **nkw), RMSNorm(cfg.head_dim, **nkw)
        self.a_to_out = Linear(d, d, axes=("heads", "embed"), **kw)
        self.b_to_out = Linear(d, d, axes=("heads", "embed"), **kw)

    def __call__(self, img: jax.Array, txt: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """img [B, Li, D], txt [B, Lt, D]; cos/sin broadcastable to [B, Lt+Li, 1, hd/2]. Returns (img, txt) outputs."""
        qa, ka, va = (split_heads(t, self.head_dim) for t in jnp.split(self.a_to_qkv(img), 3, axis=-1))
        qb, kb, vb = (split_heads(t, self.head_dim) for t in jnp.split(self.b_to_qkv(txt), 3, axis=-1))
        q = jnp.concatenate([self.norm_q_b(qb), self.norm_q_a(qa)], axis=1)
        k = jnp.concatenate([self.norm_k_b(kb), self.norm_k_a(ka)], axis=1)
        v = jnp.concatenate([vb, va], axis=1)
        out = _attend(q, k, v, cos, sin, self.attention_impl)
        lt = txt.shape[1]
        return self.a_to_out(out[:, lt:]), self.b_to_out(out[:, :lt])


class DoubleStreamBlock(nnx.Module):
    """MM-DiT block: separate weights per stream, joint attention. ``blocks[i]`` in DiffSynth."""

    def __init__(self, cfg: FluxDiTConfig, *, rngs: nnx.Rngs):
        self.eps = cfg.eps
        self.norm1_a = AdaLNModulation(cfg.hidden_size, 6, cfg=cfg, rngs=rngs)
        self.norm1_b = AdaLNModulation(cfg.hidden_size, 6, cfg=cfg, rngs=rngs)
        self.attn = JointAttention(cfg, rngs=rngs)
        self.ff_a = _gelu_ff(cfg.hidden_size, cfg.mlp_dim, cfg, rngs)
        self.ff_b = _gelu_ff(cfg.hidden_size, cfg.mlp_dim, cfg, rngs)

    def __call__(
        self, img: jax.Array, txt: jax.Array, temb: jax.Array, cos: jax.Array, sin: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """img [B, Li, D], txt [B, Lt, D], temb [B, D] -> updated (img, txt)."""
        sh_a, sc_a, g_a, sh2_a, sc2_a, g2_a = self.norm1_a(temb)
        sh_b, sc_b, g_b, sh2_b, sc2_b, g2_b = self.norm1_b(temb)
        attn_a, attn_b = self.attn(
            modulate(layer_norm(img, self.eps), sh_a, sc_a), modulate(layer_norm(txt, self.eps), sh_b, sc_b), cos, sin
        )
        img = img + g_a[:, None] * attn_a
        img = img + g2_a[:, None] * _apply_ff(self.ff_a, modulate(layer_norm(img, self.eps), sh2_a, sc2_a))
        txt = txt + g_b[:, None] * attn_b
        txt = txt + g2_b[:, None] * _apply_ff(self.ff_b, modulate(layer_norm(txt, self.eps), sh2_b, sc2_b))
        return constrain(img, ACT), constrain(txt, ACT)


class SingleStreamBlock(nnx.Module):
    """Parallel attention + MLP block over ``[text; image]``. ``single_blocks[j]`` in DiffSynth."""

    def __init__(self, cfg: FluxDiTConfig, *, rngs: nnx.Rngs):
        d, kw = cfg.hidden_size, dict(param_dtype=cfg.param_dtype, dtype=cfg.dtype, rngs=rngs)
        self.eps, self.head_dim, self.hidden = cfg.eps, cfg.head_dim, d
        self.attention_impl = cfg.attention_impl
        self.norm = AdaLNModulation(d, 3, cfg=cfg, rngs=rngs)
        self.to_qkv_mlp = Linear(d, 3 * d + cfg.mlp_dim, axes=("embed", "mlp"), **kw)
        nkw = dict(eps=cfg.eps, param_dtype=cfg.param_dtype, rngs=rngs)
        self.norm_q_a, self.norm_k_a = RMSNorm(cfg.head_dim, **nkw), RMSNorm(cfg.head_dim, **nkw)
        self.proj_out = Linear(d + cfg.mlp_dim, d, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array, temb: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """x [B, Lt+Li, D] (text first), temb [B, D] -> same shape."""
        shift, scale, gate = self.norm(temb)
        h = self.to_qkv_mlp(modulate(layer_norm(x, self.eps), shift, scale))
        d = self.hidden
        q, k, v = (split_heads(h[..., i * d : (i + 1) * d], self.head_dim) for i in range(3))
        mlp = constrain(jax.nn.gelu(h[..., 3 * d :], approximate=True), ("batch", "length", "act_mlp"))
        attn = _attend(self.norm_q_a(q), self.norm_k_a(k), v, cos, sin, self.attention_impl)
        out = self.proj_out(jnp.concatenate([attn, mlp], axis=-1))
        return constrain(x + gate[:, None] * out, ACT)
