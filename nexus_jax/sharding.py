"""Logical-axis sharding: meshes, rules tables, parameter/activation shardings, sharded init.

Every parameter carries a tuple of *logical* axis names (metadata ``out_sharding`` on its ``nnx.Variable``).
A rules table maps each logical name onto zero or more *mesh* axes of a ``(data, fsdp, tensor)`` mesh.
Activations are annotated with :func:`constrain`, a no-op unless a :func:`sharding_context` is active.

A mesh axis is only used for a tensor dimension it divides evenly; otherwise that mesh axis is dropped for
that dimension (replication), so odd head counts or vocab sizes never fail to shard.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from configs.mesh import MeshConfig  # noqa: F401  (re-exported: nexus_jax.sharding.MeshConfig)

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Parameter logical axes
#   vocab, embed, mlp, heads (q heads x head_dim flattened), kv_heads (kv heads x head_dim), norm, conv_in, conv_out,
#   layers (stacked layers), slots (image prefill rows)
# Activation logical axes
#   batch, length, act_embed, act_heads, act_kv_heads, act_mlp, act_vocab, act_length (sequence-parallel)
TRAIN_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("norm", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("layers", None),
    ("slots", None),
)

# Inference: no FSDP gather per decode step; batch over data x fsdp, weights over tensor only.
INFERENCE_RULES: Rules = tuple(
    (name, None) if name == "embed" else (name, axes) for name, axes in TRAIN_RULES
)

_CONTEXT: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("nexus_sharding", default=None)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh; one size may be -1 (takes the remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into data={data} fsdp={fsdp} tensor={tensor}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, have {len(devices)}")
    arr = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def validate_rules(rules: Rules) -> None:
    """Reject rules tables naming a logical axis twice or an unknown mesh axis."""
    seen: set[str] = set()
    for name, axes in rules:
        if name in seen:
            raise ValueError(f"logical axis {name!r} appears twice in the rules table")
        seen.add(name)
        for ax in (axes,) if isinstance(axes, str) else (axes or ()):
            if ax not in MESH_AXES:
                raise ValueError(f"logical axis {name!r} maps to unknown mesh axis {ax!r}; mesh axes are {MESH_AXES}")


def logical_to_spec(
    logical: Sequence[str | None] | None,
    rules: Rules,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec.

    With ``shape`` and ``mesh`` given, mesh axes that do not divide a dimension are dropped (replicated), and a mesh
    axis is used at most once per tensor.
    """
    if logical is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    out: list[Any] = []
    for i, name in enumerate(logical):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no rule; add it to the rules table")
        axes = table[name]
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        kept = []
        for ax in axes:
            if ax in used:
                continue
            if shape is not None and mesh is not None:
                size = int(np.prod([mesh.shape[a] for a in kept + [ax]]))
                if shape[i] % size:
                    continue
            kept.append(ax)
        used.update(kept)
        out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    return PartitionSpec(*out)


def _variable_logical_axes(var: nnx.Variable) -> tuple[str | None, ...] | None:
    meta = var.get_metadata()
    return meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
    """NamedSharding for each variable of an (abstract or concrete) nnx.State."""

    def one(var):
        if not isinstance(var, nnx.Variable):
            return NamedSharding(mesh, PartitionSpec())
        value = var.get_value()
        spec = logical_to_spec(_variable_logical_axes(var), rules, getattr(value, "shape", None), mesh)
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(ctor: Callable[[], nnx.Module], mesh: Mesh, rules: Rules) -> nnx.Module:
    """Build a module directly into its shardings: abstract init, then a jitted init with ``out_shardings``.

    No full unsharded copy of the parameters ever exists on one device.
    """
    abstract = nnx.eval_shape(ctor)
    graphdef, abs_state = nnx.split(abstract)
    shardings = state_shardings(abs_state, mesh, rules)

    def init() -> nnx.State:
        return nnx.split(ctor())[1]

    state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def shard_module(module: nnx.Module, mesh: Mesh, rules: Rules) -> nnx.Module:
    """Place an existing module's state onto ``mesh`` according to ``rules`` (in place; returns the module)."""
    state = nnx.state(module)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(module, jax.device_put(state, shardings))
    return module


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Activate ``mesh`` and ``rules`` for :func:`constrain` within the block (also at trace time)."""
    validate_rules(rules)
    token = _CONTEXT.set((mesh, rules))
    try:
        with jax.set_mesh(mesh):
            yield
    finally:
        _CONTEXT.reset(token)


def current() -> tuple[Mesh, Rules] | None:
    """The active (mesh, rules) pair, or None."""
    return _CONTEXT.get()


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; identity when no sharding context is active."""
    ctx = _CONTEXT.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    if len(logical) != x.ndim:
        raise ValueError(f"constrain: {len(logical)} logical axes {tuple(logical)} for an array of shape {x.shape}")
    spec = logical_to_spec(logical, rules, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def data_sharding(mesh: Mesh, ndim: int, rules: Rules = TRAIN_RULES) -> NamedSharding:
    """Sharding for a batch-major input array of rank ``ndim`` (batch over the data axes)."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def parse_mesh_spec(text: str) -> tuple[int, int, int]:
    """``--mesh`` of every CLI: ``"1,16,4"`` or ``"1x16x4"`` (data, fsdp, tensor; one entry may be -1) -> sizes.
    Raises ValueError naming the text."""
    parts = str(text).strip().replace("x", ",").split(",")
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"cannot parse mesh {text!r}: expected three integers data,fsdp,tensor like 1,-1,4") from None
    if len(sizes) != 3:
        raise ValueError(f"mesh {text!r} has {len(sizes)} entries; expected 3 (data,fsdp,tensor)")
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {text!r}: sizes must be >= 1, with at most one -1")
    return sizes  # type: ignore[return-value]


def mesh_from_config(cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """The ``(data, fsdp, tensor)`` Mesh of a :class:`configs.mesh.MeshConfig` over ``devices`` (default: all)."""
    return make_mesh(cfg.data, cfg.fsdp, cfg.tensor, devices)
