"""AdamW with warmup + cosine/constant schedule and global-norm clipping; trainable-subset filters for nnx."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx

from configs.training import OptimConfig


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warmup 0 -> lr over ``warmup_steps``, then cosine to ``lr * min_lr_ratio`` at ``decay_steps``
    (or constant)."""
    if cfg.schedule == "constant":
        warm = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
        return optax.join_schedules([warm, optax.constant_schedule(cfg.learning_rate)], [cfg.warmup_steps])
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.decay_steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices only (no decay on biases, norm scales or other 1-D parameters)."""
    return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """clip_by_global_norm (optional) -> AdamW(schedule). Gradient accumulation is done by the train step."""
    parts = []
    if cfg.clip_norm is not None:
        if cfg.clip_norm <= 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {cfg.clip_norm}")
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            learning_rate=learning_rate_schedule(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=_decay_mask,
        )
    )
    return optax.chain(*parts)


def path_string(path: tuple[Any, ...]) -> str:
    """nnx path tuple -> 'a/b/0/kernel'."""
    return "/".join(str(getattr(p, "key", p)) for p in path)


def trainable_filter(cfg: OptimConfig) -> Callable[[tuple[Any, ...], Any], bool]:
    """nnx filter: an ``nnx.Param`` whose path matches a ``trainable`` pattern and no ``frozen`` pattern."""
    train_res = [re.compile(p) for p in cfg.trainable]
    frozen_res = [re.compile(p) for p in cfg.frozen]

    def keep(path: tuple[Any, ...], value: Any) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        s = path_string(path)
        return any(r.search(s) for r in train_res) and not any(r.search(s) for r in frozen_res)

    return keep


def split_trainable(model: nnx.Module, cfg: OptimConfig) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable params, everything else). Raises if the patterns select no parameter."""
    graphdef, trainable, rest = nnx.split(model, trainable_filter(cfg), ...)
    if not jax.tree.leaves(trainable):
        raise ValueError(
            f"trainable patterns {cfg.trainable} minus frozen {cfg.frozen} select no parameter of "
            f"{type(model).__name__}"
        )
    return graphdef, trainable, rest

