"""The training loop shared by the AR and decoder trainers.

A :class:`TrainTask` supplies the model constructor, the loss, the data iterators and the frozen parameter patterns;
:func:`train` does the rest: sharded init, resume (``none | latest | latest-valid | <step>``), the jitted donated
step over the mesh, metrics, periodic eval and async checkpoints (model, optimiser, step, PRNG, data iterator).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx

from configs.training import TrainConfig
from nexus_jax import paths, sharding
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
    # abstract {"params", "frozen"} (ShapeDtypeStructs with shardings) -> loaded ones, e.g. converted weights
    init_params: Callable[[dict[str, Any]], dict[str, Any]] | None = None


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


def _allgather(x: np.ndarray) -> np.ndarray:
    """Every process's ``x`` stacked in process order (identity on one process). Must be called by all processes."""
    if jax.process_count() == 1:
        return np.asarray(x)[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=False))


def max_over_processes(n: int) -> int:
    """The largest ``n`` over all processes (e.g. the longest sequence of a global batch)."""
    return int(_allgather(np.asarray(n, np.int64)).max())


def global_data_state(batches: BatchIterator) -> dict[str, Any]:
    """The iterator state saved with a checkpoint, independent of the number of processes: batches done and the
    skip / record counters summed over processes (collective)."""
    state = batches.get_state()
    counts = _allgather(np.asarray([state["skipped"], state["records"]], np.int64)).sum(axis=0)
    return {"batches": int(state["batches"]), "position": int(state["position"]), "skipped": int(counts[0]),
            "records": int(counts[1]), "process_count": jax.process_count()}


def restore_data_state(batches: BatchIterator, saved: dict[str, Any]) -> None:
    """Place ``batches`` at a saved global state (counters kept on process 0 so that sums stay global)."""
    if batches.filler is None and int(saved.get("process_count", 1)) != jax.process_count():
        raise ValueError(f"this data iterator cannot resume a checkpoint of {saved.get('process_count')} processes on "
                         f"{jax.process_count()}: give the task a filler")
    primary = jax.process_index() == 0
    batches.set_state({**saved, "skipped": saved["skipped"] if primary else 0,
                       "records": saved["records"] if primary else 0})


class _QuietWriter:
    """Stand-in for :class:`MetricsWriter` on processes other than 0 (one writer per run directory)."""

    def event(self, name: str, **fields: Any) -> None:
        pass

    def step(self, step: int, metrics: dict[str, Any], **_: Any) -> dict[str, float]:
        return {k: float(np.asarray(v)) for k, v in metrics.items()}

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def _global_shapes(batch: Batch, axes) -> dict[str, jax.ShapeDtypeStruct]:
    """The global shape of each host array: its ``"batch"`` axis times the number of processes."""
    pc = jax.process_count()
    out = {}
    for k, v in batch.items():
        shape = list(np.shape(v))
        logical = axes(k, len(shape))
        if "batch" in logical:
            shape[logical.index("batch")] *= pc
        out[k] = jax.ShapeDtypeStruct(tuple(shape), np.asarray(v).dtype)
    return out


def _global_batch(batch: Batch, shardings: dict[str, Any], axes=None) -> dict[str, jax.Array]:
    """Per-process numpy batch -> global jax.Arrays laid out per ``shardings`` (multi-host safe).

    With several processes every array must be split over the processes along its ``"batch"`` axis (``axes(name,
    ndim)``); an array whose batch dimension does not divide over the data-parallel devices would be replicated and
    silently take one process's rows for everyone's, so that raises instead.
    """
    out = {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in batch.items()}
    pc = jax.process_count()
    if pc > 1 and axes is not None:
        for k, v in batch.items():
            logical = axes(k, np.ndim(v))
            if "batch" in logical:
                ax = logical.index("batch")
                if out[k].shape[ax] != np.shape(v)[ax] * pc:
                    mesh = shardings[k].mesh
                    dp = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
                    raise ValueError(
                        f"input {k!r}: {np.shape(v)[ax] * pc} rows per (micro-)batch do not split over the {dp} "
                        f"data-parallel devices (data x fsdp) of {pc} processes; use a batch size (per micro-batch) "
                        f"that is a multiple of {dp}")
    return out


def train(
    cfg: TrainConfig,
    task: TrainTask,
    run_dir: str | os.PathLike,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding.Rules = sharding.TRAIN_RULES,
    step_delay_s: float = 0.0,
) -> TrainResult:
    """Run ``cfg.loop.total_steps`` optimiser steps (resuming per ``cfg.checkpoint.resume``)."""
    run_dir = paths.as_path(run_dir)  # local path or gs:// URL
    batches = task.make_batches(cfg.data.seed)  # first: a bad data path fails before any compilation
    mesh = mesh or sharding.mesh_from_config(cfg.mesh)
    optim = dataclasses.replace(cfg.optim, frozen=cfg.optim.frozen + task.frozen)
    graphdef, state, abstract = state_lib.init_train_state(task.model_ctor, optim, mesh, rules, cfg.loop.seed)
    state_sh = jax.tree.map(lambda a: a.sharding, abstract)
    if task.init_params is not None:  # start from given weights (a resumed checkpoint below still wins)
        state = {**state, **task.init_params({k: abstract[k] for k in ("params", "frozen")})}

    ckpt_dir = cfg.checkpoint.directory
    ckpt_dir = paths.as_path(ckpt_dir) if paths.is_remote(ckpt_dir) or os.path.isabs(ckpt_dir) else run_dir / ckpt_dir
    ckpt = Checkpointer(ckpt_dir, keep_last=cfg.checkpoint.keep_last, async_save=cfg.checkpoint.async_save)
    resumed = ckpt.resolve(cfg.checkpoint.resume)
    if resumed is not None:
        state, data_state = ckpt.restore(resumed, abstract)
        restore_data_state(batches, data_state)
        log.info("resumed from step %d of %s (written by %s process(es))", resumed, ckpt_dir,
                 data_state.get("process_count", "?"))
    start = int(np.asarray(state["step"]))

    primary = jax.process_index() == 0
    writer = MetricsWriter(run_dir, cfg.loop.log_every, cfg.loop.log_dir) if primary else _QuietWriter()
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
                    batch_sh = state_lib.batch_shardings(_global_shapes(host_batch, task.batch_axes), mesh, rules,
                                                         task.batch_axes)
                    jitted[key] = (state_lib.jit_train_step(step_fn, state_sh, batch_sh), batch_sh)
                fn, batch_sh = jitted[key]
                state, metrics = fn(state, _global_batch(host_batch, batch_sh, task.batch_axes))
                # one all-gather per step: token / skip counters summed over processes, and the global batch's
                # record ids in row order (process 0 logs them)
                local = np.asarray([task.count_tokens(host_batch), batches.skipped, *(record_ids or [])], np.int64)
                gathered = _allgather(local)
                tokens, skipped = gathered[:, :2].sum(0)
                if record_ids is not None:
                    record_ids = gathered[:, 2:].reshape(-1).tolist()
                host = writer.step(step + 1, metrics, tokens=int(tokens), records=len(record_ids or []),
                                   record_ids=record_ids, skipped=int(skipped))
                losses[step + 1] = host["loss"]
                if do_eval and (step + 1) % cfg.loop.eval_every == 0:
                    evals[step + 1] = evaluate(eval_fn, state, task, cfg.loop.eval_batches, mesh, rules)
                    writer.eval(step + 1, evals[step + 1])
                if (step + 1) % cfg.checkpoint.every_steps == 0 or step + 1 == cfg.loop.total_steps:
                    ckpt.save(step + 1, state, global_data_state(batches))
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
        def axes(k, nd):
            return task.batch_axes(k, nd + 1)[1:] if task.micro_batched else task.batch_axes(k, nd)

        sh = state_lib.batch_shardings(_global_shapes(batch, axes), mesh, rules, axes)
        out = eval_fn(state, _global_batch(batch, sh, axes))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(np.asarray(v))
        n += 1
    return {k: v / max(n, 1) for k, v in sums.items()}
