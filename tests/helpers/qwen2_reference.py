"""Matching transformers reference models for parity tests and benchmarks (needs torch + transformers).

``reference_pair(config)`` builds a random transformers model from a :class:`Qwen2TextConfig` (a
``Qwen2_5_VLForConditionalGeneration`` with a one-block vision tower when ``mrope_section`` is set, else
``Qwen2ForCausalLM``) and a JAX ``Qwen2ForCausalLM`` holding the same weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from configs.qwen2_5 import Qwen2TextConfig
from conversion import load
from nexus_jax.models.qwen2.model import Qwen2ForCausalLM


def text_config_kwargs(config: Qwen2TextConfig) -> dict[str, Any]:
    """transformers ``Qwen2Config`` / ``Qwen2_5_VLTextConfig`` keyword arguments for ``config``."""
    if config.hidden_size != config.num_heads * config.head_dim:
        raise ValueError(
            f"transformers derives head_dim from hidden_size / num_heads; hidden_size={config.hidden_size} != "
            f"num_heads * head_dim = {config.num_heads * config.head_dim}"
        )
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.mrope_section is not None:
        rope["mrope_section"] = list(config.mrope_section)
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_parameters": rope,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }


_text_kwargs = text_config_kwargs  # old private name, still imported by callers


def build_hf_model(config: Qwen2TextConfig, *, seed: int = 0, std: float = 0.08, attn_implementation: str = "sdpa"):
    """A float32 transformers model with all weights drawn from N(0, std) (norm weights around 1)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

    text = text_config_kwargs(config)
    if config.mrope_section is not None:
        hf_config = Qwen2_5_VLConfig(
            text_config=text,
            vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 32, "num_heads": 2,
                           "out_hidden_size": config.hidden_size},
            tie_word_embeddings=config.tie_word_embeddings,
        )
        cls = Qwen2_5_VLForConditionalGeneration
    else:
        hf_config = Qwen2Config(**text)
        cls = Qwen2ForCausalLM
    hf_config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = cls(hf_config).eval().float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + std * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return model


def hf_state_dict_numpy(hf_model) -> dict[str, np.ndarray]:
    """The model's state dict as float32 numpy arrays."""
    return {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}


def reference_pair(config: Qwen2TextConfig, *, seed: int = 0, std: float = 0.08):
    """(transformers model, JAX Qwen2ForCausalLM) with identical weights."""
    hf_model = build_hf_model(config, seed=seed, std=std)
    model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(seed))
    load.qwen2_text(model, hf_state_dict_numpy(hf_model))
    return hf_model, model
