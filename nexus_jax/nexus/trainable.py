"""Which NexusGenAR parameters train, as nnx filters (optimizers then hold state only for those).

Every parameter belongs to exactly one group of :class:`configs.nexus_gen.TrainablePolicy`:

* ``vision_tower``: ``visual/*`` except the merger;   * ``vision_merger``: ``visual/merger/*``;
* ``llm``: ``language_model/model/*``;                 * ``lm_head``: ``language_model/lm_head/*``;
* ``vision_head``: ``vision_head/*``;                  * ``prefill_embeds``: ``image_prefill_embeds``.

A parameter outside these groups raises (new modules must be assigned a group, never silently frozen).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from configs.nexus_gen import TrainablePolicy

GROUPS: tuple[str, ...] = ("vision_tower", "vision_merger", "llm", "lm_head", "vision_head", "prefill_embeds")


def parameter_group(path: Sequence[Any]) -> str:
    """The policy group of a parameter path (tuple of keys from ``nnx.state``)."""
    keys = [str(getattr(k, "key", k)) for k in path]
    head = keys[0] if keys else ""
    if head == "visual":
        return "vision_merger" if len(keys) > 1 and keys[1] == "merger" else "vision_tower"
    if head == "language_model":
        return "lm_head" if len(keys) > 1 and keys[1] == "lm_head" else "llm"
    if head == "vision_head":
        return "vision_head"
    if head == "image_prefill_embeds":
        return "prefill_embeds"
    raise ValueError(f"parameter {'/'.join(keys)!r} belongs to no trainable group {GROUPS}")


def trainable_filter(policy: TrainablePolicy) -> nnx.filterlib.Filter:
    """nnx filter selecting the trainable ``nnx.Param``s under ``policy``."""
    enabled = frozenset(g for g in GROUPS if getattr(policy, g))

    def is_trainable(path, value) -> bool:
        return isinstance(value, nnx.Param) and parameter_group(path) in enabled

    return is_trainable


def frozen_filter(policy: TrainablePolicy) -> nnx.filterlib.Filter:
    """Complement of :func:`trainable_filter` among ``nnx.Param``s."""
    train = trainable_filter(policy)
    return lambda path, value: isinstance(value, nnx.Param) and not train(path, value)


def make_optimizer(model: nnx.Module, tx: Any, policy: TrainablePolicy) -> nnx.Optimizer:
    """``nnx.Optimizer`` over the trainable parameters only."""
    return nnx.Optimizer(model, tx, wrt=trainable_filter(policy))


def parameter_counts(model: nnx.Module, policy: TrainablePolicy) -> dict[str, int]:
    """Parameter count per group plus ``trainable`` / ``frozen`` totals."""
    counts = dict.fromkeys(GROUPS, 0)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        counts[parameter_group(path)] += int(np.prod(var.get_value().shape))
    counts["trainable"] = sum(counts[g] for g in GROUPS if getattr(policy, g))
    counts["frozen"] = sum(counts[g] for g in GROUPS if not getattr(policy, g))
    return counts


def optimizer_state_size(optimizer: nnx.Optimizer) -> int:
    """Number of array elements the optimizer holds (moments etc.; step counters included)."""
    leaves = jax.tree.leaves(nnx.state(optimizer.opt_state))
    return int(sum(np.prod(getattr(x, "shape", ())) for x in leaves))
