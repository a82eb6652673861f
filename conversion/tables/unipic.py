"""Skywork UniPic-1 table: the published ``pytorch_model.bin`` (one pickled state dict) <-> the nnx ``UniPic`` model.

torch side (``Skywork/Skywork-UniPic-1.5B`` ``pytorch_model.bin``, unipic.md section 5)::

    llm.model.{embed_tokens, layers.{i}.*, norm}.weight, llm.lm_head.weight (tied: equal to embed_tokens)
    mar.{z_proj, z_proj_ln, encoder_pos_embed_learned, encoder_blocks.{e}.*, encoder_norm, decoder_embed, mask_token,
         decoder_pos_embed_learned, decoder_blocks.{d}.*, decoder_norm, diffusion_pos_embed_learned, class_emb,
         fake_latent}
    mar.diffloss.net.{time_embed.mlp.{0,2}, cond_embed, input_proj, res_blocks.{r}.{in_ln, mlp.{0,2},
         adaLN_modulation.1}, final_layer.{linear, adaLN_modulation.1}}
    proj_in.{0,2}, proj_out.{0,2}
    siglip2.*, siglip2_proj.*   (built but never called by the released code: skipped on import, see SKIP_PREFIXES)

JAX side: the same names (team naming contract), Linear kernels [in, out], LayerNorm ``weight``/``bias``,
``class_emb.embedding``, raw parameters (pos embeds, ``mask_token``, ``fake_latent``) with the torch shapes. The KL-16
VAE is not in this file (it ships as ``kl16.ckpt``); it is converted on its own with the ``kl16_vae`` family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from conversion.engine import LINEAR, UINT_BY_ITEMSIZE, Mapping, Rule, Transform, combine, linear, norm, rule
from conversion.errors import ConversionError
from conversion.tables.qwen2_5_vl import text_mapping

SCHEME = "unipic1_bin"
SKIP_PREFIXES: tuple[str, ...] = ("siglip2.", "siglip2_proj.")
_TIMM_BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
_RAW = ("encoder_pos_embed_learned", "decoder_pos_embed_learned", "diffusion_pos_embed_learned", "mask_token",
        "fake_latent")


@dataclasses.dataclass(frozen=True)
class TiedCopy(Transform):
    """Two torch tensors that must be equal bit for bit (``embed_tokens.weight``, tied ``lm_head.weight``) <-> one
    JAX tensor. Import refuses a file whose copies differ (the model would silently change); export writes both."""

    names: tuple[str, str] = ("embed_tokens", "lm_head")
    n_torch = 2
    n_jax = 1

    def to_jax(self, xs: Sequence[np.ndarray]) -> list[np.ndarray]:
        a, b = xs
        if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(_bits(a), _bits(b)):
            diff = "shapes/dtypes differ" if a.shape != b.shape or a.dtype != b.dtype else (
                f"{int(np.count_nonzero(_bits(a) != _bits(b)))} elements differ")
            raise ConversionError(
                f"{self.names[1]} is not tied to {self.names[0]} ({diff}); the JAX model ties them, so this "
                "checkpoint cannot be imported without changing its outputs"
            )
        return [a]

    def to_torch(self, xs: Sequence[np.ndarray]) -> list[np.ndarray]:
        (x,) = xs
        return [x, np.array(x, copy=True)]

    def jax_shapes(self, shapes):
        a, b = (tuple(s) for s in shapes)
        if a != b:
            raise ConversionError(f"tied {self.names[1]} has shape {b}, {self.names[0]} has {a}")
        return [a]

    def torch_shapes(self, shapes):
        (s,) = shapes
        return [tuple(s), tuple(s)]


def _bits(x: np.ndarray) -> np.ndarray:
    """Raw bits (NaN-safe equality)."""
    kind = UINT_BY_ITEMSIZE.get(x.dtype.itemsize)
    return np.ascontiguousarray(x).view(kind) if kind is not None else x


def llm_mapping(num_layers: int) -> Mapping:
    """``llm.model.*`` (tied lm_head carried by :class:`TiedCopy`) <-> ``llm.model.*`` of ``Qwen2ForCausalLM``."""
    base = text_mapping(num_layers, tie_word_embeddings=True, torch_prefix="llm.model.", jax_prefix="llm.model.")
    emb = rule("llm.model.embed_tokens.weight", "llm.model.embed_tokens.embedding")
    tied = rule(("llm.model.embed_tokens.weight", "llm.lm_head.weight"), "llm.model.embed_tokens.embedding",
                TiedCopy(("llm.model.embed_tokens.weight", "llm.lm_head.weight")))
    rules = tuple(tied if r == emb else r for r in base.rules)
    return dataclasses.replace(base, name="unipic_llm", rules=rules)


def timm_block_rules(torch_prefix: str, jax_prefix: str, qkv: Transform = LINEAR) -> list[Rule]:
    """timm ViT ``Block``: norm1, attn.qkv (fused [3C, C], rows q|k|v), attn.proj, norm2, mlp.fc1, mlp.fc2."""
    rules = norm(f"{torch_prefix}.norm1", f"{jax_prefix}.norm1", bias=True)
    rules += norm(f"{torch_prefix}.norm2", f"{jax_prefix}.norm2", bias=True)
    for name in _TIMM_BLOCK_LINEARS:
        rules += linear(f"{torch_prefix}.{name}", f"{jax_prefix}.{name}", weight=qkv if name == "attn.qkv" else LINEAR)
    return rules


def mar_mapping(encoder_depth: int, decoder_depth: int, qkv: Transform = LINEAR) -> Mapping:
    """``mar.*`` without the diffusion head: MAR encoder/decoder, pos embeds, mask token, class / fake latent."""
    rules: list[Rule] = linear("mar.z_proj", "mar.z_proj")
    rules += norm("mar.z_proj_ln", "mar.z_proj_ln", bias=True)
    rules += timm_block_rules("mar.encoder_blocks.{e}", "mar.encoder_blocks.{e}", qkv)
    rules += norm("mar.encoder_norm", "mar.encoder_norm", bias=True)
    rules += linear("mar.decoder_embed", "mar.decoder_embed")
    rules += timm_block_rules("mar.decoder_blocks.{d}", "mar.decoder_blocks.{d}", qkv)
    rules += norm("mar.decoder_norm", "mar.decoder_norm", bias=True)
    rules += [rule(f"mar.{n}", f"mar.{n}") for n in _RAW]
    rules.append(rule("mar.class_emb.weight", "mar.class_emb.embedding"))
    return Mapping("unipic_mar", tuple(rules), (("e", encoder_depth), ("d", decoder_depth)))


def diffusion_head_mapping(depth: int, torch_prefix: str = "mar.diffloss.net.", jax_prefix: str = "mar.diffloss.net.",
                           ) -> Mapping:
    """``SimpleMLPAdaLN`` (MAR's DiffLoss.net): Sequential(Linear, SiLU, Linear) -> indices 0 / 2,
    Sequential(SiLU, Linear) -> index 1; the final LayerNorm is not affine (no tensors)."""
    t, j = torch_prefix, jax_prefix
    rules: list[Rule] = []
    for idx in (0, 2):
        rules += linear(f"{t}time_embed.mlp.{idx}", f"{j}time_embed.mlp.{idx}")
        rules += linear(f"{t}res_blocks.{{r}}.mlp.{idx}", f"{j}res_blocks.{{r}}.mlp.{idx}")
    rules += linear(f"{t}cond_embed", f"{j}cond_embed") + linear(f"{t}input_proj", f"{j}input_proj")
    rules += norm(f"{t}res_blocks.{{r}}.in_ln", f"{j}res_blocks.{{r}}.in_ln", bias=True)
    rules += linear(f"{t}res_blocks.{{r}}.adaLN_modulation.1", f"{j}res_blocks.{{r}}.adaLN_modulation.1")
    rules += linear(f"{t}final_layer.linear", f"{j}final_layer.linear")
    rules += linear(f"{t}final_layer.adaLN_modulation.1", f"{j}final_layer.adaLN_modulation.1")
    return Mapping("unipic_diffusion_head", tuple(rules), (("r", depth),))


def projector_mapping() -> Mapping:
    """``proj_in`` / ``proj_out``: Sequential(Linear, SiLU, Linear) <-> nnx.List [Linear, None, Linear]."""
    rules = [r for p in ("proj_in", "proj_out") for i in (0, 2) for r in linear(f"{p}.{i}", f"{p}.{i}")]
    return Mapping("unipic_projectors", tuple(rules))


def unipic_tables(llm_layers: int, encoder_depth: int, decoder_depth: int, head_depth: int,
                  qkv: Transform = LINEAR) -> Mapping:
    """The whole ``pytorch_model.bin`` minus ``siglip2*`` (see :data:`SKIP_PREFIXES`)."""
    return combine(
        "unipic1",
        llm_mapping(llm_layers),
        mar_mapping(encoder_depth, decoder_depth, qkv),
        diffusion_head_mapping(head_depth),
        projector_mapping(),
    )


def unipic_mapping(cfg: Any) -> Mapping:
    """Table for a ``configs.unipic.UniPicConfig`` (fields ``text``, ``mar``, ``head``)."""
    if not cfg.text.tie_word_embeddings:
        raise ConversionError("the UniPic-1 checkpoint ties lm_head to embed_tokens; the config must set "
                              "text.tie_word_embeddings=True")
    return unipic_tables(cfg.text.num_layers, cfg.mar.encoder_depth, cfg.mar.decoder_depth, cfg.head.depth)
