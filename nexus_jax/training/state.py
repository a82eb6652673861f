"""Train state (a plain pytree dict) built directly into its shardings, and the jitted train / eval steps.

State layout::

    {"step": int32[], "params": nnx.State (trainable), "frozen": nnx.State (everything else),
     "opt_state": optax state (mirrors "params", so it inherits their logical axes), "rng": uint32[2] key data}

Batches are dicts of arrays whose leading axis is the global batch ``accum * micro``; the step splits it into
``grad_accum`` micro-batches and accumulates gradients with ``lax.scan`` (one optimiser update per call).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs.training import OptimConfig
from nexus_jax import sharding
from nexus_jax.training.optim import learning_rate_schedule, make_optimizer, split_trainable

TrainState = dict[str, Any]
# loss_fn(model, micro_batch, rng) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[nnx.Module, dict[str, jax.Array], jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def init_train_state(
    ctor: Callable[[], nnx.Module],
    optim: OptimConfig,
    mesh: Mesh,
    rules: sharding.Rules,
    seed: int,
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """Build the train state directly into its shardings.

    Returns (graphdef, state, abstract_state); ``abstract_state`` holds ShapeDtypeStructs carrying the current mesh's
    shardings and is the restore target for checkpoints (restoring onto a different mesh reshards).
    """
    tx = make_optimizer(optim)

    def build() -> TrainState:
        _, params, frozen = split_trainable(ctor(), optim)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "frozen": frozen,
            "opt_state": tx.init(params),
            "rng": jax.random.key_data(jax.random.key(seed)),
        }

    graphdef = split_trainable(nnx.eval_shape(ctor), optim)[0]
    abstract = jax.eval_shape(build)
    shardings = state_shardings(abstract, mesh, rules)
    state = jax.jit(build, out_shardings=shardings)()
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return graphdef, state, abstract


def init_from_module(
    model: nnx.Module,
    optim: OptimConfig,
    mesh: Mesh,
    rules: sharding.Rules,
    seed: int,
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """Like :func:`init_train_state`, but starting from an existing module's weights (e.g. a converted checkpoint)."""
    tx = make_optimizer(optim)
    graphdef, params, frozen = split_trainable(model, optim)

    def build(params: nnx.State, frozen: nnx.State) -> TrainState:
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "frozen": frozen,
            "opt_state": tx.init(params),
            "rng": jax.random.key_data(jax.random.key(seed)),
        }

    abstract = jax.eval_shape(build, params, frozen)
    shardings = state_shardings(abstract, mesh, rules)
    state = jax.jit(build, out_shardings=shardings)(params, frozen)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return graphdef, state, abstract


def state_shardings(state: TrainState, mesh: Mesh, rules: sharding.Rules) -> TrainState:
    """NamedShardings for every leaf: parameters and optimiser moments by their logical axes, scalars replicated."""
    out = sharding.state_shardings(state, mesh, rules)
    return jax.tree.map(
        lambda x: x if isinstance(x, NamedSharding) else NamedSharding(mesh, PartitionSpec()),
        out,
    )


def _cast_floats(tree: Any, dtype: jnp.dtype) -> Any:
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _split_micro(batch: dict[str, jax.Array], accum: int) -> dict[str, jax.Array]:
    def one(x: jax.Array) -> jax.Array:
        if x.shape[0] % accum:
            raise ValueError(f"batch dimension {x.shape[0]} is not divisible by grad_accum={accum}")
        return x.reshape(accum, x.shape[0] // accum, *x.shape[1:])

    return jax.tree.map(one, batch)


def make_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    optim: OptimConfig,
    compute_dtype: str = "float32",
    micro_batched: bool = False,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """A pure ``step(state, batch) -> (state, metrics)``; jit it with :func:`jit_train_step`.

    ``micro_batched``: every batch array already has a leading ``[grad_accum]`` axis (used when micro-batches carry
    non-batch-major arrays, e.g. packed ViT inputs); otherwise the leading batch axis is split here.

    Metrics: ``loss``, each loss part returned by ``loss_fn`` (mean over micro-batches), ``grad_norm`` (before
    clipping) and ``learning_rate`` (the value used for this update).
    """
    tx = make_optimizer(optim)
    schedule = learning_rate_schedule(optim)
    dtype = jnp.dtype(compute_dtype)
    accum = optim.grad_accum

    def micro_loss(params, frozen, mb, rng):
        model = nnx.merge(graphdef, _cast_floats(params, dtype), _cast_floats(frozen, dtype))
        loss, parts = loss_fn(model, mb, rng)
        return loss.astype(jnp.float32), {k: v.astype(jnp.float32) for k, v in parts.items()}

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        key = jax.random.wrap_key_data(state["rng"])
        key, step_key = jax.random.split(key)
        micro = batch if micro_batched else _split_micro(batch, accum)
        for name, x in micro.items():
            if x.shape[0] != accum:
                raise ValueError(f"micro-batched input {name!r} has leading axis {x.shape[0]}, expected {accum}")
        keys = jax.random.split(step_key, accum)
        zeros = jax.tree.map(jnp.zeros_like, state["params"])

        def body(carry, xs):
            grads_acc, loss_acc, parts_acc = carry
            mb, k = xs
            (loss, parts), grads = grad_fn(state["params"], state["frozen"], mb, k)
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            parts_acc = {n: parts_acc[n] + parts[n] for n in parts_acc}
            return (grads_acc, loss_acc + loss, parts_acc), None

        _, parts0 = jax.eval_shape(micro_loss, state["params"], state["frozen"],
                                   jax.tree.map(lambda x: x[0], micro), keys[0])
        init = (zeros, jnp.zeros((), jnp.float32), {n: jnp.zeros((), jnp.float32) for n in parts0})
        (grads, loss, parts), _ = jax.lax.scan(body, init, (micro, keys))
        grads = jax.tree.map(lambda g: g / accum, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {
            "loss": loss / accum,
            **{n: v / accum for n, v in parts.items()},
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": jnp.asarray(schedule(state["step"]), jnp.float32),
        }
        new_state = {
            "step": state["step"] + 1,
            "params": params,
            "frozen": state["frozen"],
            "opt_state": opt_state,
            "rng": jax.random.key_data(key),
        }
        return new_state, metrics

    return step


def make_eval_step(
    graphdef: nnx.GraphDef, loss_fn: LossFn, compute_dtype: str = "float32"
) -> Callable[[TrainState, dict[str, jax.Array]], dict[str, jax.Array]]:
    """``eval(state, batch) -> metrics`` (loss and its parts) with a fixed evaluation key."""
    dtype = jnp.dtype(compute_dtype)

    def evaluate(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        model = nnx.merge(graphdef, _cast_floats(state["params"], dtype), _cast_floats(state["frozen"], dtype))
        loss, parts = loss_fn(model, batch, jax.random.key(0))
        return {"loss": loss.astype(jnp.float32), **{k: v.astype(jnp.float32) for k, v in parts.items()}}

    return evaluate


def batch_major(name: str, ndim: int) -> tuple[str | None, ...]:
    """Default logical axes of an input array: leading batch axis, the rest unsharded."""
    return ("batch",) + (None,) * (ndim - 1)


def batch_shardings(
    batch: dict[str, Any],
    mesh: Mesh,
    rules: sharding.Rules,
    axes: Callable[[str, int], tuple[str | None, ...]] = batch_major,
) -> dict[str, NamedSharding]:
    """NamedSharding per input array from its logical axes ``axes(name, ndim)`` (axes that do not divide drop)."""
    return {
        k: NamedSharding(mesh, sharding.logical_to_spec(axes(k, np.ndim(x)), rules, np.shape(x), mesh))
        for k, x in batch.items()
    }


def jit_train_step(step, state_sh: TrainState, batch_sh: dict[str, NamedSharding]):
    """jit with explicit in/out shardings; the state argument is donated."""
    return jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0)


def model_from_state(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
    """The nnx module (trainable + frozen parameters) of a train state."""
    return nnx.merge(graphdef, state["params"], state["frozen"])
