"""Load HF (transformers) Qwen2.5-VL vision weights into :class:`Qwen25VisionTransformer` (numpy arrays in).

Mapping (HF key under ``visual.`` -> nnx path; torch Linear weight [out, in] -> kernel [in, out]):

- ``patch_embed.proj.weight`` [C, 3, T, P, P] -> ``patch_embed.proj.kernel`` = reshape(C, -1).T
- ``blocks.i.attn.qkv.weight`` [3C, C] -> ``blocks.i.attn.qkv.kernel`` = W.T.reshape(C, 3, C); bias [3C] -> [3, C]
- ``blocks.i.{norm1,norm2}.weight``, ``blocks.i.attn.proj``, ``blocks.i.mlp.{gate,up,down}_proj``: same names
- ``merger.ln_q.weight``: same name; ``merger.mlp.0`` -> ``merger.mlp_0``; ``merger.mlp.2`` -> ``merger.mlp_2``
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from nexus_jax.models.qwen2_5_vl.vision import Qwen25VisionTransformer


def _set(param, value: np.ndarray, key: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise ValueError(f"{key}: expected shape {tuple(param.shape)}, checkpoint has {tuple(value.shape)}")
    param.set_value(jnp.asarray(value, dtype=param.dtype))


def _linear(module, sd: Mapping[str, np.ndarray], key: str) -> None:
    _set(module.kernel, np.asarray(sd[f"{key}.weight"]).T, f"{key}.weight")
    if module.bias is not None:
        _set(module.bias, np.asarray(sd[f"{key}.bias"]), f"{key}.bias")


def load_hf_vision(model: Qwen25VisionTransformer, state_dict: Mapping[str, np.ndarray], prefix: str = "") -> None:
    """Copy an HF vision state dict (numpy values; keys optionally under ``prefix``, e.g. "visual.") into ``model``."""
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    d = model.config.hidden_size
    w = np.asarray(sd["patch_embed.proj.weight"])
    _set(model.patch_embed.proj.kernel, w.reshape(w.shape[0], -1).T, "patch_embed.proj.weight")
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}"
        _set(block.norm1.weight, np.asarray(sd[f"{p}.norm1.weight"]), f"{p}.norm1.weight")
        _set(block.norm2.weight, np.asarray(sd[f"{p}.norm2.weight"]), f"{p}.norm2.weight")
        qkv_w = np.asarray(sd[f"{p}.attn.qkv.weight"])
        _set(block.attn.qkv.kernel, qkv_w.T.reshape(d, 3, d), f"{p}.attn.qkv.weight")
        _set(block.attn.qkv.bias, np.asarray(sd[f"{p}.attn.qkv.bias"]).reshape(3, d), f"{p}.attn.qkv.bias")
        _linear(block.attn.proj, sd, f"{p}.attn.proj")
        for name in ("gate_proj", "up_proj", "down_proj"):
            _linear(getattr(block.mlp, name), sd, f"{p}.mlp.{name}")
    _set(model.merger.ln_q.weight, np.asarray(sd["merger.ln_q.weight"]), "merger.ln_q.weight")
    _linear(model.merger.mlp_0, sd, "merger.mlp.0")
    _linear(model.merger.mlp_2, sd, "merger.mlp.2")


def load_hf_vl(model, state_dict: Mapping[str, np.ndarray]) -> None:
    """Fill a :class:`Qwen25VLForConditionalGeneration` from a transformers state dict (5.x ``model.visual.`` /
    ``model.language_model.`` keys, or 4.x ``visual.`` / ``model.`` keys) of numpy arrays."""
    from nexus_jax.models.qwen2.hf_params import load_hf_state_dict

    prefix = "model.visual." if any(k.startswith("model.visual.") for k in state_dict) else "visual."
    load_hf_vision(model.visual, state_dict, prefix=prefix)
    load_hf_state_dict(model.language_model, state_dict)
