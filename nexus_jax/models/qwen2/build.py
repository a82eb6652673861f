"""Build a Qwen2.5 text decoder, optionally straight into its shardings, with a mesh / head divisibility check.

Rule: every mesh axis that a rules table assigns to a parameter dimension must divide that dimension, except the
``vocab`` dimension (an odd vocabulary is simply replicated). For the heads this means the ``tensor`` axis must divide
``num_heads * head_dim`` and ``num_kv_heads * head_dim`` (the flattened projection widths; whole heads need not split
evenly, XLA re-shards the [B, L, H, D] activations), and ``intermediate_size``; under TRAIN_RULES ``fsdp`` must
divide ``hidden_size``.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from configs.qwen2_5 import Qwen2TextConfig
from nexus_jax import sharding
from nexus_jax.models.qwen2.model import Qwen2ForCausalLM

# logical axis -> the config quantity it measures (for error messages)
_DIM_NAMES = {
    "heads": "num_heads * head_dim",
    "kv_heads": "num_kv_heads * head_dim",
    "mlp": "intermediate_size",
    "embed": "hidden_size",
    "norm": "hidden_size",
}
REPLICATE_IF_INDIVISIBLE = ("vocab",)


def check_mesh(config: Qwen2TextConfig, mesh: Mesh, rules: sharding.Rules) -> None:
    """Raise ValueError naming the dimension and mesh axis size if ``mesh`` cannot shard the model under ``rules``."""
    sharding.validate_rules(rules)
    table = dict(rules)
    abstract = nnx.eval_shape(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        logical = var.get_metadata().get("out_sharding") or ()
        for dim, name in zip(var.shape, logical, strict=True):
            if name is None or name in REPLICATE_IF_INDIVISIBLE:
                continue
            axes = table.get(name)
            axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
            size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
            if dim % size:
                what = _DIM_NAMES.get(name, name)
                where = ".".join(str(p) for p in path)
                raise ValueError(
                    f"mesh axes {axes} (size {size}) do not divide {what} = {dim} "
                    f"(logical axis {name!r} of parameter {where}); choose a mesh whose {'x'.join(axes)} size "
                    f"divides {dim}"
                )


def create_model(
    config: Qwen2TextConfig,
    *,
    seed: int = 0,
    mesh: Mesh | None = None,
    rules: sharding.Rules = sharding.TRAIN_RULES,
) -> Qwen2ForCausalLM:
    """A randomly initialised model; with ``mesh`` it is initialised abstractly and materialised sharded."""

    def ctor() -> Qwen2ForCausalLM:
        return Qwen2ForCausalLM(config, rngs=nnx.Rngs(seed))

    if mesh is None:
        return ctor()
    check_mesh(config, mesh, rules)
    return sharding.create_sharded(ctor, mesh, rules)


def param_count(model: nnx.Module) -> int:
    """Number of parameter scalars."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
