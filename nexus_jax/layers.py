"""Shared building blocks in flax.nnx with logical axis names on every parameter.

Conventions: Linear kernels are stored ``[in, out]`` (torch stores ``[out, in]``); ``param_dtype`` is the storage
dtype, ``dtype`` the compute dtype (None = same as the inputs' promotion with the params).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs.qwen2_5 import ATTENTION_IMPLS
from nexus_jax import sharding

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
    """Interleaved-pair RoPE (BFL/FLUX convention), arithmetic in fp32. x [..., D]; cos/sin [..., D/2] broadcastable.

    The pair split / re-interleave runs in x's dtype and only the arithmetic in fp32 (same values): the [..., D/2, 2]
    views are what XLA:TPU materialises, so in bf16 they cost half the bytes (docs/launch.md, "Decoder training")."""
    xr = x.reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xr[..., 0].astype(jnp.float32), xr[..., 1].astype(jnp.float32)
    out = jnp.stack([(x0 * cos - x1 * sin).astype(x.dtype), (x0 * sin + x1 * cos).astype(x.dtype)], axis=-1)
    return out.reshape(x.shape)


@jax.custom_vjp
def softmax(x: jax.Array) -> jax.Array:
    """Softmax over the last axis (the forward of ``jax.nn.softmax``) whose backward reduces ``sum(g * y)`` with a
    dot. x [..., K] -> same shape.

    Why: XLA:CPU's YNNPACK fusion of a two-operand multiply + reduce (``jax.nn.softmax``'s VJP) runs ~15x slower than
    the same reduction as a dot (attention scores [4, 768, 256]: 3.3 ms vs 0.2 ms on one core), and it was the largest
    single cost of the tiny AR train step. Same math: dx = y * (g - sum(g * y)).
    """
    return _softmax_fwd(x)[0]


def _softmax_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    unnormalized = jnp.exp(x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True)))
    y = unnormalized / jnp.sum(unnormalized, axis=-1, keepdims=True)
    return y, y


def _softmax_bwd(y: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    gy = jnp.einsum("...k,...k->...", g, y, preferred_element_type=jnp.float32)[..., None].astype(y.dtype)
    return (y * (g - gy),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SegmentMask:
    """Structured self-attention mask: query i sees key j iff ``segment_ids[b, i] == segment_ids[b, j]`` (and j <= i
    when ``causal``). segment_ids [B, L] int. Every row sees at least itself. The splash kernel takes this form (it
    cannot take a dense mask); the other implementations expand it with :meth:`dense`."""

    segment_ids: jax.Array
    causal: bool = dataclasses.field(default=False, metadata=dict(static=True))

    def dense(self) -> jax.Array:
        """[B, 1, L, L] bool (True = attend)."""
        seg = self.segment_ids
        mask = (seg[:, :, None] == seg[:, None, :])[:, None]
        if self.causal:
            length = seg.shape[1]
            mask = mask & jnp.tril(jnp.ones((length, length), bool))
        return mask


def resolve_attention_impl(impl: str, mask: object = None, platform: str | None = None) -> str:
    """The concrete implementation for a config value (one of ``ATTENTION_IMPLS``).

    "auto" = "splash" on TPU when the mask is None or a :class:`SegmentMask`, else "jax_nn". "xla" is this module's
    einsum reference, "jax_nn" is ``jax.nn.dot_product_attention`` (XLA lowering), "splash" the Pallas TPU kernel
    (interpreted, i.e. slow but exact, off TPU). ``platform`` (default: the default backend) is where the program
    runs, e.g. "tpu" when planning a TPU job from a CPU host.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r} is not one of {ATTENTION_IMPLS}")
    if impl != "auto":
        return impl
    on_tpu = (platform or jax.default_backend()) == "tpu"
    return "splash" if on_tpu and (mask is None or isinstance(mask, SegmentMask)) else "jax_nn"


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                  scale: float | None = None) -> jax.Array:
    """The reference: grouped-query einsum attention with an fp32 softmax; fully masked rows return zeros.

    q [B, Lq, Hq, D]; k, v [B, Lk, Hkv, D] with Hq % Hkv == 0; mask broadcastable to [B, Hq, Lq, Lk] (True = attend).
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
    probs = softmax(logits)
    if mask is not None:
        probs = jnp.where(m, probs, 0.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v)
    return out.reshape(b, lq, hq, d)


def jax_nn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                     scale: float | None = None) -> jax.Array:
    """``jax.nn.dot_product_attention`` (GQA native, XLA lowering). Shapes as :func:`xla_attention`; a fully masked
    row averages all values (as Qwen2's ``grouped_query_attention``), it is not zeroed."""
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=None)


# Splash kernel tiles (query and key blocks, forward and backward), largest first. Sequences are padded to a multiple
# of the tile (padding tokens get their own segment, so they never mix with real ones) and the output is cut back.
# Larger tiles stream K / V (forward, dq) and Q / dO (dkv) fewer times: HBM traffic ~ L^2 / tile (MaxText's splash
# default is 512 for every block size). 384 (any multiple of 128 is a valid block) pads less where L is just above a
# multiple of 384: the 1105 tokens of a 512x512 decoder image pad to 1152 (9 tiles) instead of 1280 (25 of 256).
SPLASH_BLOCKS = (512, 384, 256, 128)
SPLASH_MAX_EXTRA_WORK = 1.25  # a larger tile may compute at most this x the tile area of the smallest tile


def splash_tiles(length: int, block: int, causal: bool) -> int:
    """(q block, kv block) tiles splash computes for one head of one sequence of ``length`` tokens (padded up to a
    multiple of ``block``): all of them, or with ``causal`` those on or below the diagonal."""
    if length < 1 or block < 1:
        raise ValueError(f"length and block must be >= 1, got length={length} block={block}")
    n = -(-length // block)
    return n * (n + 1) // 2 if causal else n * n


def splash_block(length: int, causal: bool = False) -> int:
    """The splash tile for ``length`` tokens: the largest of :data:`SPLASH_BLOCKS` whose computed tiles (padding,
    and for ``causal`` the upper half of the diagonal tiles) cover at most :data:`SPLASH_MAX_EXTRA_WORK` x the
    area the smallest tile computes (full: 4096 -> 512, 1105 -> 384, 300 -> 384, 200 -> 256; causal: 4096 -> 512,
    1105 -> 384, 256 -> 128)."""
    def area(block: int) -> int:  # token pairs in the computed tiles
        return splash_tiles(length, block, causal) * block * block

    least = area(SPLASH_BLOCKS[-1])
    for block in SPLASH_BLOCKS:
        if area(block) <= SPLASH_MAX_EXTRA_WORK * least:
            return block
    return SPLASH_BLOCKS[-1]


def _splash_kernel(length: int, block: int, heads: int, causal: bool, interpret: bool):
    """The kernel for one (padded) length, tile and head count; built per trace (its mask tables are arrays of that
    trace, so it is not cached across traces)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    one = sm.CausalMask((length, length)) if causal else sm.FullMask((length, length))
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = sk.make_splash_mha(sm.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)
    return kernel, sk.SegmentIds


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: SegmentMask | None = None,
                     scale: float | None = None, interpret: bool | None = None) -> jax.Array:
    """Pallas splash attention (``jax.experimental.pallas.ops.tpu``), self-attention only (Lq == Lk).

    q [B, L, Hq, D]; k, v [B, L, Hkv, D] (GQA native); mask None (full) or a :class:`SegmentMask` (causal and / or
    segments; a dense mask cannot be given). L is padded to a multiple of its tile (:func:`splash_block`). ``interpret``
    (default: unless the backend or the active sharding context's mesh is TPU) runs the kernel in the Pallas
    interpreter; False forces the Mosaic TPU kernel. Under a multi-device :func:`sharding.sharding_context` the kernel
    runs per shard (``shard_map``: batch over the "batch" rule, heads over "act_heads" when the kv heads split the
    same way, else replicated); Mosaic calls cannot be partitioned automatically. Returns [B, L, Hq, D].
    """
    if mask is not None and not isinstance(mask, SegmentMask):
        raise ValueError("splash attention takes mask=None or a layers.SegmentMask, not a dense mask array")
    b, length, hq, d = q.shape
    if k.shape[1] != length:
        raise ValueError(f"splash attention is self-attention only: {length} queries but {k.shape[1]} keys")
    if hq % k.shape[2]:
        raise ValueError(f"query heads {hq} not divisible by kv heads {k.shape[2]}")
    causal = bool(mask is not None and mask.causal)
    if interpret is None:  # interpreted unless the target is a TPU (a TPU backend or a TPU-topology mesh, AOT)
        ctx = sharding.current()
        platform = ctx[0].devices.flat[0].platform if ctx is not None else jax.default_backend()
        interpret = platform != "tpu"
    scale = d**-0.5 if scale is None else scale
    seg = jnp.zeros((b, length), jnp.int32) if mask is None else mask.segment_ids.astype(jnp.int32)
    local = functools.partial(_splash_local, causal=causal, scale=scale, interpret=interpret,
                              segments=mask is not None)
    ctx = sharding.current()
    if ctx is None or ctx[0].size == 1:
        return local(q, k, v, seg)
    mesh, rules = ctx
    qs = sharding.logical_to_spec(("batch", None, "act_heads", None), rules, q.shape, mesh)
    ks = sharding.logical_to_spec(("batch", None, "act_kv_heads", None), rules, k.shape, mesh)
    if qs[2] != ks[2]:  # GQA groups must stay whole on a shard
        qs, ks = P(qs[0], None, None, None), P(ks[0], None, None, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(qs, ks, ks, P(qs[0], None)), out_specs=qs,
                         check_vma=False)(q, k, v, seg)


def _splash_local(q, k, v, seg, *, causal: bool, scale: float, interpret: bool, segments: bool) -> jax.Array:
    """:func:`splash_attention` on one shard: pad L, heads first, vmap the kernel over the batch, cut back."""
    b, length, hq, _ = q.shape
    block = splash_block(length, causal)
    padded = -(-length // block) * block
    extra = padded - length
    if extra:  # padding tokens form their own segment
        seg = jnp.concatenate([seg, jnp.full((b, extra), jnp.iinfo(jnp.int32).min, jnp.int32)], axis=1)
    kernel, segment_ids_cls = _splash_kernel(padded, block, hq, causal, interpret)

    def heads_first(x):  # [B, L, H, D] -> [B, H, padded, D]
        return jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    qh = heads_first((q.astype(jnp.float32) * scale).astype(q.dtype))
    if not (segments or extra):
        out = jax.vmap(kernel)(qh, heads_first(k), heads_first(v))
    else:
        out = jax.vmap(lambda a, b_, c, s: kernel(a, b_, c, segment_ids=segment_ids_cls(q=s, kv=s)))(
            qh, heads_first(k), heads_first(v), seg)
    return out.transpose(0, 2, 1, 3)[:, :length]


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | SegmentMask | None = None,
    scale: float | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Grouped-query attention with an fp32 softmax, by implementation ``impl`` (see :func:`resolve_attention_impl`).

    q [B, Lq, Hq, D]; k, v [B, Lk, Hkv, D] with Hq % Hkv == 0; mask broadcastable to [B, Hq, Lq, Lk] (True = attend)
    or a :class:`SegmentMask`. Returns [B, Lq, Hq, D] in q's dtype. Rows with no allowed key return zeros.
    """
    impl = resolve_attention_impl(impl, mask)
    if impl == "splash":
        return splash_attention(q, k, v, mask, scale)
    if isinstance(mask, SegmentMask):
        mask = mask.dense()
    if impl == "xla":
        return xla_attention(q, k, v, mask, scale)
    out = jax_nn_attention(q, k, v, mask, scale)
    if mask is not None:  # zero the rows with no visible key, as xla_attention does
        mask = jnp.asarray(mask, bool)
        seen = jnp.any(mask.reshape((1,) * (4 - mask.ndim) + mask.shape), axis=-1)  # [B?, H?, Lq]
        out = jnp.where(jnp.swapaxes(seen, 1, 2)[..., None], out, 0).astype(out.dtype)
    return out
