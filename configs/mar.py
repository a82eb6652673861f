"""UniPic-1 MAR (masked autoregressive) encoder/decoder configuration (``mar_huge`` at img 512, vae stride 16)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from configs.qwen2_5 import REMAT_POLICIES


@dataclasses.dataclass(frozen=True)
class MARConfig:
    """Hyper-parameters of the MAR encoder/decoder and the MAR<->LLM projectors.

    ``seq_h x seq_w`` is the trained token grid (positional tables are sized for it and bilinearly resized for other
    grids). ``buffer_size`` buffer slots precede the image tokens in both encoder and decoder. ``llm_hidden`` is the
    LLM width the projectors ``proj_in``/``proj_out`` map to/from. ``proj_dropout`` (timm ``proj_drop``) applies only
    when a ``dropout_key`` is passed; upstream's attention-probability dropout is not implemented (inference is off).
    """

    token_embed_dim: int = 16
    width: int = 1280
    encoder_depth: int = 20
    decoder_depth: int = 20
    num_heads: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    buffer_size: int = 64
    seq_h: int = 32
    seq_w: int = 32
    num_classes: int = 1000
    llm_hidden: int = 1536
    proj_dropout: float = 0.0
    remat: str = "none"  # per block: "none" | "full" | "dots" | "dots_no_batch" (as configs/qwen2_5.py)
    param_dtype: Any = jnp.float32
    dtype: Any = None  # compute dtype; None = follow inputs/params

    def __post_init__(self) -> None:
        positive = ("token_embed_dim", "width", "encoder_depth", "decoder_depth", "num_heads", "seq_h", "seq_w",
                    "num_classes", "llm_hidden")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"MARConfig.{name} must be positive, got {getattr(self, name)}")
        if self.buffer_size < 0:
            raise ValueError(f"MARConfig.buffer_size must be >= 0, got {self.buffer_size}")
        if self.width % self.num_heads:
            raise ValueError(f"MARConfig.width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.mlp_ratio <= 0 or int(self.width * self.mlp_ratio) <= 0:
            raise ValueError(f"MARConfig.mlp_ratio must give a positive MLP width, got {self.mlp_ratio}")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"MARConfig.layer_norm_eps must be positive, got {self.layer_norm_eps}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"MARConfig.remat={self.remat!r} is not one of {REMAT_POLICIES}")
        if not 0.0 <= self.proj_dropout < 1.0:
            raise ValueError(f"MARConfig.proj_dropout must be in [0, 1), got {self.proj_dropout}")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def seq_len(self) -> int:
        """Image tokens of the trained grid."""
        return self.seq_h * self.seq_w

    @classmethod
    def full(cls, **overrides: Any) -> MARConfig:
        """``mar_huge`` as configured by UniPic-1: width 1280, 16 heads, 20 + 20 blocks, 64 buffers, 32x32 grid."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> MARConfig:
        """Test size: width 48 with 3 (odd) heads, 2 + 2 blocks, 4 buffers, 4x4 grid, 10 classes, LLM width 40."""
        small = dict(width=48, encoder_depth=2, decoder_depth=2, num_heads=3, buffer_size=4, seq_h=4, seq_w=4,
                     num_classes=10, llm_hidden=40)
        return cls(**(small | overrides))
