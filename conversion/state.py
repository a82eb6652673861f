"""Flat views of nnx module state: dotted path strings (``model.layers.0.mlp.up_proj.kernel``) <-> arrays."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx


def path_str(path: tuple[Any, ...]) -> str:
    """nnx state path tuple -> dotted string (list indices become digits)."""
    return ".".join(str(getattr(p, "key", p)) for p in path)


def flat_variables(module_or_state: Any) -> dict[str, nnx.Variable]:
    """Dotted path -> nnx.Param for every parameter of a module or nnx.State (abstract or concrete)."""
    state = module_or_state if isinstance(module_or_state, nnx.State) else nnx.state(module_or_state, nnx.Param)
    out = {}
    for path, var in nnx.to_flat_state(state):
        if isinstance(var, nnx.Param):
            out[path_str(path)] = var
    return out


def abstract_params(ctor: Callable[[], nnx.Module]) -> tuple[nnx.Module, dict[str, jax.ShapeDtypeStruct]]:
    """(abstract module, dotted path -> ShapeDtypeStruct of each parameter) without allocating any weights."""
    abstract = nnx.eval_shape(ctor)
    shapes = {
        k: jax.ShapeDtypeStruct(tuple(v.get_value().shape), v.get_value().dtype)
        for k, v in flat_variables(abstract).items()
    }
    return abstract, shapes


def param_shapes(module: nnx.Module) -> dict[str, tuple[int, ...]]:
    """Dotted path -> shape of each parameter of a concrete or abstract module."""
    return {k: tuple(v.get_value().shape) for k, v in flat_variables(module).items()}


def module_arrays(module: nnx.Module) -> dict[str, np.ndarray]:
    """Dotted path -> host numpy copy of each parameter (for small models and tests)."""
    return {k: np.asarray(jax.device_get(v.get_value())) for k, v in flat_variables(module).items()}


def assign(module: nnx.Module, arrays: dict[str, Any], cast: bool = True) -> nnx.Module:
    """Set parameters of ``module`` from dotted path -> array (cast to each parameter's dtype unless ``cast=False``);
    every parameter must be given exactly. Returns the module."""
    variables = flat_variables(module)
    missing = sorted(set(variables) - set(arrays))
    extra = sorted(set(arrays) - set(variables))
    if missing or extra:
        from conversion.errors import ConversionError, list_names

        msg = []
        if missing:
            msg.append(f"{len(missing)} parameters not given: {list_names(missing)}")
        if extra:
            msg.append(f"{len(extra)} arrays match no parameter: {list_names(extra)}")
        raise ConversionError("; ".join(msg))
    for k, var in variables.items():
        value = arrays[k]
        old = var.get_value()
        if tuple(value.shape) != tuple(old.shape):
            from conversion.errors import ShapeMismatchError

            raise ShapeMismatchError({k: (tuple(value.shape), tuple(old.shape))}, "the arrays given")
        var.set_value(jax.numpy.asarray(value, dtype=old.dtype if cast else value.dtype))
    return module
