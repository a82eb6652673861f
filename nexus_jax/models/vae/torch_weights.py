"""Load a diffusers ``AutoencoderKL`` state dict (FLUX layout, torch names) into a :class:`FluxVAE`.

Names match one to one; only the tensors change: conv ``weight [out, in, kh, kw] -> kernel [kh, kw, in, out]``,
Linear ``weight [out, in] -> kernel [in, out]``, GroupNorm ``weight``/``bias`` and all biases unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from nexus_jax.models.vae.autoencoder import FluxVAE


def convert_tensor(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """One torch tensor (as numpy) -> our layout for the leaf at ``path`` (ending in kernel / weight / bias)."""
    if path[-1] != "kernel":
        return value
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2:
        return value.T
    raise ValueError(f"{'.'.join(path)}: expected a 2-D or 4-D weight, got shape {value.shape}")


def torch_key(path: tuple[str, ...]) -> str:
    """Our nnx path -> the diffusers state-dict key (``kernel`` is torch's ``weight``)."""
    return ".".join(path[:-1] + ("weight" if path[-1] == "kernel" else path[-1],))


def load_diffusers_state_dict(vae: FluxVAE, state_dict: Mapping[str, np.ndarray]) -> FluxVAE:
    """Copy every parameter of ``vae`` from ``state_dict`` (numpy arrays keyed by diffusers names), in place.

    Raises KeyError naming missing keys and keys left unused, ValueError on a shape mismatch.
    """
    params = nnx.state(vae, nnx.Param)
    flat = params.flat_state()
    wanted = {torch_key(tuple(str(p) for p in path)): tuple(str(p) for p in path) for path, _ in flat}
    missing = sorted(set(wanted) - set(state_dict))
    unused = sorted(set(state_dict) - set(wanted))
    if missing or unused:
        raise KeyError(
            f"state dict mismatch: missing {missing[:8]} ({len(missing)}), unused {unused[:8]} ({len(unused)})"
        )
    for path, var in flat:
        key = torch_key(tuple(str(p) for p in path))
        value = convert_tensor(wanted[key], np.asarray(state_dict[key]))
        if value.shape != var.get_value().shape:
            raise ValueError(f"{key}: converted shape {value.shape} != parameter shape {var.get_value().shape}")
        var.set_value(jnp.asarray(value, dtype=var.get_value().dtype))
    nnx.update(vae, params)
    return vae
