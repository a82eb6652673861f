"""Typed dataclass configs <-> JSON-able dicts (nested dataclasses, tuples, dtypes), for ``config.json``."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import numpy as np


def to_dict(cfg: Any) -> Any:
    """A dataclass config (possibly nested) as plain JSON values; dtypes become their names."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(x) for x in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (type, np.dtype)) or type(cfg).__module__.startswith("jax"):
        return np.dtype(cfg).name
    return cfg


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild ``cls`` from :func:`to_dict` output: lists become tuples where the default is a tuple, nested
    dataclasses are rebuilt from their field type (or the default's type), dtype names become numpy dtypes."""
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        sub = _dataclass_type(hints.get(f.name), default)
        if sub is not None and isinstance(value, dict):
            value = from_dict(sub, value)
        elif isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        elif isinstance(value, str) and default is not None and _is_dtype(default):
            value = np.dtype(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def _is_dtype(x: Any) -> bool:
    try:
        return isinstance(x, (type, np.dtype)) and np.dtype(x) is not None
    except TypeError:
        return False


def _dataclass_type(hint: Any, default: Any) -> type | None:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg
    if default is not None and dataclasses.is_dataclass(default):
        return type(default)
    return None
