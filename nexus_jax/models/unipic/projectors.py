"""UniPic-1 MAR <-> LLM projectors, torch ``Sequential(Linear, SiLU, Linear)`` layout (weights at indices 0 and 2).

``proj_in``: Linear(C_mar -> D) - SiLU - Linear(D -> D), MAR-encoder features [..., C_mar] -> LLM embeddings [..., D].
``proj_out``: Linear(D -> D) - SiLU - Linear(D -> C_mar), LLM hidden states [..., D] -> MAR residual [..., C_mar].
Apply either with :func:`project` (= flux ``silu_mlp``).
"""

from __future__ import annotations

from flax import nnx

from configs.mar import MARConfig
from nexus_jax.models.flux.embeddings import make_silu_mlp, silu_mlp

project = silu_mlp


def make_proj_in(cfg: MARConfig, *, rngs: nnx.Rngs) -> nnx.List:
    """``proj_in`` [Linear(width, llm_hidden), None, Linear(llm_hidden, llm_hidden)]."""
    return make_silu_mlp(cfg.width, cfg.llm_hidden, param_dtype=cfg.param_dtype, dtype=cfg.dtype, rngs=rngs,
                         in_axes=("embed", "mlp"), out_axes=("mlp", "embed"))


def make_proj_out(cfg: MARConfig, *, rngs: nnx.Rngs) -> nnx.List:
    """``proj_out`` [Linear(llm_hidden, llm_hidden), None, Linear(llm_hidden, width)]."""
    return make_silu_mlp(cfg.llm_hidden, cfg.width, hidden_dim=cfg.llm_hidden, param_dtype=cfg.param_dtype,
                         dtype=cfg.dtype, rngs=rngs, in_axes=("embed", "mlp"), out_axes=("mlp", "embed"))
