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


def qwen2_5_vl_mapping(
    vl_config, text_jax_prefix: str = "language_model.", vision_jax_prefix: str = "visual."
) -> Mapping:
    """transformers Qwen2_5_VLForConditionalGeneration (4.49 names) for a ``configs.qwen2_5_vl.Qwen25VLConfig``;
    default JAX prefixes are those of ``nexus_jax.models.nexus_ar.NexusGenAR``."""
    text, vis = vl_config.text, vl_config.vision
    kernel = (vis.in_channels, vis.temporal_patch_size, vis.patch_size, vis.patch_size)
    return combine(
        "qwen2_5_vl",
        text_mapping(
            text.num_layers,
            text.tie_word_embeddings,
            jax_prefix=f"{text_jax_prefix}model.",
            lm_head=("lm_head", f"{text_jax_prefix}lm_head"),
        ),
        vision_mapping(vis.depth, vis.hidden_size, kernel, jax_prefix=vision_jax_prefix),
    )


def nexus_ar_mapping(cfg) -> Mapping:
    """Nexus-Gen AR safetensors (``configs.nexus_gen.NexusGenConfig``) <-> ``NexusGenAR``."""
    return combine("nexus_ar", qwen2_5_vl_mapping(cfg.vl), nexus_heads_mapping(cfg.uses_prefill_embeds))
