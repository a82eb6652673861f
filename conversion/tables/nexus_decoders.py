"""Nexus-Gen decoder tables (nexus-gen.md 5.3): a DiffSynth FLUX DiT plus the generation adapter or the editing
merger, in the three upstream key schemes:

- ``nexus_v1_decoder`` (``decoder_81_512.bin``): adapter ``0/1/3/4.*`` and the DiT keys, both unprefixed;
- ``nexus_v2_generation`` (``generation_decoder.bin``): ``adapter.{0,1,3,4}.*`` + ``pipe.dit.*``;
- ``nexus_v2_editing`` (``edit_decoder.bin``): ``embedding_merger.*`` + ``pipe.dit.*``;
- ``nexus_diffusers_generation`` / ``nexus_diffusers_editing``: the DiT as a diffusers ``FluxTransformer2DModel`` in
  ``transformer/`` (names ``transformer/<diffusers name>``, see ``conversion.split_layout``) + ``adapter.*`` /
  ``embedding_merger.*`` beside it.

JAX side (paths of the decoder model): ``dit.*`` (``FluxDiT``), ``adapter.{0,3}.kernel`` (Linear), ``adapter.{1,4}
.{weight,bias}`` (LayerNorm), ``embedding_merger.layers.{m}.*`` (Qwen2 decoder layers, as in ``Qwen2DecoderLayer``)
and ``embedding_merger.projector.{0,2,5}.weight`` (RMSNorm) / ``projector.{1,4}.{kernel,bias}`` (Linear).
"""

from __future__ import annotations

from configs.nexus_decoders import MergerConfig, NexusDecoderConfig
from conversion.engine import Mapping, Rule, combine, linear, norm
from conversion.tables.flux_dit import diffsynth_mapping, diffusers_mapping

DIT_PREFIX = "dit."
DIFFUSERS_DIT = "transformer/"  # the diffusers layout's DiT folder (conversion.split_layout)


def adapter_mapping(torch_prefix: str, jax_prefix: str = "adapter.") -> Mapping:
    """Linear(0) -> LayerNorm(1) -> ReLU(2) -> Linear(3) -> LayerNorm(4)."""
    t, j = torch_prefix, jax_prefix
    rules = linear(f"{t}0", f"{j}0") + norm(f"{t}1", f"{j}1", bias=True)
    rules += linear(f"{t}3", f"{j}3") + norm(f"{t}4", f"{j}4", bias=True)
    return Mapping("nexus_adapter", tuple(rules))


def merger_mapping(
    cfg: MergerConfig, torch_prefix: str = "embedding_merger.", jax_prefix: str = "embedding_merger."
) -> Mapping:
    """``ImageEmbeddingMerger``: Qwen2.5 decoder layer(s), then projector RMSNorm -> Linear -> RMSNorm -> SiLU ->
    Linear -> RMSNorm."""
    t, j = torch_prefix, jax_prefix
    lay, q = f"{t}layers.{{m}}", f"{j}layers.{{m}}"
    rules: list[Rule] = []
    for name in ("q_proj", "k_proj", "v_proj"):
        rules += linear(f"{lay}.self_attn.{name}", f"{q}.self_attn.{name}")
    rules += linear(f"{lay}.self_attn.o_proj", f"{q}.self_attn.o_proj", bias=False)
    for name in ("gate_proj", "up_proj", "down_proj"):
        rules += linear(f"{lay}.mlp.{name}", f"{q}.mlp.{name}", bias=False)
    rules += norm(f"{lay}.input_layernorm", f"{q}.input_layernorm")
    rules += norm(f"{lay}.post_attention_layernorm", f"{q}.post_attention_layernorm")
    for k in (0, 2, 5):
        rules += norm(f"{t}projector.{k}", f"{j}projector.{k}")
    for k in (1, 4):
        rules += linear(f"{t}projector.{k}", f"{j}projector.{k}")
    return Mapping("nexus_merger", tuple(rules), (("m", cfg.num_layers),))


def v1_generation_mapping(cfg: NexusDecoderConfig) -> Mapping:
    """``decoder_81_512.bin``: everything unprefixed."""
    dit = diffsynth_mapping(cfg.dit).with_prefix("", DIT_PREFIX)
    return combine("nexus_v1_decoder", adapter_mapping(""), dit)


def v2_generation_mapping(cfg: NexusDecoderConfig) -> Mapping:
    """``generation_decoder.bin``: ``adapter.*`` + ``pipe.dit.*``."""
    dit = diffsynth_mapping(cfg.dit).with_prefix("pipe.dit.", DIT_PREFIX)
    return combine("nexus_v2_generation", adapter_mapping("adapter."), dit)


def v2_editing_mapping(cfg: NexusDecoderConfig) -> Mapping:
    """``edit_decoder.bin``: ``embedding_merger.*`` + ``pipe.dit.*``."""
    dit = diffsynth_mapping(cfg.dit).with_prefix("pipe.dit.", DIT_PREFIX)
    return combine("nexus_v2_editing", merger_mapping(cfg.merger), dit)


def diffusers_generation_mapping(cfg: NexusDecoderConfig) -> Mapping:
    """``transformer/`` (diffusers FLUX names) + ``adapter.*``."""
    dit = diffusers_mapping(cfg.dit).with_prefix(DIFFUSERS_DIT, DIT_PREFIX)
    return combine("nexus_diffusers_generation", adapter_mapping("adapter."), dit)


def diffusers_editing_mapping(cfg: NexusDecoderConfig) -> Mapping:
    """``transformer/`` (diffusers FLUX names) + ``embedding_merger.*``."""
    dit = diffusers_mapping(cfg.dit).with_prefix(DIFFUSERS_DIT, DIT_PREFIX)
    return combine("nexus_diffusers_editing", merger_mapping(cfg.merger), dit)
