"""Rematerialisation policies by name, applicable to any nnx sub-module call."""

from __future__ import annotations

from typing import Any

from flax import nnx

from nexus_jax.layers import REMAT_POLICIES as POLICIES  # the one policy table (also used by the models)


def _call(module: nnx.Module, *args: Any) -> Any:
    return module(*args)


def remat_call(module: nnx.Module, policy: str, *args: Any) -> Any:
    """``module(*args)``, rematerialised in the backward pass under ``policy`` ("none" = plain call)."""
    if policy == "none":
        return module(*args)
    if policy not in POLICIES:
        raise ValueError(f"remat policy {policy!r} is not one of {('none', *POLICIES)}")
    return nnx.remat(_call, policy=POLICIES[policy], prevent_cse=True)(module, *args)


class Remat(nnx.Module):
    """Wraps a block so that every call is rematerialised under ``policy`` (for models without a remat option)."""

    def __init__(self, inner: nnx.Module, policy: str):
        self.inner, self.policy = inner, policy

    def __call__(self, *args: Any) -> Any:
        return remat_call(self.inner, self.policy, *args)
