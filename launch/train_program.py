"""Abstract train-step programs: the project's real train step (nexus_jax.training.state) over sharded shapes only.

Nothing is materialised: the model is built with ``nnx.eval_shape``, the train state with ``jax.eval_shape``, and
every argument is a ``jax.ShapeDtypeStruct`` carrying its NamedSharding on the target mesh.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from configs.training import OptimConfig
from launch.compiled import Program
from nexus_jax import sharding
from nexus_jax.training import state as train_state
from nexus_jax.training.optim import make_optimizer, split_trainable

BatchSpec = Mapping[str, tuple[tuple[int, ...], jnp.dtype, tuple[str | None, ...]]]


def abstract_batch(specs: BatchSpec, mesh: Mesh, rules: sharding.Rules) -> dict[str, jax.ShapeDtypeStruct]:
    """{name: (shape, dtype, logical axes)} -> ShapeDtypeStructs sharded by their logical axes."""
    out = {}
    for name, (shape, dtype, logical) in specs.items():
        if len(logical) != len(shape):
            raise ValueError(f"batch entry {name!r}: {len(logical)} logical axes {logical} for shape {shape}")
        spec = sharding.logical_to_spec(logical, rules, shape, mesh)
        out[name] = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=NamedSharding(mesh, spec))
    return out


def train_program(
    ctor: Callable[[], nnx.Module],
    loss_fn: train_state.LossFn,
    batch: BatchSpec,
    optim: OptimConfig,
    compute_dtype: str,
    mesh: Mesh,
    rules: sharding.Rules,
) -> Program:
    """The jitted, state-donating train step and its abstract (state, batch) arguments."""
    tx = make_optimizer(optim)

    def build() -> train_state.TrainState:
        _, params, frozen = split_trainable(ctor(), optim)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "frozen": frozen,
            "opt_state": tx.init(params),
            "rng": jax.random.key_data(jax.random.key(0)),
        }

    graphdef = split_trainable(nnx.eval_shape(ctor), optim)[0]
    abstract = jax.eval_shape(build)
    state_sh = train_state.state_shardings(abstract, mesh, rules)
    state_args = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    batch_args = abstract_batch(batch, mesh, rules)
    batch_sh = {k: v.sharding for k, v in batch_args.items()}
    step = train_state.make_train_step(graphdef, loss_fn, optim, compute_dtype)
    fn = train_state.jit_train_step(step, state_sh, batch_sh)
    return Program(fn=LowerInContext(fn, mesh, rules), args=(state_args, batch_args))


class LowerInContext:
    """A jitted function whose ``lower`` traces inside ``sharding_context(mesh, rules)`` (for ``constrain``)."""

    def __init__(self, fn, mesh: Mesh, rules: sharding.Rules):
        self.fn, self.mesh, self.rules = fn, mesh, rules

    def lower(self, *args):
        with sharding.sharding_context(self.mesh, self.rules):
            return self.fn.lower(*args)

