"""Model families the converter knows: config type and presets, JAX model constructor, and one mapping table per
upstream key scheme. Model code is imported lazily so ``conversion`` loads fast and without the models."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from conversion import config_io, diffusers_configs
from conversion.engine import Mapping
from conversion.errors import ConversionError


@dataclasses.dataclass(frozen=True)
class Family:
    """``tables``: key scheme -> (config -> Mapping). ``export_scheme`` is the default layout written on export."""

    name: str
    description: str
    presets: dict[str, Callable[[], Any]]
    build: Callable[[Any, Any], Any] | None  # (config, rngs) -> nnx.Module; None: tables alone fix the shapes
    tables: dict[str, Callable[[Any], Mapping]]
    export_scheme: str
    config_to_json: Callable[[Any], dict] = config_io.to_dict
    config_from_json: Callable[[dict], Any] | None = None
    config_from_hf: Callable[[dict], Any] | None = None  # the source directory's config.json (HF layout)
    hf_config: Callable[[Any], dict] | None = None  # config.json written beside exported weights
    weights_prefix: str = "model"  # exported safetensors file prefix
    skip_prefixes: tuple[str, ...] = ()  # source tensors left out on import (logged with a count), e.g. unused towers
    hf_config_schemes: tuple[str, ...] = ()  # export schemes that get ``hf_config`` (empty: all of them)
    extras_file: str | None = None  # the exact typed config, written on export and preferred on import
    pipeline_subdir: str | None = None  # a diffusers pipeline root's folder for this family (transformer/, vae/)
    # split layouts (conversion.split_layout): sub-folder -> (config -> its config.json), e.g. a decoder's transformer/
    split_configs: dict[str, Callable[[Any], dict]] = dataclasses.field(default_factory=dict)

    def table(self, scheme: str, config: Any) -> Mapping:
        if scheme not in self.tables:
            raise ConversionError(
                f"family {self.name!r} has no table for key scheme {scheme!r}; it supports {sorted(self.tables)}"
            )
        return self.tables[scheme](config)

    def preset(self, name: str) -> Any:
        if name not in self.presets:
            raise ConversionError(f"family {self.name!r} has no preset {name!r}; presets: {sorted(self.presets)}")
        return self.presets[name]()


# ------------------------------------------------------------------------------------------------------- Nexus-Gen AR
def _vl_from_json(vl: dict) -> Any:
    from configs import qwen2_5, qwen2_5_vl

    return qwen2_5_vl.Qwen25VLConfig(
        text=config_io.from_dict(qwen2_5.Qwen2TextConfig, vl["text"]),
        vision=config_io.from_dict(qwen2_5_vl.Qwen25VisionConfig, vl["vision"]),
        tokens=config_io.from_dict(qwen2_5_vl.Qwen25VLTokens, vl["tokens"]),
        tokens_per_second=vl["tokens_per_second"],
    )


def _nexus_from_json(d: dict) -> Any:
    from configs import nexus_gen

    vl_cfg = _vl_from_json(d["vl"])
    kwargs = {k: v for k, v in d.items() if k not in ("vl", "trainable")}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    trainable = config_io.from_dict(nexus_gen.TrainablePolicy, d.get("trainable", {}))
    return nexus_gen.NexusGenConfig(vl=vl_cfg, trainable=trainable, **kwargs)


def text_config_from_hf(hf: dict, shapes: dict | None = None) -> Any:
    """Qwen2TextConfig from a transformers Qwen2 / Qwen2.5(-VL) ``config.json`` (flat or nested ``text_config``)."""
    from configs import qwen2_5

    t = hf.get("text_config", hf)
    rope = t.get("rope_scaling") or t.get("rope_parameters") or {}
    return qwen2_5.Qwen2TextConfig(
        vocab_size=t["vocab_size"],
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_layers=t["num_hidden_layers"],
        num_heads=t["num_attention_heads"],
        num_kv_heads=t["num_key_value_heads"],
        head_dim=t["hidden_size"] // t["num_attention_heads"],
        rope_theta=float(t.get("rope_theta", rope.get("rope_theta", 1e6))),
        rms_norm_eps=t["rms_norm_eps"],
        mrope_section=tuple(rope["mrope_section"]) if "mrope_section" in rope else None,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", t.get("tie_word_embeddings", False))),
        max_position_embeddings=t.get("max_position_embeddings", 128000),
    )


def nexus_config_from_hf(hf: dict, shapes: dict[str, tuple[int, ...]] | None = None) -> Any:
    """NexusGenConfig from a transformers Qwen2.5-VL ``config.json`` (4.49 flat or 5.x nested ``text_config``).
    The version is V2 when the checkpoint (``shapes``) has ``image_prefill_embeds.weight``; its row count must be
    the 81 slots of the released models (other slot grids need an explicit config)."""
    from configs import nexus_gen, qwen2_5_vl

    text = text_config_from_hf(hf)
    v = hf["vision_config"]
    fields = {f.name for f in dataclasses.fields(qwen2_5_vl.Qwen25VisionConfig)}
    vkw = {k: (tuple(x) if isinstance(x, list) else x) for k, x in v.items() if k in fields}
    if "in_chans" in v:
        vkw["in_channels"] = v["in_chans"]
    if "spatial_patch_size" in v:
        vkw["patch_size"] = v["spatial_patch_size"]
    vision = qwen2_5_vl.Qwen25VisionConfig(**vkw)
    ids = dict(
        image_pad="image_token_id",
        video_pad="video_token_id",
        vision_start="vision_start_token_id",
        vision_end="vision_end_token_id",
    )
    tokens = dataclasses.replace(qwen2_5_vl.Qwen25VLTokens(), **{f: hf[k] for f, k in ids.items() if k in hf})
    vl = qwen2_5_vl.Qwen25VLConfig(
        text=text, vision=vision, tokens=tokens, tokens_per_second=v.get("tokens_per_second", 2)
    )
    prefill = (shapes or {}).get("image_prefill_embeds.weight")
    if prefill is not None and prefill[0] != 81:
        raise ConversionError(
            f"image_prefill_embeds.weight has {prefill[0]} rows; --config hf assumes the released 81 slots, "
            "pass a JSON config with the right slot_grid_thw"
        )
    base = nexus_gen.nexus_gen_v2 if shapes is None or prefill is not None else nexus_gen.nexus_gen_v1
    return base(vl=vl)


def nexus_hf_config(cfg: Any) -> dict:
    """transformers ``Qwen2_5_VLConfig`` dict for an exported Nexus-Gen AR directory."""
    import transformers

    t, v = cfg.vl.text, cfg.vl.vision
    if t.mrope_section is None:
        raise ConversionError("a Qwen2.5-VL export needs mrope_section; this text config has none")
    text = dict(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        rms_norm_eps=t.rms_norm_eps,
        max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=t.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": list(t.mrope_section)},
        bos_token_id=cfg.vl.tokens.endoftext,
        eos_token_id=cfg.vl.tokens.im_end,
    )

    if t.head_dim * t.num_heads != t.hidden_size:
        raise ConversionError(
            f"transformers Qwen2.5-VL needs head_dim * heads == hidden, got {t.head_dim}x{t.num_heads}"
        )
    tok = cfg.vl.tokens
    hf = transformers.Qwen2_5_VLConfig(
        text_config=text,
        vision_config=v.to_hf_dict(),
        image_token_id=tok.image_pad,
        video_token_id=tok.video_pad,
        vision_start_token_id=tok.vision_start,
        vision_end_token_id=tok.vision_end,
        tie_word_embeddings=t.tie_word_embeddings,
        bos_token_id=tok.endoftext,
        eos_token_id=tok.im_end,
    )
    d = hf.to_dict()
    d["bos_token_id"], d["eos_token_id"] = tok.endoftext, tok.im_end
    d["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
    return d


def nexus_ar_family() -> Family:
    from configs import nexus_gen

    def build(cfg, rngs):
        from nexus_jax.models.nexus_ar import NexusGenAR

        return NexusGenAR(cfg, rngs=rngs)

    def table(cfg):
        from conversion.tables.qwen2_5_vl import nexus_ar_mapping

        return nexus_ar_mapping(cfg)

    return Family(
        name="nexus_ar",
        description="Nexus-Gen AR model (Qwen2.5-VL + vision_head [+ image_prefill_embeds])",
        presets={
            "v1": nexus_gen.nexus_gen_v1,
            "v2": nexus_gen.nexus_gen_v2,
            "tiny_v1": lambda: nexus_gen.tiny("v1"),
            "tiny_v2": lambda: nexus_gen.tiny("v2"),
        },
        build=build,
        tables={"nexus_ar": table},
        export_scheme="nexus_ar",
        config_from_json=_nexus_from_json,
        config_from_hf=nexus_config_from_hf,
        hf_config=nexus_hf_config,
        extras_file="nexus_gen_config.json",
    )


# ------------------------------------------------------------------------------------------------- plain Qwen2.5-VL
def _qwen2_5_vl_family() -> Family:
    from configs import nexus_gen, qwen2_5, qwen2_5_vl

    def build(cfg, rngs):
        from nexus_jax.models.qwen2_5_vl.model import Qwen25VLForConditionalGeneration

        return Qwen25VLForConditionalGeneration(cfg, rngs=rngs)

    def table(cfg):
        from conversion.tables.qwen2_5_vl import qwen2_5_vl_mapping

        return qwen2_5_vl_mapping(cfg)

    return Family(
        name="qwen2_5_vl",
        description="transformers Qwen2.5-VL (ViT + text decoder, no Nexus-Gen heads)",
        presets={"7b": lambda: qwen2_5_vl.Qwen25VLConfig(text=qwen2_5.qwen2_5_vl_7b()), "tiny": nexus_gen.tiny_vl},
        build=build,
        tables={"hf_qwen2_5_vl": table},
        export_scheme="hf_qwen2_5_vl",
        config_from_json=_vl_from_json,
        config_from_hf=lambda hf, shapes=None: nexus_config_from_hf(hf).vl,
        hf_config=lambda cfg: nexus_hf_config(_VLHolder(cfg)),
    )


@dataclasses.dataclass(frozen=True)
class _VLHolder:
    """Stands in for a NexusGenConfig where only ``.vl`` is read (:func:`nexus_hf_config`)."""

    vl: Any


# ------------------------------------------------------------------------------------------------- Qwen2.5 text only
def _qwen2_family() -> Family:
    from configs import qwen2_5

    def build(cfg, rngs):
        from nexus_jax.models.qwen2 import Qwen2ForCausalLM

        return Qwen2ForCausalLM(cfg, rngs=rngs)

    def table(cfg):
        from conversion.tables.qwen2_5_vl import text_mapping

        return text_mapping(cfg.num_layers, cfg.tie_word_embeddings)

    return Family(
        name="qwen2_text",
        description="Qwen2 / Qwen2.5 decoder-only text model (transformers names)",
        presets={
            "qwen2_5_1_5b": qwen2_5.qwen2_5_1_5b,
            "qwen2_5_vl_7b_text": qwen2_5.qwen2_5_vl_7b,
            "tiny": qwen2_5.tiny,
        },
        build=build,
        tables={"hf_qwen2": table},
        export_scheme="hf_qwen2",
        config_from_json=lambda d: config_io.from_dict(qwen2_5.Qwen2TextConfig, d),
        config_from_hf=text_config_from_hf,
    )


# -------------------------------------------------------------------------------------------------------------- FLUX
def _flux_family() -> Family:
    from configs.flux import FluxDiTConfig

    def build(cfg, rngs):
        from nexus_jax.models.flux import FluxDiT

        return FluxDiT(cfg, rngs=rngs)

    def tables():
        from conversion.tables import flux_dit

        return {
            "diffsynth_flux_dit": flux_dit.diffsynth_mapping,
            "diffusers_flux_transformer": flux_dit.diffusers_mapping,
            "bfl_flux": flux_dit.bfl_mapping,
        }

    return Family(
        name="flux_dit",
        description="FLUX.1 DiT (DiffSynth / diffusers / BFL names)",
        presets={"full": FluxDiTConfig.full, "tiny": FluxDiTConfig.tiny},
        build=build,
        tables=tables(),
        export_scheme="diffsynth_flux_dit",
        config_from_json=lambda d: config_io.from_dict(FluxDiTConfig, d),
        config_from_hf=diffusers_configs.flux_from_diffusers,
        hf_config=diffusers_configs.flux_to_diffusers,
        hf_config_schemes=("diffusers_flux_transformer",),
        weights_prefix="diffusion_pytorch_model",
        pipeline_subdir="transformer",
    )


# ---------------------------------------------------------------------------------------------- Nexus-Gen decoders
def _decoder_family(kind: str) -> Family:
    """Generation (V1 / V2) or editing decoder: ``nexus_jax.models.nexus_decoders.GenerationDecoder`` /
    ``EditingDecoder`` (paths ``dit.*`` + ``adapter.*`` / ``embedding_merger.*``)."""
    from configs.nexus_decoders import NexusDecoderConfig

    def build(cfg, rngs):
        from nexus_jax.models import nexus_decoders

        cls = nexus_decoders.GenerationDecoder if kind == "generation" else nexus_decoders.EditingDecoder
        return cls(cfg, rngs=rngs)

    def table(name):
        def make(cfg):
            from conversion.tables import nexus_decoders

            return getattr(nexus_decoders, name)(cfg)

        return make

    tables = (
        {"nexus_v1_decoder": table("v1_generation_mapping"), "nexus_v2_generation": table("v2_generation_mapping"),
         "nexus_diffusers_generation": table("diffusers_generation_mapping")}
        if kind == "generation"
        else {"nexus_v2_editing": table("v2_editing_mapping"), "nexus_diffusers_editing": table(
            "diffusers_editing_mapping")}
    )
    return Family(
        name=f"{kind}_decoder",
        description=f"Nexus-Gen {kind} decoder (FLUX DiT + {'adapter' if kind == 'generation' else 'merger'})",
        presets={"full": getattr(NexusDecoderConfig, kind), "tiny": NexusDecoderConfig.tiny},
        build=build,
        tables=tables,
        export_scheme=next(iter(tables)),
        config_from_json=lambda d: config_io.from_dict(NexusDecoderConfig, d),
        weights_prefix="generation_decoder" if kind == "generation" else "edit_decoder",
        extras_file="nexus_decoder_config.json",
        split_configs={"transformer": lambda cfg: diffusers_configs.flux_to_diffusers(cfg.dit)},
    )


# --------------------------------------------------------------------------------------------------------------- VAE
def _vae_family() -> Family:
    from configs.vae import FluxVAEConfig

    def build(cfg, rngs):
        from nexus_jax.models.vae import FluxVAE

        return FluxVAE(cfg, rngs=rngs)

    def table(kind):
        def make(cfg):
            from conversion.tables import vae

            return getattr(vae, f"{kind}_mapping")(cfg)

        return make

    return Family(
        name="vae",
        description="FLUX VAE (diffusers AutoencoderKL / BFL ae.safetensors names)",
        presets={"full": FluxVAEConfig.full, "tiny": FluxVAEConfig.tiny},
        build=build,
        tables={"diffusers_vae": table("diffusers"), "bfl_vae": table("bfl")},
        export_scheme="diffusers_vae",
        config_from_json=lambda d: config_io.from_dict(FluxVAEConfig, d),
        config_from_hf=diffusers_configs.vae_from_diffusers,
        hf_config=diffusers_configs.vae_to_diffusers,
        hf_config_schemes=("diffusers_vae",),
        weights_prefix="diffusion_pytorch_model",
        pipeline_subdir="vae",
    )


# ---------------------------------------------------------------------------------------------------- UniPic-1
def unipic_family() -> Family:
    """Skywork UniPic-1 ``pytorch_model.bin`` (LLM + MAR + diffusion head + projectors; SigLIP2 skipped). The KL-16
    VAE (``kl16.ckpt``) is a separate import (family ``kl16_vae``), conventionally into ``<OUT>/vae``."""
    from configs import unipic

    def build(cfg, rngs):
        from nexus_jax.models.unipic.model import UniPic

        return UniPic(cfg, rngs=rngs)

    def table(cfg):
        from conversion.tables.unipic import unipic_mapping

        return unipic_mapping(cfg)

    from conversion.tables.unipic import SCHEME, SKIP_PREFIXES

    return Family(
        name="unipic",
        description="Skywork UniPic-1 (Qwen2.5 + MAR + diffusion head + projectors; siglip2* skipped)",
        presets={"full": unipic.full, "tiny": unipic.tiny},
        build=build,
        tables={SCHEME: table},
        export_scheme=SCHEME,
        config_from_json=lambda d: config_io.from_dict(unipic.UniPicConfig, d),
        weights_prefix="pytorch_model",
        skip_prefixes=SKIP_PREFIXES,
    )


def kl16_vae_family() -> Family:
    """MAR / UniPic-1 KL-16 VAE: the ``vae`` family's ``FluxVAE`` with ``FluxVAEConfig.kl16()`` and the
    ``kl16.ckpt`` table (LDM names; ``bfl_vae`` is what detection calls those names without quant convs)."""
    from configs.vae import FluxVAEConfig

    def kl16(cfg):
        from conversion.tables.kl16_vae import kl16_mapping

        return kl16_mapping(cfg)

    vae = _vae_family()
    return dataclasses.replace(
        vae,
        name="kl16_vae",
        description="MAR / UniPic-1 KL-16 VAE (kl16.ckpt LDM names / diffusers AutoencoderKL names)",
        presets={"full": FluxVAEConfig.kl16, "tiny": FluxVAEConfig.kl16_tiny},
        tables={"kl16_vae": kl16, "bfl_vae": kl16, "diffusers_vae": vae.tables["diffusers_vae"]},
        export_scheme="kl16_vae",
        weights_prefix="kl16",
    )


def generation_decoder_family() -> Family:
    return _decoder_family("generation")


def editing_decoder_family() -> Family:
    return _decoder_family("editing")


# the shared building blocks; a model family's own converter families (nexus_ar, the Nexus-Gen decoders, unipic,
# kl16_vae) are declared with that family in nexus_jax.families and found through its registry
_FACTORIES: dict[str, Callable[[], Family]] = {
    "qwen2_5_vl": _qwen2_5_vl_family,
    "qwen2_text": _qwen2_family,
    "flux_dit": _flux_family,
    "vae": _vae_family,
}


def register(name: str, factory: Callable[[], Family]) -> None:
    """Add a family (used by the decoder / VAE tables)."""
    _FACTORIES[name] = factory


def get_family(name: str) -> Family:
    """The converter family ``name``: a shared one of this module, or one a model family declares
    (``nexus_jax.families``)."""
    if name in _FACTORIES:
        return _FACTORIES[name]()
    from nexus_jax import families

    factory = families.conversion_factory(name)
    if factory is None:
        raise ConversionError(f"unknown model family {name!r}; known: {family_names()}")
    return factory()


def family_names() -> list[str]:
    from nexus_jax import families

    return sorted(set(_FACTORIES) | set(families.conversion_names()))
