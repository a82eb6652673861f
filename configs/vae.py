"""FLUX VAE configuration (diffusers ``AutoencoderKL`` in FLUX's layout)."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class FluxVAEConfig:
    """FLUX autoencoder hyper-parameters.

    ``block_out_channels[i]`` is the width of encoder level i (decoder levels run in reverse); every level but the
    last halves (encoder) or doubles (decoder) the spatial size, so the down-sampling factor is
    ``2 ** (len(block_out_channels) - 1)`` (8 for FLUX).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 16
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    mid_block_add_attention: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        if not self.block_out_channels:
            raise ValueError("block_out_channels must name at least one level, got ()")
        for c in self.block_out_channels:
            if c <= 0 or c % self.norm_num_groups:
                groups = self.norm_num_groups
                raise ValueError(
                    f"block_out_channels entry {c} must be a positive multiple of norm_num_groups={groups}"
                )
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1, got {self.layers_per_block}")
        if self.latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {self.latent_channels}")
        if self.scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be > 0, got {self.scaling_factor}")

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each spatial axis."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def full(cls, **overrides: Any) -> FluxVAEConfig:
        """FLUX.1 ``ae.safetensors`` (about 84M parameters)."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> FluxVAEConfig:
        """About 0.2M parameters with FLUX's structure (4 levels, x8, 16 latents, mid attention) for tests."""
        base: dict[str, Any] = dict(block_out_channels=(8, 16, 24, 24), layers_per_block=2, norm_num_groups=4)
        return cls(**{**base, **overrides})

    def diffusers_kwargs(self) -> dict[str, Any]:
        """Keyword arguments building the equivalent ``diffusers.AutoencoderKL``."""
        n = len(self.block_out_channels)
        return dict(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            latent_channels=self.latent_channels,
            norm_num_groups=self.norm_num_groups,
            scaling_factor=self.scaling_factor,
            shift_factor=self.shift_factor,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=self.mid_block_add_attention,
        )
