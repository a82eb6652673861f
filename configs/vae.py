"""LDM ``AutoencoderKL`` configuration: the FLUX VAE (diffusers layout) and MAR / UniPic-1's KL-16 VAE."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class FluxVAEConfig:
    """LDM autoencoder hyper-parameters (FLUX by default; :meth:`kl16` for MAR / UniPic-1).

    ``block_out_channels[i]`` is the width of encoder level i (decoder levels run in reverse); every level but the
    last halves (encoder) or doubles (decoder) the spatial size, so the down-sampling factor is
    ``2 ** (len(block_out_channels) - 1)`` (8 for FLUX, 16 for KL-16).

    ``encoder_attention_levels`` / ``decoder_attention_levels``: level indices (0 = full resolution, the LDM
    ``down.i`` / ``up.i`` numbering; diffusers decoder ``up_blocks.{n-1-i}``) whose every resnet is followed by a
    single-head self-attention (diffusers ``AttnDownEncoderBlock2D`` / ``AttnUpDecoderBlock2D``).
    ``use_quant_conv``: 1x1 ``quant_conv`` (2L -> 2L) on the encoder moments and ``post_quant_conv`` (L -> L) before
    the decoder. Model latents are ``(raw - shift_factor) * scaling_factor``.
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
    encoder_attention_levels: tuple[int, ...] = ()
    decoder_attention_levels: tuple[int, ...] = ()
    use_quant_conv: bool = False
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
        n = len(self.block_out_channels)
        for name in ("encoder_attention_levels", "decoder_attention_levels"):
            levels = getattr(self, name)
            if len(set(levels)) != len(levels) or any(not 0 <= i < n for i in levels):
                raise ValueError(f"{name} must be distinct level indices in [0, {n}), got {levels}")

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

    @classmethod
    def kl16(cls, **overrides: Any) -> FluxVAEConfig:
        """MAR / Harmon / UniPic-1 ``kl16.ckpt`` (about 66.5M parameters): ch 128 x (1, 1, 2, 2, 4), x16, 16
        latents, attention in both mid blocks and after each resnet of the encoder's last level (LDM
        ``attn_resolutions=(16,)`` of ``resolution=256``; the decoder is built with none), quant convs, scale 0.2325."""
        base: dict[str, Any] = dict(
            block_out_channels=(128, 128, 256, 256, 512),
            layers_per_block=2,
            latent_channels=16,
            scaling_factor=0.2325,
            shift_factor=0.0,
            encoder_attention_levels=(4,),
            use_quant_conv=True,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def kl16_tiny(cls, **overrides: Any) -> FluxVAEConfig:
        """KL-16's structure (5 levels, x16, 16 latents, last-level encoder attention, quant convs), narrow."""
        base: dict[str, Any] = dict(block_out_channels=(8, 8, 16, 16, 32), norm_num_groups=4)
        return cls.kl16(**{**base, **overrides})

    def diffusers_kwargs(self) -> dict[str, Any]:
        """Keyword arguments building the equivalent ``diffusers.AutoencoderKL``."""
        n = len(self.block_out_channels)
        enc, dec = self.encoder_attention_levels, self.decoder_attention_levels
        return dict(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            down_block_types=tuple("AttnDownEncoderBlock2D" if i in enc else "DownEncoderBlock2D" for i in range(n)),
            up_block_types=tuple("AttnUpDecoderBlock2D" if n - 1 - j in dec else "UpDecoderBlock2D" for j in range(n)),
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            latent_channels=self.latent_channels,
            norm_num_groups=self.norm_num_groups,
            scaling_factor=self.scaling_factor,
            shift_factor=self.shift_factor,
            use_quant_conv=self.use_quant_conv,
            use_post_quant_conv=self.use_quant_conv,
            mid_block_add_attention=self.mid_block_add_attention,
        )


kl16 = FluxVAEConfig.kl16
kl16_tiny = FluxVAEConfig.kl16_tiny
