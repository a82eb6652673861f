"""Typed configs for the Qwen2.5 text decoder (Qwen2.5-VL language model and plain Qwen2.5)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

# remat policy names of every config (nexus_jax.layers.REMAT_POLICIES plus "none"), per decoder layer / block
REMAT_POLICIES: tuple[str, ...] = ("none", "full", "dots", "dots_no_batch")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
# attention implementations of every config (nexus_jax.layers.resolve_attention_impl; docs/attention.md):
# "auto" = Pallas splash kernel on TPU, jax.nn.dot_product_attention elsewhere; "xla" = the einsum reference.
ATTENTION_IMPLS: tuple[str, ...] = ("auto", "xla", "jax_nn", "splash")


@dataclasses.dataclass(frozen=True)
class Qwen2TextConfig:
    """Hyper-parameters of a Qwen2.5 decoder-only text model.

    ``mrope_section`` (t, h, w) splits the ``head_dim // 2`` rotary frequencies between the three M-RoPE position
    streams (Qwen2.5-VL); ``None`` means plain 1-D RoPE. ``param_dtype`` is the storage dtype, ``dtype`` the compute
    dtype. ``remat`` is one of :data:`REMAT_POLICIES` (per decoder layer). ``attention_impl`` is one of
    :data:`ATTENTION_IMPLS` (splash serves cache-free calls; KV-cache calls and "auto" off TPU use the
    einsum ``grouped_query_attention``).
    """

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    head_dim: int = 128
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    mrope_section: tuple[int, int, int] | None = (16, 24, 24)
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 128000
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    attention_impl: str = "auto"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.mrope_section is not None:
            if len(self.mrope_section) != 3:
                raise ValueError(f"mrope_section needs 3 entries (t, h, w), got {self.mrope_section}")
            if sum(self.mrope_section) != self.head_dim // 2:
                raise ValueError(
                    f"mrope_section {self.mrope_section} sums to {sum(self.mrope_section)}; "
                    f"it must sum to head_dim // 2 = {self.head_dim // 2}"
                )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} is not one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {DTYPES}")

    @property
    def jnp_param_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    @property
    def jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def q_size(self) -> int:
        """Width of the query projection: num_heads * head_dim."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of each of the key / value projections: num_kv_heads * head_dim."""
        return self.num_kv_heads * self.head_dim

    def replace(self, **changes) -> Qwen2TextConfig:
        return dataclasses.replace(self, **changes)


def qwen2_5_vl_7b() -> Qwen2TextConfig:
    """The Qwen2.5-VL-7B language model (Nexus-Gen's AR backbone)."""
    return Qwen2TextConfig()


def qwen2_5_1_5b() -> Qwen2TextConfig:
    """Plain Qwen2.5-1.5B: tied embeddings, 1-D RoPE."""
    return Qwen2TextConfig(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        head_dim=128,
        mrope_section=None,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
    )


def tiny(**overrides) -> Qwen2TextConfig:
    """A test-sized M-RoPE model with odd head counts (9 query / 3 KV heads of 16)."""
    base = Qwen2TextConfig(
        vocab_size=384,
        hidden_size=144,
        intermediate_size=200,
        num_layers=2,
        num_heads=9,
        num_kv_heads=3,
        head_dim=16,
        mrope_section=(2, 3, 3),
        max_position_embeddings=4096,
    )
    return base.replace(**overrides)


def bench(**overrides) -> Qwen2TextConfig:
    """Benchmark size: hidden 512, 8 layers, 8 query / 2 KV heads, vocab 32000."""
    base = Qwen2TextConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1376,
        num_layers=8,
        num_heads=8,
        num_kv_heads=2,
        head_dim=64,
        mrope_section=(8, 12, 12),
        max_position_embeddings=4096,
    )
    return base.replace(**overrides)
