"""KL-16 VAE table: MAR / Harmon / UniPic-1 ``kl16.ckpt`` (``torch.load(path)["model"]``) <-> ``FluxVAE`` built from
``FluxVAEConfig.kl16()`` (diffusers names inside, see :mod:`conversion.tables.vae`).

``kl16.ckpt`` uses the LDM names that BFL's ``ae.safetensors`` also uses, so the rules are :func:`bfl_mapping`'s:
``encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}``, ``encoder.down.4.attn.{j}.{norm,q,k,v,
proj_out}`` (1x1 convs), ``encoder.down.{i}.downsample.conv``, ``{encoder,decoder}.mid.{block_1,attn_1,block_2}``,
``encoder.norm_out/conv_out``, ``decoder.conv_in``, ``decoder.up.{i}.block.{j}`` (``up.i`` = diffusers
``up_blocks.{4-i}``), ``decoder.up.{i}.upsample.conv``, ``decoder.norm_out/conv_out``, ``quant_conv``,
``post_quant_conv``. The ``{"model": ...}`` wrapper is unwrapped by :class:`conversion.io.TorchBinReader`.
"""

from __future__ import annotations

from configs.vae import FluxVAEConfig
from conversion.engine import Mapping
from conversion.tables.vae import bfl_mapping


def kl16_mapping(cfg: FluxVAEConfig) -> Mapping:
    """``kl16.ckpt`` state dict <-> FluxVAE for a KL-16 config (needs ``use_quant_conv``, which the file has)."""
    if not cfg.use_quant_conv:
        raise ValueError("the kl16.ckpt layout has quant_conv / post_quant_conv: use a config with use_quant_conv")
    return Mapping("kl16_vae", bfl_mapping(cfg).rules)
