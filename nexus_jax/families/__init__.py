"""The model families, each declared once: configs, model constructors, conversion families, inference entry,
training tasks and plan workloads (see docs/families.md).

Every entry point is a ``"module:attr"`` string resolved on first use (:func:`resolve`), so importing the registry
imports no model, converter or trainer code. The inference CLI (``nexus-jax infer``), the training CLI
(``nexus-jax train``), the converter (``conversion.families.get_family``) and the planner
(``launch.workloads.make_workload``) look families up here; adding a family is its own folder plus one line in
:data:`REGISTRY`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from collections.abc import Mapping
from typing import Any

# family name -> "module:attr" of its Family declaration (one line per family)
REGISTRY: dict[str, str] = {
    "nexus_gen": "nexus_jax.families.nexus_gen:FAMILY",
    "unipic": "nexus_jax.families.unipic:FAMILY",
}


@dataclasses.dataclass(frozen=True)
class Component:
    """One model of a family (e.g. Nexus-Gen's AR model). ``config``: its typed config class; ``model``: its
    constructor ``(config, rngs=nnx.Rngs) -> nnx.Module``; ``conversion``: its ``conversion.families`` family name
    (the key-scheme tables, presets and config (de)serialisation the converter uses)."""

    config: str
    model: str
    conversion: str


@dataclasses.dataclass(frozen=True)
class InferenceEntry:
    """``nexus-jax infer`` for this family. ``open``: ``(args, mesh) -> nexus_jax.inference.job.Session`` (load the
    checkpoint, then ``prepare`` a request and ``compute`` its batches); ``detect``: ``(checkpoint) -> bool``, true for
    a converted checkpoint of this family; None marks the default family, which serves every checkpoint no other
    family claims (exactly one family has none)."""

    open: str
    detect: str | None = None


@dataclasses.dataclass(frozen=True)
class TrainingEntry:
    """``nexus-jax train`` for this family. ``tasks``: the ``TrainConfig.task`` values it trains; ``setup``:
    ``(cfg, init_from) -> ModelSetup``; ``task``: ``(cfg, setup, tokenizer_dir) -> TrainTask``; ``presets``: a
    ``dict[str, TrainConfig]`` of ``--preset`` choices kept in the family's own folder (the first families' presets
    are in ``configs.training.PRESETS``)."""

    tasks: tuple[str, ...]
    setup: str
    task: str
    presets: str | None = None


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family. ``conversion``: the ``conversion.families`` families it defines (name -> factory
    ``() -> conversion.families.Family``); ``workloads``: ``nexus-jax plan`` workloads (name -> builder
    ``(PlanConfig, remat) -> launch.workloads.Workload``)."""

    name: str
    description: str
    components: Mapping[str, Component]
    conversion: Mapping[str, str] = dataclasses.field(default_factory=dict)
    inference: InferenceEntry | None = None
    training: TrainingEntry | None = None
    workloads: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def entry_points(self) -> dict[str, str]:
        """Every ``"module:attr"`` of this family, by a readable key (for checks and docs)."""
        refs = {}
        for cname, c in self.components.items():
            refs.update({f"components.{cname}.config": c.config, f"components.{cname}.model": c.model})
        refs.update({f"conversion.{k}": v for k, v in self.conversion.items()})
        if self.inference is not None:
            refs["inference.open"] = self.inference.open
            if self.inference.detect is not None:
                refs["inference.detect"] = self.inference.detect
        if self.training is not None:
            refs.update({"training.setup": self.training.setup, "training.task": self.training.task})
            if self.training.presets is not None:
                refs["training.presets"] = self.training.presets
        refs.update({f"workloads.{k}": v for k, v in self.workloads.items()})
        return refs


def resolve(ref: str) -> Any:
    """``"package.module:attr"`` (``attr`` may be dotted) -> the object; errors name the reference."""
    module, sep, attr = ref.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"entry point {ref!r} is not of the form 'module:attr'")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportError(f"entry point {ref!r}: {obj!r} has no attribute {part!r}") from None
    return obj


@functools.cache
def _declaration(ref: str) -> Family:
    family = resolve(ref)
    if not isinstance(family, Family):
        raise TypeError(f"{ref} is a {type(family).__name__}, not a nexus_jax.families.Family")
    return family


def names() -> list[str]:
    return list(REGISTRY)


def get(name: str) -> Family:
    if name not in REGISTRY:
        raise ValueError(f"unknown model family {name!r}; registered: {sorted(REGISTRY)}")
    family = _declaration(REGISTRY[name])
    if family.name != name:
        raise ValueError(f"registry line {name!r} points at the declaration of family {family.name!r}")
    return family


def families() -> list[Family]:
    return [get(n) for n in REGISTRY]


def for_checkpoint(checkpoint: str | os.PathLike) -> Family:
    """The family serving a converted checkpoint: the first whose ``inference.detect`` claims it, else the default
    (the one without ``detect``)."""
    served = [f for f in families() if f.inference is not None]
    for f in served:
        if f.inference.detect is not None and resolve(f.inference.detect)(checkpoint):
            return f
    defaults = [f for f in served if f.inference.detect is None]
    if len(defaults) != 1:
        raise ValueError(f"{checkpoint}: no family claims this checkpoint and there are {len(defaults)} default "
                         f"inference families ({[f.name for f in defaults]}); exactly one must have no detect")
    return defaults[0]


def for_task(task: str) -> Family:
    """The family whose training entry lists ``task`` (a ``TrainConfig.task``)."""
    for f in families():
        if f.training is not None and task in f.training.tasks:
            return f
    known = sorted(t for f in families() if f.training is not None for t in f.training.tasks)
    raise ValueError(f"no registered family trains task {task!r}; known tasks: {known}")


def train_presets() -> dict[str, Any]:
    """The ``--preset`` choices families keep in their own folders (name -> TrainConfig)."""
    out: dict[str, Any] = {}
    for f in families():
        if f.training is not None and f.training.presets is not None:
            for name, cfg in resolve(f.training.presets).items():
                if name in out:
                    raise ValueError(f"training preset {name!r} of family {f.name!r} is declared twice")
                out[name] = cfg
    return out


def workload_builder(name: str) -> Any | None:
    """The ``(PlanConfig, remat) -> Workload`` builder a family declares for plan workload ``name``, or None."""
    for f in families():
        if name in f.workloads:
            return resolve(f.workloads[name])
    return None


def workload_names() -> list[str]:
    return [w for f in families() for w in f.workloads]


def conversion_factory(name: str) -> Any | None:
    """The factory of the ``conversion.families`` family ``name`` a model family defines, or None."""
    for f in families():
        if name in f.conversion:
            return resolve(f.conversion[name])
    return None


def conversion_names() -> list[str]:
    return [c for f in families() for c in f.conversion]
