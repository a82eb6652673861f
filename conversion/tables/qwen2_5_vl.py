"""Qwen2.5-VL / Nexus-Gen AR tables: transformers 4.49 names (as in the Nexus-Gen safetensors) <-> nnx paths.

torch side (Nexus-Gen ``model-0000k-of-00004.safetensors``)::

    model.embed_tokens.weight, model.layers.{i}.*, model.norm.weight, lm_head.weight
    visual.patch_embed.proj.weight [C, 3, T, P, P], visual.blocks.{v}.*, visual.merger.{ln_q, mlp.0, mlp.2}.*
    vision_head.weight [D, D], image_prefill_embeds.weight [81, D] (V2)

JAX side: ``Qwen2ForCausalLM`` (``model.embed_tokens.embedding``, ``model.layers.{i}.self_attn.q_proj.kernel``, ...,
``lm_head.kernel``) and ``Qwen25VisionTransformer`` (fused ``attn.qkv.kernel`` [C, 3, C], ``merger.mlp_0``), each
under a configurable path prefix.
"""

from __future__ import annotations

from conversion.engine import LINEAR, Chain, ConvToMatmul, Mapping, Reshape, Rule, combine, linear, norm, rule
from conversion.errors import ConversionError

_ATTN = ("q_proj", "k_proj", "v_proj")


def text_mapping(
    num_layers: int,
    tie_word_embeddings: bool = False,
    torch_prefix: str = "model.",
    jax_prefix: str = "model.",
    lm_head: tuple[str, str] | None = ("lm_head", "lm_head"),
) -> Mapping:
    """Qwen2 decoder: ``{torch_prefix}layers.{i}.*`` <-> ``{jax_prefix}layers.{i}.*``; lm_head (torch, JAX) names."""
    t, j = torch_prefix, jax_prefix
    rules: list[Rule] = [rule(f"{t}embed_tokens.weight", f"{j}embed_tokens.embedding")]
    for name in _ATTN:
        rules += linear(f"{t}layers.{{i}}.self_attn.{name}", f"{j}layers.{{i}}.self_attn.{name}")
    rules += linear(f"{t}layers.{{i}}.self_attn.o_proj", f"{j}layers.{{i}}.self_attn.o_proj", bias=False)
    for name in ("gate_proj", "up_proj", "down_proj"):
        rules += linear(f"{t}layers.{{i}}.mlp.{name}", f"{j}layers.{{i}}.mlp.{name}", bias=False)
    for name in ("input_layernorm", "post_attention_layernorm"):
        rules += norm(f"{t}layers.{{i}}.{name}", f"{j}layers.{{i}}.{name}")
    rules += norm(f"{t}norm", f"{j}norm")
    if lm_head is not None and not tie_word_embeddings:
        rules += linear(lm_head[0], lm_head[1], bias=False)
    return Mapping("qwen2_text", tuple(rules), (("i", num_layers),))


def vision_mapping(
    depth: int,
    hidden_size: int,
    patch_kernel: tuple[int, ...],
    torch_prefix: str = "visual.",
    jax_prefix: str = "",
) -> Mapping:
    """Qwen2.5-VL ViT. ``patch_kernel`` = (in_chans, temporal_patch, patch, patch) of the Conv3d patch embedding."""
    t, j, d = torch_prefix, jax_prefix, hidden_size
    b, q = f"{t}blocks.{{v}}", f"{j}blocks.{{v}}"
    rules: list[Rule] = [rule(f"{t}patch_embed.proj.weight", f"{j}patch_embed.proj.kernel", ConvToMatmul(patch_kernel))]
    rules += norm(f"{b}.norm1", f"{q}.norm1") + norm(f"{b}.norm2", f"{q}.norm2")
    rules.append(rule(f"{b}.attn.qkv.weight", f"{q}.attn.qkv.kernel", Chain((LINEAR, Reshape((d, 3 * d), (d, 3, d))))))
    rules.append(rule(f"{b}.attn.qkv.bias", f"{q}.attn.qkv.bias", Reshape((3 * d,), (3, d))))
    rules += linear(f"{b}.attn.proj", f"{q}.attn.proj")
    for name in ("gate_proj", "up_proj", "down_proj"):
        rules += linear(f"{b}.mlp.{name}", f"{q}.mlp.{name}")
    rules += norm(f"{t}merger.ln_q", f"{j}merger.ln_q")
    rules += linear(f"{t}merger.mlp.0", f"{j}merger.mlp_0") + linear(f"{t}merger.mlp.2", f"{j}merger.mlp_2")
    return Mapping("qwen2_5_vl_vision", tuple(rules), (("v", depth),))


def nexus_heads_mapping(prefill: bool, jax_prefix: str = "", vision_head: str = "vision_head") -> Mapping:
    """Nexus-Gen additions: ``vision_head`` Linear(D, D, no bias) and, for V2, ``image_prefill_embeds`` [81, D]."""
    rules = linear("vision_head", f"{jax_prefix}{vision_head}", bias=False)
    if prefill:
        rules.append(rule("image_prefill_embeds.weight", f"{jax_prefix}image_prefill_embeds"))
    return Mapping("nexus_heads", tuple(rules))


def vision_config_mapping(vision_config, torch_prefix: str = "visual.", jax_prefix: str = "") -> Mapping:
    """:func:`vision_mapping` for a ``configs.qwen2_5_vl.Qwen25VisionConfig``."""
    v = vision_config
    kernel = (v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return vision_mapping(v.depth, v.hidden_size, kernel, torch_prefix=torch_prefix, jax_prefix=jax_prefix)


def qwen2_5_vl_mapping(
    vl_config,
    text_jax_prefix: str = "language_model.",
    vision_jax_prefix: str = "visual.",
    text_torch_prefix: str = "model.",
    vision_torch_prefix: str = "visual.",
) -> Mapping:
    """transformers Qwen2_5_VLForConditionalGeneration for a ``configs.qwen2_5_vl.Qwen25VLConfig``: 4.49 names by
    default (transformers 5: ``model.language_model.`` / ``model.visual.``, see :func:`transformers_prefixes`);
    default JAX prefixes are those of ``nexus_jax.models.nexus_ar.NexusGenAR``."""
    text = vl_config.text
    return combine(
        "qwen2_5_vl",
        text_mapping(
            text.num_layers,
            text.tie_word_embeddings,
            torch_prefix=text_torch_prefix,
            jax_prefix=f"{text_jax_prefix}model.",
            lm_head=("lm_head", f"{text_jax_prefix}lm_head"),
        ),
        vision_config_mapping(vl_config.vision, vision_torch_prefix, vision_jax_prefix),
    )


# transformers key prefixes of the text decoder (5.x VL, bare language model, 4.x / Qwen2, Qwen2_5_VLTextModel) and
# of the vision tower (5.x, 4.x); the first whose ``embed_tokens.weight`` / ``patch_embed.proj.weight`` exists wins
TRANSFORMERS_TEXT_PREFIXES = ("model.language_model.", "language_model.", "model.", "")
TRANSFORMERS_VISION_PREFIXES = ("model.visual.", "visual.")


def transformers_prefixes(names) -> tuple[str, str | None]:
    """(text prefix, vision prefix or None) of a transformers Qwen2 / Qwen2.5-VL state dict's key ``names``."""
    names = set(names)
    text = next((p for p in TRANSFORMERS_TEXT_PREFIXES if f"{p}embed_tokens.weight" in names), None)
    if text is None:
        raise ConversionError(
            f"not a transformers Qwen2 state dict: no embed_tokens.weight under any of {TRANSFORMERS_TEXT_PREFIXES}")
    vision = next((p for p in TRANSFORMERS_VISION_PREFIXES if f"{p}patch_embed.proj.weight" in names), None)
    return text, vision


def transformers_text_mapping(text_config, names) -> tuple[Mapping, tuple[str, ...]]:
    """(table, prefixes to skip) for a transformers state dict with key ``names`` -> a JAX ``Qwen2ForCausalLM``
    (``model.*``, ``lm_head``) for a ``configs.qwen2_5.Qwen2TextConfig``; the vision tower and a tied
    ``lm_head.weight`` are skipped."""
    text, _ = transformers_prefixes(names)
    tied = text_config.tie_word_embeddings
    table = text_mapping(text_config.num_layers, tied, torch_prefix=text)
    return table, TRANSFORMERS_VISION_PREFIXES + (("lm_head.",) if tied else ())


def transformers_vl_mapping(vl_config, names) -> tuple[Mapping, tuple[str, ...]]:
    """(table, prefixes to skip) for a transformers Qwen2_5_VLForConditionalGeneration state dict (4.x or 5.x
    names) -> ``Qwen25VLForConditionalGeneration`` (``language_model.*``, ``visual.*``)."""
    text, vision = transformers_prefixes(names)
    if vision is None:
        raise ConversionError(f"no vision tower (patch_embed.proj.weight under {TRANSFORMERS_VISION_PREFIXES})")
    table = qwen2_5_vl_mapping(vl_config, text_torch_prefix=text, vision_torch_prefix=vision)
    return table, ("lm_head.",) if vl_config.text.tie_word_embeddings else ()


def nexus_ar_mapping(cfg) -> Mapping:
    """Nexus-Gen AR safetensors (``configs.nexus_gen.NexusGenConfig``) <-> ``NexusGenAR``."""
    return combine("nexus_ar", qwen2_5_vl_mapping(cfg.vl), nexus_heads_mapping(cfg.uses_prefill_embeds))
