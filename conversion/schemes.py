"""Recognise which upstream key scheme a checkpoint uses from its tensor names alone."""

from __future__ import annotations

from collections.abc import Collection

from conversion.errors import UnknownSchemeError

# scheme name -> one-line description (also the CLI's list)
SCHEMES: dict[str, str] = {
    "nexus_ar": "Nexus-Gen AR (transformers 4.49 Qwen2.5-VL names + vision_head [+ image_prefill_embeds])",
    "hf_qwen2_5_vl": "transformers Qwen2.5-VL (4.49 names: model.layers.*, visual.*, lm_head)",
    "nexus_v1_decoder": "Nexus-Gen V1 decoder_81_512 (unprefixed adapter 0/1/3/4.* + unprefixed DiffSynth DiT)",
    "nexus_v2_generation": "Nexus-Gen V2 generation decoder (adapter.* + pipe.dit.*)",
    "nexus_v2_editing": "Nexus-Gen V2 editing decoder (embedding_merger.* + pipe.dit.*)",
    "nexus_diffusers_generation": "Nexus-Gen generation decoder, diffusers layout (transformer/ + adapter.*)",
    "nexus_diffusers_editing": "Nexus-Gen editing decoder, diffusers layout (transformer/ + embedding_merger.*)",
    "hf_qwen2": "transformers Qwen2 / Qwen2.5 text model (model.layers.*, no vision tower)",
    "diffsynth_flux_dit": "DiffSynth FluxDiT state dict (blocks.*, single_blocks.*, final_norm_out.*)",
    "diffusers_flux_transformer": (
        "diffusers FluxTransformer2DModel (transformer_blocks.*, single_transformer_blocks.*)"
    ),
    "bfl_flux": "BFL flux1-dev.safetensors (double_blocks.*, single_blocks.*, final_layer.*)",
    "diffusers_vae": "diffusers AutoencoderKL (encoder.down_blocks.*, decoder.up_blocks.*)",
    "bfl_vae": "BFL ae.safetensors (encoder.down.*, decoder.up.*)",
    "kl16_vae": "MAR / UniPic-1 kl16.ckpt (LDM names encoder.down.*, decoder.up.* + quant_conv, post_quant_conv)",
    "unipic1_bin": "Skywork UniPic-1 pytorch_model.bin (llm.model.*, mar.*, mar.diffloss.net.*, proj_in/out.*)",
}


def _has_prefix(keys: Collection[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def detect_scheme(keys: Collection[str], where: str = "the checkpoint") -> str:
    """Name of the key scheme of a state dict (see :data:`SCHEMES`); raises UnknownSchemeError listing the keys."""
    keys = set(keys)
    if "transformer/x_embedder.weight" in keys:
        if _has_prefix(keys, "embedding_merger."):
            return "nexus_diffusers_editing"
        if _has_prefix(keys, "adapter."):
            return "nexus_diffusers_generation"
    if _has_prefix(keys, "pipe.dit."):
        if _has_prefix(keys, "embedding_merger."):
            return "nexus_v2_editing"
        if _has_prefix(keys, "adapter."):
            return "nexus_v2_generation"
    dit = "x_embedder.weight" in keys and _has_prefix(keys, "single_blocks.") and _has_prefix(keys, "blocks.")
    if dit:
        return "nexus_v1_decoder" if {"0.weight", "3.weight"} <= keys else "diffsynth_flux_dit"
    if "img_in.weight" in keys and _has_prefix(keys, "double_blocks."):
        return "bfl_flux"
    if "x_embedder.weight" in keys and _has_prefix(keys, "single_transformer_blocks."):
        return "diffusers_flux_transformer"
    if "encoder.conv_in.weight" in keys:
        if _has_prefix(keys, "encoder.down_blocks.") or _has_prefix(keys, "decoder.up_blocks."):
            return "diffusers_vae"
        if _has_prefix(keys, "encoder.down.") or _has_prefix(keys, "decoder.up."):
            return "kl16_vae" if "quant_conv.weight" in keys else "bfl_vae"
    if "llm.model.embed_tokens.weight" in keys and _has_prefix(keys, "mar."):
        return "unipic1_bin"
    if "model.embed_tokens.weight" in keys and _has_prefix(keys, "model.layers."):
        if "vision_head.weight" in keys:
            return "nexus_ar"
        return "hf_qwen2_5_vl" if _has_prefix(keys, "visual.") else "hf_qwen2"
    raise UnknownSchemeError(keys, where, SCHEMES)
