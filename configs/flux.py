"""FLUX.1 DiT configuration (DiffSynth ``FluxDiT`` layout, as fine-tuned by the Nexus-Gen decoders)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from configs.qwen2_5 import ATTENTION_IMPLS, REMAT_POLICIES


@dataclasses.dataclass(frozen=True)
class FluxDiTConfig:
    """Hyper-parameters of the FLUX.1 rectified-flow transformer.

    ``in_channels`` is the packed latent width (16 VAE channels x 2 x 2 patch = 64). ``rope_axes_dim`` splits the
    head dimension between the (t, row, col) position axes and must sum to ``head_dim``.
    """

    num_double_blocks: int = 19
    num_single_blocks: int = 38
    num_heads: int = 24
    head_dim: int = 128
    mlp_ratio: float = 4.0
    rope_axes_dim: tuple[int, ...] = (16, 56, 56)
    rope_theta: float = 10000.0
    in_channels: int = 64
    context_dim: int = 4096
    pooled_dim: int = 768
    timestep_dim: int = 256
    guidance_embed: bool = True
    eps: float = 1e-6
    param_dtype: Any = jnp.float32
    dtype: Any = None  # compute dtype; None = follow inputs/params
    remat: str = "none"  # per block: "none" | "full" | "dots" | "dots_no_batch" (as configs/qwen2_5.py)
    attention_impl: str = "auto"  # one of configs.qwen2_5.ATTENTION_IMPLS (auto = splash on TPU, else jax_nn)

    def __post_init__(self) -> None:
        if sum(self.rope_axes_dim) != self.head_dim:
            raise ValueError(f"rope_axes_dim {self.rope_axes_dim} sums to {sum(self.rope_axes_dim)}, not head_dim "
                             f"{self.head_dim}")
        if any(d % 2 for d in self.rope_axes_dim):
            raise ValueError(f"every rope axis dim must be even, got {self.rope_axes_dim}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} is not one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
        if self.in_channels % 4:
            raise ValueError(f"in_channels {self.in_channels} must be 4 x latent channels (2x2 packing)")

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def latent_channels(self) -> int:
        return self.in_channels // 4

    @classmethod
    def full(cls, **overrides: Any) -> FluxDiTConfig:
        """FLUX.1-dev: 19 double + 38 single blocks, width 3072 (24 x 128), guidance-distilled."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> FluxDiTConfig:
        """Test size: 3 heads (odd) x 16, width 48, 2 + 2 blocks, context 32, pooled 24."""
        kw: dict[str, Any] = dict(
            num_double_blocks=2,
            num_single_blocks=2,
            num_heads=3,
            head_dim=16,
            rope_axes_dim=(4, 6, 6),
            in_channels=64,
            context_dim=32,
            pooled_dim=24,
            timestep_dim=256,
        )
        kw.update(overrides)
        return cls(**kw)
