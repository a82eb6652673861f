"""Load a diffusers ``FluxTransformer2DModel`` state dict into :class:`FluxDiT` (used by parity tests).

diffusers keeps q, k, v (and the single-block MLP input) as separate Linears; ours fuse them (DiffSynth layout):
``a_to_qkv = [to_q; to_k; to_v]``, ``b_to_qkv = [add_q_proj; add_k_proj; add_v_proj]``,
``to_qkv_mlp = [to_q; to_k; to_v; proj_mlp]``. ``norm_out.linear`` is (scale, shift) in both layouts.
torch Linear weights are ``[out, in]``; ours are ``[in, out]``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flax import nnx

Flat = dict[tuple[str | int, ...], np.ndarray]


def _linear(out: Flat, dst: tuple, sd: Mapping[str, np.ndarray], *srcs: str) -> None:
    out[(*dst, "kernel")] = np.concatenate([np.asarray(sd[f"{s}.weight"]).T for s in srcs], axis=1)
    out[(*dst, "bias")] = np.concatenate([np.asarray(sd[f"{s}.bias"]) for s in srcs], axis=0)


def diffusers_flux_to_flat(sd: Mapping[str, np.ndarray], num_double: int, num_single: int) -> Flat:
    """diffusers FLUX state dict (numpy) -> {our nnx path: array}."""
    o: Flat = {}
    _linear(o, ("x_embedder",), sd, "x_embedder")
    _linear(o, ("context_embedder",), sd, "context_embedder")
    for ours, theirs in (("time_embedder", "timestep_embedder"), ("guidance_embedder", "guidance_embedder")):
        if f"time_text_embed.{theirs}.linear_1.weight" in sd:
            for i, n in ((0, 1), (2, 2)):
                _linear(o, (ours, "timestep_embedder", i), sd, f"time_text_embed.{theirs}.linear_{n}")
    for i, n in ((0, 1), (2, 2)):
        _linear(o, ("pooled_text_embedder", i), sd, f"time_text_embed.text_embedder.linear_{n}")
    for i in range(num_double):
        p, q = f"transformer_blocks.{i}", ("blocks", i)
        _linear(o, (*q, "norm1_a", "linear"), sd, f"{p}.norm1.linear")
        _linear(o, (*q, "norm1_b", "linear"), sd, f"{p}.norm1_context.linear")
        a = f"{p}.attn"
        _linear(o, (*q, "attn", "a_to_qkv"), sd, f"{a}.to_q", f"{a}.to_k", f"{a}.to_v")
        _linear(o, (*q, "attn", "b_to_qkv"), sd, f"{a}.add_q_proj", f"{a}.add_k_proj", f"{a}.add_v_proj")
        _linear(o, (*q, "attn", "a_to_out"), sd, f"{a}.to_out.0")
        _linear(o, (*q, "attn", "b_to_out"), sd, f"{a}.to_add_out")
        for ours, theirs in (("norm_q_a", "norm_q"), ("norm_k_a", "norm_k"), ("norm_q_b", "norm_added_q"),
                             ("norm_k_b", "norm_added_k")):
            o[(*q, "attn", ours, "weight")] = np.asarray(sd[f"{a}.{theirs}.weight"])
        for ours, theirs in (("ff_a", "ff"), ("ff_b", "ff_context")):
            _linear(o, (*q, ours, 0), sd, f"{p}.{theirs}.net.0.proj")
            _linear(o, (*q, ours, 2), sd, f"{p}.{theirs}.net.2")
    for j in range(num_single):
        p, q = f"single_transformer_blocks.{j}", ("single_blocks", j)
        _linear(o, (*q, "norm", "linear"), sd, f"{p}.norm.linear")
        _linear(o, (*q, "to_qkv_mlp"), sd, f"{p}.attn.to_q", f"{p}.attn.to_k", f"{p}.attn.to_v", f"{p}.proj_mlp")
        _linear(o, (*q, "proj_out"), sd, f"{p}.proj_out")
        o[(*q, "norm_q_a", "weight")] = np.asarray(sd[f"{p}.attn.norm_q.weight"])
        o[(*q, "norm_k_a", "weight")] = np.asarray(sd[f"{p}.attn.norm_k.weight"])
    _linear(o, ("final_norm_out", "linear"), sd, "norm_out.linear")
    _linear(o, ("final_proj_out",), sd, "proj_out")
    return o


def assign_flat(module: nnx.Module, flat: Flat) -> None:
    """Write ``flat`` into ``module``'s parameters in place; every parameter must be covered with its exact shape."""
    state = nnx.state(module, nnx.Param)
    paths = {tuple(k): v for k, v in nnx.to_flat_state(state)}
    missing = sorted(map(str, set(paths) - set(flat)))
    extra = sorted(map(str, set(flat) - set(paths)))
    if missing or extra:
        raise KeyError(f"parameter mismatch: missing {missing[:5]} ({len(missing)}), unexpected {extra[:5]} "
                       f"({len(extra)})")
    for path, var in paths.items():
        arr = flat[path]
        if tuple(arr.shape) != tuple(var.get_value().shape):
            raise ValueError(f"{'.'.join(map(str, path))}: shape {arr.shape} != expected {var.get_value().shape}")
        var.set_value(np.asarray(arr, dtype=var.get_value().dtype))
