"""UniPic-1 per-token diffusion head (MAR ``DiffLoss`` / ``SimpleMLPAdaLN``) and its IDDPM Gaussian diffusion."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

NOISE_SCHEDULES = ("cosine", "linear")


@dataclasses.dataclass(frozen=True)
class DiffusionHeadConfig:
    """``SimpleMLPAdaLN(in_channels, model_channels=width, out_channels, z_channels, num_res_blocks=depth)``.

    ``out_channels`` is ``2 * in_channels`` with a learned (LEARNED_RANGE) variance: eps then the variance
    interpolation values; ``in_channels`` without. ``time_dim`` is the sinusoid width of the timestep embedder.
    """

    in_channels: int = 16
    width: int = 1536
    out_channels: int = 32
    z_channels: int = 1280
    depth: int = 12
    time_dim: int = 256
    layer_norm_eps: float = 1e-6
    param_dtype: Any = jnp.float32
    dtype: Any = None  # compute dtype; None = follow inputs/params

    def __post_init__(self) -> None:
        for name in ("in_channels", "width", "z_channels", "depth", "time_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DiffusionHeadConfig.{name} must be positive, got {getattr(self, name)}")
        if self.out_channels not in (self.in_channels, 2 * self.in_channels):
            raise ValueError(f"DiffusionHeadConfig.out_channels {self.out_channels} must be in_channels "
                             f"({self.in_channels}, fixed variance) or 2 * in_channels (learned variance)")
        if self.time_dim % 2:
            raise ValueError(f"DiffusionHeadConfig.time_dim must be even, got {self.time_dim}")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"DiffusionHeadConfig.layer_norm_eps must be positive, got {self.layer_norm_eps}")

    @property
    def learn_sigma(self) -> bool:
        return self.out_channels == 2 * self.in_channels

    @classmethod
    def full(cls, **overrides: Any) -> DiffusionHeadConfig:
        """UniPic-1 / MAR-Huge head: 16 latent channels, width 1536, 12 blocks, condition width 1280 (151.2 M)."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> DiffusionHeadConfig:
        """Test size: 4 channels, odd width 33, 2 blocks, condition width 48, 32-d sinusoid."""
        kw: dict[str, Any] = dict(in_channels=4, width=33, out_channels=8, z_channels=48, depth=2, time_dim=32)
        kw.update(overrides)
        return cls(**kw)


@dataclasses.dataclass(frozen=True)
class GaussianDiffusionConfig:
    """IDDPM settings of ``create_diffusion(timestep_respacing, noise_schedule="cosine")`` in UniPic-1.

    ``max_beta`` caps every beta (UniPic's ``betas_for_alpha_bar`` default 0.2; upstream MAR uses 0.999).
    ``sampling_steps`` is the IDDPM respacing string used for sampling ("100": 100 evenly spaced steps); training
    uses all ``num_timesteps``. ``learn_sigma``: LEARNED_RANGE variance (else FIXED_LARGE). ``diffusion_batch_mul``
    repeats each training token with independent timesteps and noise.
    """

    num_timesteps: int = 1000
    noise_schedule: str = "cosine"
    max_beta: float = 0.2
    sampling_steps: str = "100"
    learn_sigma: bool = True
    diffusion_batch_mul: int = 4

    def __post_init__(self) -> None:
        if self.num_timesteps < 1:
            raise ValueError(f"GaussianDiffusionConfig.num_timesteps must be >= 1, got {self.num_timesteps}")
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"noise_schedule={self.noise_schedule!r} is not one of {NOISE_SCHEDULES}")
        if not 0.0 < self.max_beta <= 1.0:
            raise ValueError(f"GaussianDiffusionConfig.max_beta must be in (0, 1], got {self.max_beta}")
        if self.diffusion_batch_mul < 1:
            raise ValueError(f"diffusion_batch_mul must be >= 1, got {self.diffusion_batch_mul}")

    @classmethod
    def full(cls, **overrides: Any) -> GaussianDiffusionConfig:
        """UniPic-1: 1000-step cosine schedule capped at 0.2, 100 sampling steps, learned-range variance."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> GaussianDiffusionConfig:
        """Test size: 1000 training steps as upstream (the tables are cheap), 10 sampling steps, batch mul 2."""
        kw: dict[str, Any] = dict(sampling_steps="10", diffusion_batch_mul=2)
        kw.update(overrides)
        return cls(**kw)
