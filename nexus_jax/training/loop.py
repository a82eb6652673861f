"""The training loop shared by the AR and decoder trainers.

A :class:`TrainTask` supplies the model constructor, the loss, the data iterators and the frozen parameter patterns;
:func:`train` does the rest: sharded init, resume (``none | latest | latest-valid | <step>``), the jitted donated
step over the mesh, metrics, periodic eval and async checkpoints (model, optimiser, step, PRNG, data iterator).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from configs.training import TrainConfig
from nexus_jax import sharding
from nexus_jax.data.pipeline import Batch, BatchIterator
from nexus_jax.training import state as state_lib
from nexus_jax.training.checkpoint import Checkpointer
from nexus_jax.training.metrics import MetricsWriter

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainTask:
    """What a trainer needs from a model family.

    ``make_batches(seed)`` builds the (checkpointable) training iterator; ``make_eval_batches()`` a fresh iterator
    over evaluation data (or None). ``count_tokens(batch)`` feeds the tokens/s metric. ``frozen`` patterns are added
    to the optimiser config's (e.g. the ViT, the VAE).
    """

    name: str
    model_ctor: Callable[[], nnx.Module]
    loss_fn: state_lib.LossFn
    make_batches: Callable[[int], BatchIterator]
    make_eval_batches: Callable[[], Iterator[Batch]] | None = None
    count_tokens: Callable[[Batch], int] = lambda b: 0
    frozen: tuple[str, ...] = ()
    batch_axes: Callable[[str, int], tuple[str | None, ...]] = state_lib.batch_major
    micro_batched: bool = False


@dataclasses.dataclass
class TrainResult:
    final_step: int
    resumed_from: int | None
    losses: dict[int, float]
    state: Any
    evals: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)


def local_batch_size(global_batch: int) -> int:
    """Records each process loads per step (the global batch is split evenly over processes)."""
    pc = jax.process_count()
    if global_batch % pc:
        raise ValueError(f"global batch_size={global_batch} is not divisible by the {pc} processes")
    return global_batch // pc


def _global_batch(batch: Batch, shardings: dict[str, Any]) -> dict[str, jax.Array]:
    """Per-process numpy batch -> global jax.Arrays laid out per ``shardings`` (multi-host safe)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in batch.items()}


def train(
    cfg: TrainConfig,
    task: TrainTask,
    run_dir: str | Path,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding.Rules = sharding.TRAIN_RULES,
    step_delay_s: float = 0.0,
) -> TrainResult:
    """Run ``cfg.loop.total_steps`` optimiser steps (resuming per ``cfg.checkpoint.resume``)."""
    run_dir = Path(run_dir)
    batches = task.make_batches(cfg.data.seed)  # first: a bad data path fails before any compilation
    mesh = mesh or cfg.mesh.build()
    optim = dataclasses.replace(cfg.optim, frozen=cfg.optim.frozen + task.frozen)
    graphdef, state, abstract = state_lib.init_train_state(task.model_ctor, optim, mesh, rules, cfg.loop.seed)
    state_sh = jax.tree.map(lambda a: a.sharding, abstract)

    ckpt_dir = Path(cfg.checkpoint.directory)
    ckpt_dir = ckpt_dir if ckpt_dir.is_absolute() else run_dir / ckpt_dir
    ckpt = Checkpointer(ckpt_dir, keep_last=cfg.checkpoint.keep_last, async_save=cfg.checkpoint.async_save)
    resumed = ckpt.resolve(cfg.checkpoint.resume)
    if resumed is not None:
        state, data_state = ckpt.restore(resumed, abstract)
        batches.set_state(data_state)
        log.info("resumed from step %d of %s", resumed, ckpt_dir)
    start = int(np.asarray(state["step"]))

    writer = MetricsWriter(run_dir, cfg.loop.log_every, cfg.loop.log_dir)
    writer.event("start", resumed_from=resumed, step=start, task=task.name)
    step_fn = state_lib.make_train_step(graphdef, task.loss_fn, optim, cfg.loop.compute_dtype, task.micro_batched)
    eval_fn = jax.jit(state_lib.make_eval_step(graphdef, task.loss_fn, cfg.loop.compute_dtype))
    jitted: dict[Any, Any] = {}
    losses: dict[int, float] = {}
    evals: dict[int, dict[str, float]] = {}
    do_eval = bool(cfg.loop.eval_every and task.make_eval_batches)
    try:
        with sharding.sharding_context(mesh, rules):
            if do_eval and start == 0:  # baseline before any update
                evals[0] = evaluate(eval_fn, state, task, cfg.loop.eval_batches, mesh, rules)
                writer.eval(0, evals[0])
            for step in range(start, cfg.loop.total_steps):
                host_batch = next(batches)
                record_ids = host_batch.pop("record_id").tolist() if "record_id" in host_batch else None
                key = tuple((k, v.shape, v.dtype.str) for k, v in sorted(host_batch.items()))
                if key not in jitted:
                    batch_sh = state_lib.batch_shardings(host_batch, mesh, rules, task.batch_axes)
                    jitted[key] = (state_lib.jit_train_step(step_fn, state_sh, batch_sh), batch_sh)
                fn, batch_sh = jitted[key]
                state, metrics = fn(state, _global_batch(host_batch, batch_sh))
                host = writer.step(step + 1, metrics, tokens=task.count_tokens(host_batch),
                                   records=len(record_ids or []), record_ids=record_ids, skipped=batches.skipped)
                losses[step + 1] = host["loss"]
                if do_eval and (step + 1) % cfg.loop.eval_every == 0:
                    evals[step + 1] = evaluate(eval_fn, state, task, cfg.loop.eval_batches, mesh, rules)
                    writer.eval(step + 1, evals[step + 1])
                if (step + 1) % cfg.checkpoint.every_steps == 0 or step + 1 == cfg.loop.total_steps:
                    ckpt.save(step + 1, state, batches.get_state())
                if step_delay_s:
                    time.sleep(step_delay_s)
    finally:
        ckpt.close()
        writer.close()
    return TrainResult(int(np.asarray(state["step"])), resumed, losses, state, evals)


def evaluate(eval_fn, state, task: TrainTask, num_batches: int, mesh, rules) -> dict[str, float]:
    """Mean of the eval metrics over up to ``num_batches`` batches of ``task.make_eval_batches()``."""
    sums: dict[str, float] = {}
    n = 0
    for batch in task.make_eval_batches():
        if n >= num_batches:
            break
        batch = dict(batch)
        batch.pop("record_id", None)
        if task.micro_batched:  # evaluate the first micro-batch of each batch
            batch = {k: v[0] for k, v in batch.items()}
        sh = state_lib.batch_shardings(batch, mesh, rules, lambda k, nd: task.batch_axes(k, nd + 1)[1:]
                                       if task.micro_batched else task.batch_axes(k, nd))
        out = eval_fn(state, _global_batch(batch, sh))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(np.asarray(v))
        n += 1
    return {k: v / max(n, 1) for k, v in sums.items()}
