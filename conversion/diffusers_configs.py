"""diffusers ``config.json`` <-> typed configs: ``FluxTransformer2DModel`` <-> ``FluxDiTConfig`` and
``AutoencoderKL`` <-> ``FluxVAEConfig``. Export writes these beside diffusers-layout weights so
``from_pretrained`` loads the directory; import (``--config hf``) reads them, also from a pipeline root's
``transformer/`` / ``vae/``."""

from __future__ import annotations

from typing import Any

from conversion.errors import ConversionError

# FluxTransformer2DModel hard-codes these; a DiT that differs cannot be expressed as its config
_FLUX_FIXED = {"mlp_ratio": 4.0, "rope_theta": 10000.0, "timestep_dim": 256, "eps": 1e-6}


def _version() -> str:
    try:
        import diffusers

        return diffusers.__version__
    except ImportError:  # the config is plain JSON; diffusers is only needed to load it
        return "0.0.0"


def flux_to_diffusers(cfg: Any) -> dict[str, Any]:
    """``FluxTransformer2DModel`` config dict for a ``FluxDiTConfig``."""
    odd = {k: getattr(cfg, k) for k, v in _FLUX_FIXED.items() if getattr(cfg, k) != v}
    if odd:
        raise ConversionError(f"FluxTransformer2DModel fixes {_FLUX_FIXED}; this DiT config has {odd}")
    return {
        "_class_name": "FluxTransformer2DModel",
        "_diffusers_version": _version(),
        "patch_size": 1,
        "in_channels": cfg.in_channels,
        "out_channels": None,
        "num_layers": cfg.num_double_blocks,
        "num_single_layers": cfg.num_single_blocks,
        "attention_head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.context_dim,
        "pooled_projection_dim": cfg.pooled_dim,
        "guidance_embeds": cfg.guidance_embed,
        "axes_dims_rope": list(cfg.rope_axes_dim),
    }


def flux_from_diffusers(hf: dict[str, Any], shapes: dict | None = None) -> Any:
    """``FluxDiTConfig`` from a ``FluxTransformer2DModel`` config.json (diffusers' defaults for absent keys)."""
    from configs.flux import FluxDiTConfig

    if hf.get("patch_size", 1) != 1:
        raise ConversionError(f"FluxTransformer2DModel patch_size {hf['patch_size']} is not supported (only 1)")
    out = hf.get("out_channels")
    if out not in (None, hf.get("in_channels", 64)):
        raise ConversionError(f"out_channels {out} != in_channels {hf.get('in_channels', 64)} is not supported")
    return FluxDiTConfig(
        num_double_blocks=hf.get("num_layers", 19),
        num_single_blocks=hf.get("num_single_layers", 38),
        num_heads=hf.get("num_attention_heads", 24),
        head_dim=hf.get("attention_head_dim", 128),
        rope_axes_dim=tuple(hf.get("axes_dims_rope", (16, 56, 56))),
        in_channels=hf.get("in_channels", 64),
        context_dim=hf.get("joint_attention_dim", 4096),
        pooled_dim=hf.get("pooled_projection_dim", 768),
        guidance_embed=bool(hf.get("guidance_embeds", False)),
    )


def vae_to_diffusers(cfg: Any) -> dict[str, Any]:
    """``AutoencoderKL`` config dict for a ``FluxVAEConfig`` (lists for tuples, as diffusers writes them)."""
    if cfg.norm_eps != 1e-6:
        raise ConversionError(f"AutoencoderKL fixes its norm eps at 1e-6; this VAE config has {cfg.norm_eps}")
    kw = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.diffusers_kwargs().items()}
    return {"_class_name": "AutoencoderKL", "_diffusers_version": _version(), **kw}


def vae_from_diffusers(hf: dict[str, Any], shapes: dict | None = None) -> Any:
    """``FluxVAEConfig`` from an ``AutoencoderKL`` config.json."""
    from configs.vae import FluxVAEConfig

    down = list(hf.get("down_block_types", ["DownEncoderBlock2D"]))
    up = list(hf.get("up_block_types", ["UpDecoderBlock2D"]))
    n = len(down)
    bad = [t for t in down + up if t not in ("DownEncoderBlock2D", "AttnDownEncoderBlock2D", "UpDecoderBlock2D",
                                              "AttnUpDecoderBlock2D")]
    if bad or len(up) != n:
        raise ConversionError(f"AutoencoderKL block types {down} / {up} are not supported")
    if hf.get("act_fn", "silu") != "silu":
        raise ConversionError(f"AutoencoderKL act_fn {hf['act_fn']!r} is not supported (only silu)")
    quant = hf.get("use_quant_conv", True)
    if hf.get("use_post_quant_conv", True) != quant:
        raise ConversionError("AutoencoderKL with use_quant_conv != use_post_quant_conv is not supported")
    shift = hf.get("shift_factor")
    return FluxVAEConfig(
        in_channels=hf.get("in_channels", 3),
        out_channels=hf.get("out_channels", 3),
        block_out_channels=tuple(hf.get("block_out_channels", (64,))),
        layers_per_block=hf.get("layers_per_block", 1),
        latent_channels=hf.get("latent_channels", 4),
        norm_num_groups=hf.get("norm_num_groups", 32),
        scaling_factor=hf.get("scaling_factor", 0.18215),
        shift_factor=0.0 if shift is None else shift,
        mid_block_add_attention=hf.get("mid_block_add_attention", True),
        encoder_attention_levels=tuple(i for i, t in enumerate(down) if t.startswith("Attn")),
        decoder_attention_levels=tuple(n - 1 - j for j, t in enumerate(up) if t.startswith("Attn")),
        use_quant_conv=quant,
    )
