"""Build a :class:`FluxVAE` from a diffusers ``AutoencoderKL`` state dict (FLUX layout, torch names).

Names match one to one; only the tensors change: conv ``weight [out, in, kh, kw] -> kernel [kh, kw, in, out]``,
Linear ``weight [out, in] -> kernel [in, out]``, GroupNorm ``weight``/``bias`` and all biases unchanged.
No random initialisation happens: the module is built abstractly and filled (optionally straight into shardings).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from configs.vae import FluxVAEConfig
from nexus_jax.models.vae.autoencoder import FluxVAE
from nexus_jax.sharding import Rules, state_shardings

Path = tuple[str, ...]


def convert_tensor(path: Path, value: np.ndarray) -> np.ndarray:
    """One torch tensor (as numpy) -> our layout for the leaf at ``path`` (ending in kernel / weight / bias)."""
    if path[-1] != "kernel":
        return value
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2:
        return value.T
    raise ValueError(f"{'.'.join(path)}: expected a 2-D or 4-D weight, got shape {value.shape}")


def torch_key(path: Path) -> str:
    """Our nnx path -> the diffusers state-dict key (``kernel`` is torch's ``weight``)."""
    return ".".join(path[:-1] + ("weight" if path[-1] == "kernel" else path[-1],))


def vae_from_diffusers(
    config: FluxVAEConfig,
    state_dict: Mapping[str, np.ndarray],
    *,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
) -> FluxVAE:
    """A FluxVAE holding ``state_dict`` (numpy arrays keyed by diffusers names); sharded by ``rules`` on ``mesh``.

    Raises KeyError naming missing and unused keys, ValueError on a shape mismatch.
    """
    if (mesh is None) != (rules is None):
        raise ValueError("pass both mesh and rules, or neither")
    abstract = nnx.eval_shape(lambda: FluxVAE(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shardings = state_shardings(state, mesh, rules) if mesh is not None else None
    flat = [(tuple(str(p) for p in path), var) for path, var in nnx.to_flat_state(state)]
    wanted = {torch_key(path): path for path, _ in flat}
    missing = sorted(set(wanted) - set(state_dict))
    unused = sorted(set(state_dict) - set(wanted))
    if missing or unused:
        raise KeyError(
            f"state dict mismatch: missing {missing[:8]} ({len(missing)}), unused {unused[:8]} ({len(unused)})"
        )
    sharding_of = dict((tuple(str(p) for p in k), v) for k, v in nnx.to_flat_state(shardings)) if shardings else {}
    for path, var in flat:
        key = torch_key(path)
        value = convert_tensor(path, np.asarray(state_dict[key]))
        spec = var.get_value()
        if value.shape != spec.shape:
            raise ValueError(f"{key}: converted shape {value.shape} != parameter shape {spec.shape}")
        array = jnp.asarray(value, dtype=spec.dtype)
        if path in sharding_of:
            array = jax.device_put(array, sharding_of[path].get_value())
        var.set_value(array)
    return nnx.merge(graphdef, state)
