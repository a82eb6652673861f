"""A random transformers Qwen2.5-VL matching a :class:`Qwen25VLConfig`, plus a JAX twin with the same weights.

For parity tests and benchmarks only (needs torch + transformers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.qwen2_5_vl import Qwen25VisionConfig, Qwen25VLConfig
from conversion import load
from nexus_jax.models.qwen2_5_vl.model import Qwen25VLForConditionalGeneration
from nexus_jax.models.qwen2_5_vl.vision import Qwen25VisionTransformer
from tests.helpers.qwen2_reference import _text_kwargs, hf_state_dict_numpy


def randomize_(module, std: float, seed: int) -> None:
    """In place: weights ~ N(0, std), norm weights ~ 1 + N(0, std)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            p.copy_(1.0 + noise if "norm" in name or "ln_q" in name or "layernorm" in name else noise)


def build_hf_vision(config: Qwen25VisionConfig, *, seed: int = 0, std: float = 0.2, attn_implementation="sdpa"):
    """A float32 transformers Qwen2_5_VisionTransformerPretrainedModel with random weights."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    hf_config = Qwen2_5_VLVisionConfig(**config.to_hf_dict())
    hf_config._attn_implementation = attn_implementation
    model = Qwen2_5_VisionTransformerPretrainedModel(hf_config).eval().float()
    randomize_(model, std, seed)
    return model


def build_hf_vl(config: Qwen25VLConfig, *, seed: int = 0, std: float = 0.08, attn_implementation="sdpa"):
    """A float32 transformers Qwen2_5_VLForConditionalGeneration with random weights and the config's token ids."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = config.tokens
    hf_config = Qwen2_5_VLConfig(
        text_config=_text_kwargs(config.text),
        vision_config=config.vision.to_hf_dict(),
        image_token_id=tok.image_pad,
        video_token_id=tok.video_pad,
        vision_start_token_id=tok.vision_start,
        vision_end_token_id=tok.vision_end,
        tie_word_embeddings=config.text.tie_word_embeddings,
    )
    hf_config._attn_implementation = attn_implementation
    model = Qwen2_5_VLForConditionalGeneration(hf_config).eval().float()
    randomize_(model, std, seed)
    return model


def zeros_like_module(ctor):
    """Build an nnx module with all-zero parameters without running its random init (no per-op compiles).

    For modules whose every parameter is then overwritten from a checkpoint.
    """
    graphdef, abstract = nnx.split(nnx.eval_shape(ctor))
    state = jax.tree.map(lambda a: jnp.asarray(np.zeros(a.shape, a.dtype)), abstract)
    return nnx.merge(graphdef, state)


def reference_vision_pair(config: Qwen25VisionConfig, *, seed: int = 0, std: float = 0.2):
    """(transformers Qwen2.5-VL ViT, JAX Qwen25VisionTransformer) holding identical random weights."""
    hf_model = build_hf_vision(config, seed=seed, std=std)
    model = zeros_like_module(lambda: Qwen25VisionTransformer(config, rngs=nnx.Rngs(seed)))
    load.qwen2_5_vision(model, hf_state_dict_numpy(hf_model))
    return hf_model, model


def reference_vl_pair(config: Qwen25VLConfig, *, seed: int = 0, std: float = 0.08):
    """(transformers Qwen2.5-VL, JAX Qwen25VLForConditionalGeneration) holding identical random weights."""
    hf_model = build_hf_vl(config, seed=seed, std=std)
    model = zeros_like_module(lambda: Qwen25VLForConditionalGeneration(config, rngs=nnx.Rngs(seed)))
    load.qwen2_5_vl(model, hf_state_dict_numpy(hf_model))
    return hf_model, model


__all__ = [
    "build_hf_vision", "build_hf_vl", "randomize_", "reference_vision_pair", "reference_vl_pair", "zeros_like_module",
]
