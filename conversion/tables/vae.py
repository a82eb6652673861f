"""FLUX VAE tables. The JAX model (``nexus_jax.models.vae.FluxVAE``) uses diffusers ``AutoencoderKL`` names with
flax layouts (conv kernel [kh, kw, in, out], Linear kernel [in, out]).

Which resnets have a ``conv_shortcut`` and which levels have a down/up-sampler depends on the config, so the rules
are listed from the model's parameter paths (one concrete rule per tensor) and renamed for BFL ``ae.safetensors``:
``down_blocks.i.resnets.j`` <-> ``down.i.block.j``, decoder ``up_blocks.i`` <-> ``up.{n-1-i}``, ``mid_block`` <->
``mid.block_1 / attn_1 / block_2``, per-level ``attentions.j`` <-> ``attn.j`` (KL-16's encoder), attention
q/k/v/proj_out as 1x1 convs [out, in, 1, 1]; ``quant_conv`` / ``post_quant_conv`` keep their names.
"""

from __future__ import annotations

import functools
import re

from configs.vae import FluxVAEConfig
from conversion.engine import LINEAR, Chain, Mapping, Reshape, rule, same_names


@functools.lru_cache(maxsize=8)
def _jax_shapes(cfg: FluxVAEConfig) -> dict[str, tuple[int, ...]]:
    from flax import nnx

    from conversion.state import abstract_params
    from nexus_jax.models.vae import FluxVAE

    return {k: v.shape for k, v in abstract_params(lambda: FluxVAE(cfg, rngs=nnx.Rngs(0)))[1].items()}


def diffusers_mapping(cfg: FluxVAEConfig) -> Mapping:
    """diffusers ``AutoencoderKL`` state dict <-> FluxVAE (same names; kernels re-laid out)."""
    return same_names("vae_diffusers", _jax_shapes(cfg))


def bfl_name(diffusers_name: str, num_levels: int) -> str:
    """diffusers AutoencoderKL key -> BFL ``ae.safetensors`` key."""
    n = diffusers_name
    n = re.sub(r"down_blocks\.(\d+)\.resnets\.(\d+)", r"down.\1.block.\2", n)
    n = re.sub(r"down_blocks\.(\d+)\.attentions\.(\d+)", r"down.\1.attn.\2", n)
    n = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0", r"down.\1.downsample", n)
    n = re.sub(r"up_blocks\.(\d+)", lambda m: f"up.{num_levels - 1 - int(m.group(1))}", n)
    n = re.sub(r"(up\.\d+)\.resnets\.(\d+)", r"\1.block.\2", n)
    n = re.sub(r"(up\.\d+)\.attentions\.(\d+)", r"\1.attn.\2", n)
    n = re.sub(r"(up\.\d+)\.upsamplers\.0", r"\1.upsample", n)
    n = n.replace("conv_shortcut", "nin_shortcut")
    n = n.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
    n = n.replace("mid_block.attentions.0", "mid.attn_1")
    n = re.sub(r"\.to_([qkv])\.", r".\1.", n)  # every attention (mid and per-level): q/k/v/proj_out, norm
    n = n.replace(".to_out.0.", ".proj_out.").replace(".group_norm.", ".norm.")
    return n.replace("conv_norm_out", "norm_out")


def bfl_mapping(cfg: FluxVAEConfig) -> Mapping:
    """BFL ``ae.safetensors`` <-> FluxVAE (attention projections are 1x1 convs there)."""
    levels = len(cfg.block_out_channels)
    rules = []
    for r, s in zip(diffusers_mapping(cfg).rules, _jax_shapes(cfg).values()):
        t = r.transform
        if t is LINEAR:  # torch [out, in, 1, 1] -> [out, in] -> kernel [in, out]
            t = Chain((Reshape((s[1], s[0], 1, 1), (s[1], s[0])), LINEAR))
        rules.append(rule(bfl_name(r.torch[0], levels), r.jax, t))
    return Mapping("vae_bfl", tuple(rules))
