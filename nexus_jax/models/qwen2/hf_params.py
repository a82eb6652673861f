"""Copy a transformers Qwen2 / Qwen2.5-VL language-model state dict into a ``Qwen2ForCausalLM`` (kernels transposed).

Accepted key prefixes: ``model.language_model.`` (transformers 5 Qwen2.5-VL), ``model.`` (Qwen2 / 4.x layout) and
bare keys as in ``Qwen2_5_VLTextModel.state_dict()``; ``lm_head.weight`` if untied. ``visual.*`` keys are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

LAYER_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
_PREFIXES = ("model.language_model.", "language_model.", "model.")


def _strip(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _set(param: nnx.Param, value: np.ndarray, key: str) -> None:
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)} != model shape {tuple(param.shape)}")
    param[...] = jnp.asarray(value, dtype=param.dtype)


def load_hf_state_dict(model: nnx.Module, state_dict: Mapping[str, np.ndarray]) -> nnx.Module:
    """Fill ``model`` (a Qwen2ForCausalLM) in place from numpy arrays keyed like transformers; returns the model."""
    sd = {}
    for key, value in state_dict.items():
        if key == "lm_head.weight":
            sd[key] = np.asarray(value)
        elif not key.startswith(("visual.", "model.visual.")):
            sd[_strip(key)] = np.asarray(value)
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in sd:
            raise KeyError(f"checkpoint has no {key!r}")
        used.add(key)
        return sd[key]

    base = model.model
    _set(base.embed_tokens.embedding, take("embed_tokens.weight"), "embed_tokens.weight")
    _set(base.norm.weight, take("norm.weight"), "norm.weight")
    for i, layer in enumerate(base.layers):
        for name in LAYER_LINEARS:
            owner, attr = name.split(".")
            linear = getattr(getattr(layer, owner), attr)
            key = f"layers.{i}.{name}"
            _set(linear.kernel, take(f"{key}.weight").T, f"{key}.weight")
            if linear.bias is not None:
                _set(linear.bias, take(f"{key}.bias"), f"{key}.bias")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            _set(getattr(layer, norm).weight, take(f"layers.{i}.{norm}.weight"), f"layers.{i}.{norm}.weight")
    if model.lm_head is not None:
        _set(model.lm_head.kernel, take("lm_head.weight").T, "lm_head.weight")
    unused = sorted(set(sd) - used - {"lm_head.weight"})
    if unused:
        raise ValueError(f"{len(unused)} checkpoint keys were not used, e.g. {unused[:3]}")
    return model
