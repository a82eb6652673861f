"""Qwen2.5-VL vision tower in flax.nnx: patch embed (matmul), 2-D rotary, window/full attention blocks, merger.

Input is a packed sequence of patches of several images (``pixel_values`` [Np, C*T*P*P] in the processor's order)
plus the host-computed :class:`~nexus_jax.models.qwen2_5_vl.vision_layout.VisionLayout` arrays. Window-attention
blocks attend inside padded windows ``[Wn, S]``; full-attention blocks attend within each frame, through a dense
segment mask or (cheaper for many images) padded frame groups ``[F, Sf]``. Images never attend to each other.
Output: merged image features [Mp, out_hidden_size] in the processor's (merge-block raster) order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.qwen2_5_vl import Qwen25VisionConfig
from nexus_jax import layers
from nexus_jax.models.qwen2_5_vl.vision_layout import VisionLayout, vision_layout
from nexus_jax.sharding import constrain


def vision_rotary(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """2-D rotary tables. positions [N, 2] (row, col) -> cos, sin [N, head_dim] (fp32, rotate-half layout)."""
    quarter = head_dim // 4
    inv_freq = 1.0 / (theta ** (jnp.arange(0, 2 * quarter, 2, dtype=jnp.float32) / (2 * quarter)))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [N, 2, quarter]
    freqs = freqs.reshape(positions.shape[0], 2 * quarter)
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


class PatchEmbed(nnx.Module):
    """Conv3d with kernel = stride = (T, P, P) as one matmul. x [N, C*T*P*P] -> [N, hidden]."""

    def __init__(self, config: Qwen25VisionConfig, *, param_dtype=jnp.float32, dtype=None, rngs: nnx.Rngs):
        self.proj = layers.Linear(
            config.patch_dim, config.hidden_size, axes=("conv_in", "embed"), use_bias=False,
            param_dtype=param_dtype, dtype=dtype, rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(x)


class FusedQKV(nnx.Module):
    """Parameters of the fused q/k/v projection: kernel [hidden, 3, hidden], bias [3, hidden] (q, k, v order)."""

    def __init__(self, dim: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.kernel = layers.make_param(rngs, init, (dim, 3, dim), ("embed", None, "heads"), param_dtype)
        self.bias = layers.make_param(rngs, nnx.initializers.zeros_init(), (3, dim), (None, "heads"), param_dtype)


class VisionAttention(nnx.Module):
    """Fused-qkv multi-head attention with 2-D rotary. ``qkv.kernel`` [hidden, 3, hidden], ``qkv.bias`` [3, hidden]."""

    def __init__(self, config: Qwen25VisionConfig, *, param_dtype=jnp.float32, dtype=None, rngs: nnx.Rngs):
        d = config.hidden_size
        self.num_heads, self.head_dim, self.dtype = config.num_heads, config.head_dim, dtype
        self.attention_impl = config.attention_impl
        self.qkv = FusedQKV(d, param_dtype=param_dtype, rngs=rngs)
        self.proj = layers.Linear(d, d, axes=("heads", "embed"), param_dtype=param_dtype, dtype=dtype, rngs=rngs)

    def qkv_heads(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [N, hidden] -> rotated q, k and v, each [N, heads, head_dim]."""
        dtype = self.dtype or jnp.result_type(x.dtype, self.qkv.kernel.dtype)
        qkv = jnp.einsum("nd,dje->nje", x.astype(dtype), self.qkv.kernel[...].astype(dtype))
        qkv = qkv + self.qkv.bias[...].astype(dtype)
        qkv = qkv.reshape(x.shape[0], 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        cos, sin = cos[:, None, :], sin[:, None, :]
        q = layers.apply_rotary_half(q.astype(jnp.float32), cos, sin).astype(dtype)
        k = layers.apply_rotary_half(k.astype(jnp.float32), cos, sin).astype(dtype)
        heads = ("length", "act_heads", None)
        return constrain(q, heads), constrain(k, heads), constrain(v, heads)

    def dense(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segments: jax.Array) -> jax.Array:
        """Attention within each segment id (dense [N, N] mask). x [N, hidden], segments [N] -> [N, hidden]."""
        q, k, v = self.qkv_heads(x, cos, sin)
        mask = layers.SegmentMask(segments[None].astype(jnp.int32))
        out = layers.dot_product_attention(q[None], k[None], v[None], mask=mask, impl=self.attention_impl)[0]
        return self.proj(out.reshape(x.shape[0], -1))

    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, gather: jax.Array, valid: jax.Array, scatter: jax.Array
    ) -> jax.Array:
        """Attention within padded token groups (windows or frames). gather/valid [G, S], scatter [N].

        x [N, hidden] -> [N, hidden]; token n reads its output from flat slot scatter[n] of [G * S].
        """
        q, k, v = self.qkv_heads(x, cos, sin)
        if layers.resolve_attention_impl(self.attention_impl) == "splash":
            # the kernel over the packed sequence with one segment id per group (groups are contiguous runs, so
            # off-diagonal blocks are skipped); padding tokens (in no group) get segment -1
            groups = jnp.broadcast_to(jnp.arange(gather.shape[0], dtype=jnp.int32)[:, None], gather.shape)
            seg = jnp.full((x.shape[0],), -1, jnp.int32).at[jnp.where(valid, gather, x.shape[0])].set(
                groups, mode="drop")
            out = layers.splash_attention(q[None], k[None], v[None], layers.SegmentMask(seg[None]))[0]
            return self.proj(out.reshape(x.shape[0], -1))
        q, k, v = (jnp.take(t, gather, axis=0) for t in (q, k, v))  # [Wn, S, H, D]
        mask = valid[:, None, None, :]
        out = layers.dot_product_attention(q, k, v, mask=mask, impl=self.attention_impl)
        out = jnp.take(out.reshape(-1, self.num_heads, self.head_dim), scatter, axis=0)
        return self.proj(out.reshape(x.shape[0], -1))


class VisionMLP(nnx.Module):
    """SwiGLU with biases: down(silu(gate(x)) * up(x)). x [N, hidden] -> [N, hidden]."""

    def __init__(self, config: Qwen25VisionConfig, *, param_dtype=jnp.float32, dtype=None, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.gate_proj = layers.Linear(d, f, axes=("embed", "mlp"), **kw)
        self.up_proj = layers.Linear(d, f, axes=("embed", "mlp"), **kw)
        self.down_proj = layers.Linear(f, d, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(constrain(h, ("length", "act_mlp")))


class VisionBlock(nnx.Module):
    """Pre-norm block: x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(
        self, config: Qwen25VisionConfig, full_attention: bool, *, param_dtype=jnp.float32, dtype=None,
        rngs: nnx.Rngs,
    ):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.full_attention = full_attention
        self.norm1 = layers.RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = layers.RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.attn = VisionAttention(config, **kw)
        self.mlp = VisionMLP(config, **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, idx: dict[str, jax.Array]) -> jax.Array:
        h = self.norm1(x)
        if self.full_attention and "frame_gather" not in idx:
            h = self.attn.dense(h, cos, sin, idx["frame_segments"])
        else:
            group = "frame" if self.full_attention else "window"
            h = self.attn(h, cos, sin, idx[f"{group}_gather"], idx[f"{group}_valid"], idx[f"{group}_scatter"])
        x = constrain(x + h, ("length", "act_embed"))
        return constrain(x + self.mlp(self.norm2(x)), ("length", "act_embed"))


class PatchMerger(nnx.Module):
    """RMSNorm, group merge_unit consecutive tokens, Linear -> GELU(erf) -> Linear. [N, hidden] -> [N/4, out]."""

    def __init__(self, config: Qwen25VisionConfig, *, param_dtype=jnp.float32, dtype=None, rngs: nnx.Rngs):
        wide = config.hidden_size * config.merge_unit
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.ln_q = layers.RMSNorm(config.hidden_size, eps=1e-6, param_dtype=param_dtype, rngs=rngs)
        self.mlp_0 = layers.Linear(wide, wide, axes=("embed", "mlp"), **kw)
        self.mlp_2 = layers.Linear(wide, config.out_hidden_size, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.ln_q(x).reshape(-1, self.mlp_0.in_features)
        h = jax.nn.gelu(self.mlp_0(x), approximate=False)
        return self.mlp_2(constrain(h, ("length", "act_mlp")))


class Qwen25VisionTransformer(nnx.Module):
    """The Qwen2.5-VL ViT (HF ``visual``). See the module docstring for the input layout."""

    def __init__(
        self, config: Qwen25VisionConfig, *, param_dtype=jnp.float32, dtype=None, rngs: nnx.Rngs
    ):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.config = config
        self.patch_embed = PatchEmbed(config, **kw)
        full = set(config.fullatt_block_indexes)
        self.blocks = nnx.List([VisionBlock(config, i in full, **kw) for i in range(config.depth)])
        self.merger = PatchMerger(config, **kw)

    def __call__(
        self,
        pixel_values: jax.Array,
        *,
        patch_order: jax.Array,
        positions: jax.Array,
        frame_segments: jax.Array,
        window_gather: jax.Array,
        window_valid: jax.Array,
        window_scatter: jax.Array,
        merge_reverse: jax.Array,
        frame_gather: jax.Array | None = None,
        frame_valid: jax.Array | None = None,
        frame_scatter: jax.Array | None = None,
    ) -> jax.Array:
        """pixel_values [Np, patch_dim] (processor order, padded to the layout) -> features [Np/4, out_hidden].

        Full-attention blocks use the frame groups when ``frame_gather`` etc. are given, else the dense
        ``frame_segments`` mask (same result).
        """
        if pixel_values.ndim != 2 or pixel_values.shape[1] != self.config.patch_dim:
            raise ValueError(
                f"pixel_values must be [num_patches, {self.config.patch_dim}], got {tuple(pixel_values.shape)}"
            )
        if pixel_values.shape[0] != patch_order.shape[0]:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[0]} patches but the layout expects {patch_order.shape[0]}"
            )
        x = jnp.take(pixel_values, patch_order, axis=0)
        x = constrain(self.patch_embed(x), ("length", "act_embed"))
        cos, sin = vision_rotary(positions, self.config.head_dim, self.config.rope_theta)
        idx = dict(
            frame_segments=frame_segments, window_gather=window_gather, window_valid=window_valid,
            window_scatter=window_scatter,
        )
        if frame_gather is not None:
            idx.update(frame_gather=frame_gather, frame_valid=frame_valid, frame_scatter=frame_scatter)
        for block in self.blocks:
            x = block(x, cos, sin, idx)
        merged = self.merger(x)
        return jnp.take(merged, merge_reverse, axis=0)

    def encode(
        self, pixel_values: np.ndarray | jax.Array, grid_thw: np.ndarray, *, frame_groups: bool = True,
        **pad_multiples: int,
    ) -> jax.Array:
        """Compute the layout on the host (``pad_multiples``: see vision_layout), pad, run the jitted forward.

        -> [num_merged, out_hidden].
        """
        layout = vision_layout(grid_thw, self.config, **pad_multiples)
        pixels = pad_pixels(pixel_values, layout)
        graphdef, state = nnx.split(self)
        arrays = {k: jnp.asarray(v) for k, v in layout.arrays(frame_groups).items()}
        return _jitted_forward(graphdef, state, pixels, arrays)[: layout.num_merged]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _jitted_forward(graphdef, state, pixel_values, arrays):
    return nnx.merge(graphdef, state)(pixel_values, **arrays)


def pad_pixels(pixel_values: np.ndarray | jax.Array, layout: VisionLayout) -> jax.Array:
    """Zero-pad pixel_values [num_patches, D] to the layout's padded patch count; checks the count."""
    n = pixel_values.shape[0]
    if n != layout.num_patches:
        raise ValueError(
            f"pixel_values has {n} patches but grid_thw describes {layout.num_patches}; they must match"
        )
    extra = layout.patch_order.shape[0] - n
    return jnp.pad(jnp.asarray(pixel_values), ((0, extra), (0, 0)))
