"""FLUX DiT tables. The JAX model (``nexus_jax.models.flux.FluxDiT``) uses DiffSynth's module names with kernels
[in, out], fused ``a_to_qkv`` / ``b_to_qkv`` / ``to_qkv_mlp`` and ``final_norm_out`` in (scale, shift) order.

- :func:`diffsynth_mapping`: DiffSynth ``FluxDiT`` names (Nexus-Gen decoders' ``pipe.dit.*``): only transposes.
- :func:`diffusers_mapping`: diffusers ``FluxTransformer2DModel``: q / k / v (and ``proj_mlp``) are fused on import and
  split on export; ``norm_out.linear`` is already (scale, shift).
- :func:`bfl_mapping`: BFL ``flux1-dev.safetensors``: ``final_layer.adaLN_modulation.1`` is (shift, scale), so its
  halves are swapped.
"""

from __future__ import annotations

from configs.flux import FluxDiTConfig
from conversion.engine import LINEAR, Chain, Concat, HalfSwap, Mapping, Rule, linear, rule


def _counts(cfg: FluxDiTConfig) -> tuple[tuple[str, int], ...]:
    return (("i", cfg.num_double_blocks), ("j", cfg.num_single_blocks))


def _fused(torch_prefixes: list[str], jax_prefix: str, sizes: tuple[int, ...]) -> list[Rule]:
    """Several torch Linears <-> one JAX Linear whose output features are their concatenation."""
    return [
        rule([f"{p}.weight" for p in torch_prefixes], f"{jax_prefix}.kernel", Chain((Concat(0, sizes), LINEAR))),
        rule([f"{p}.bias" for p in torch_prefixes], f"{jax_prefix}.bias", Concat(0, sizes)),
    ]


def diffsynth_mapping(cfg: FluxDiTConfig) -> Mapping:
    """DiffSynth ``FluxDiT`` state dict (weight [out, in]) <-> FluxDiT (kernel [in, out]); same module names."""
    lin = ["x_embedder", "context_embedder", "final_norm_out.linear", "final_proj_out"]
    lin += [f"{e}.timestep_embedder.{k}" for e in ("time_embedder",) for k in (0, 2)]
    if cfg.guidance_embed:
        lin += [f"guidance_embedder.timestep_embedder.{k}" for k in (0, 2)]
    lin += [f"pooled_text_embedder.{k}" for k in (0, 2)]
    for s in ("a", "b"):
        lin += [f"blocks.{{i}}.norm1_{s}.linear", f"blocks.{{i}}.attn.{s}_to_qkv", f"blocks.{{i}}.attn.{s}_to_out"]
        lin += [f"blocks.{{i}}.ff_{s}.0", f"blocks.{{i}}.ff_{s}.2"]
    lin += ["single_blocks.{j}.norm.linear", "single_blocks.{j}.to_qkv_mlp", "single_blocks.{j}.proj_out"]
    rules = [r for name in lin for r in linear(name, name)]
    norms = [f"blocks.{{i}}.attn.norm_{qk}_{s}" for qk in "qk" for s in "ab"]
    norms += ["single_blocks.{j}.norm_q_a", "single_blocks.{j}.norm_k_a"]
    rules += [rule(f"{n}.weight", f"{n}.weight") for n in norms]
    return Mapping("flux_dit_diffsynth", tuple(rules), _counts(cfg))


def diffusers_mapping(cfg: FluxDiTConfig) -> Mapping:
    """diffusers ``FluxTransformer2DModel`` names <-> FluxDiT."""
    d, m = cfg.hidden_size, cfg.mlp_dim
    rules: list[Rule] = []
    pairs = [("x_embedder", "x_embedder"), ("context_embedder", "context_embedder")]
    embedders = [("timestep_embedder", "time_embedder.timestep_embedder")]
    if cfg.guidance_embed:
        embedders.append(("guidance_embedder", "guidance_embedder.timestep_embedder"))
    for theirs, ours in embedders:
        pairs += [
            (f"time_text_embed.{theirs}.linear_1", f"{ours}.0"),
            (f"time_text_embed.{theirs}.linear_2", f"{ours}.2"),
        ]
    pairs += [("time_text_embed.text_embedder.linear_1", "pooled_text_embedder.0")]
    pairs += [("time_text_embed.text_embedder.linear_2", "pooled_text_embedder.2")]
    t, q = "transformer_blocks.{i}", "blocks.{i}"
    pairs += [(f"{t}.norm1.linear", f"{q}.norm1_a.linear"), (f"{t}.norm1_context.linear", f"{q}.norm1_b.linear")]
    pairs += [(f"{t}.attn.to_out.0", f"{q}.attn.a_to_out"), (f"{t}.attn.to_add_out", f"{q}.attn.b_to_out")]
    for theirs, ours in (("ff", "ff_a"), ("ff_context", "ff_b")):
        pairs += [(f"{t}.{theirs}.net.0.proj", f"{q}.{ours}.0"), (f"{t}.{theirs}.net.2", f"{q}.{ours}.2")]
    s, r = "single_transformer_blocks.{j}", "single_blocks.{j}"
    pairs += [(f"{s}.norm.linear", f"{r}.norm.linear"), (f"{s}.proj_out", f"{r}.proj_out")]
    pairs += [("norm_out.linear", "final_norm_out.linear"), ("proj_out", "final_proj_out")]
    rules += [x for theirs, ours in pairs for x in linear(theirs, ours)]
    a = f"{t}.attn"
    rules += _fused([f"{a}.to_q", f"{a}.to_k", f"{a}.to_v"], f"{q}.attn.a_to_qkv", (d, d, d))
    rules += _fused([f"{a}.add_q_proj", f"{a}.add_k_proj", f"{a}.add_v_proj"], f"{q}.attn.b_to_qkv", (d, d, d))
    qkvm = [f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp"]
    rules += _fused(qkvm, f"{r}.to_qkv_mlp", (d, d, d, m))
    norms = [("norm_q", "norm_q_a"), ("norm_k", "norm_k_a"), ("norm_added_q", "norm_q_b"), ("norm_added_k", "norm_k_b")]
    rules += [rule(f"{a}.{theirs}.weight", f"{q}.attn.{ours}.weight") for theirs, ours in norms]
    rules += [rule(f"{s}.attn.{theirs}.weight", f"{r}.{ours}.weight") for theirs, ours in norms[:2]]
    return Mapping("flux_dit_diffusers", tuple(rules), _counts(cfg))


def bfl_mapping(cfg: FluxDiTConfig) -> Mapping:
    """BFL ``flux1-dev.safetensors`` names <-> FluxDiT (final modulation halves swapped)."""
    pairs = [("img_in", "x_embedder"), ("txt_in", "context_embedder"), ("final_layer.linear", "final_proj_out")]
    embedders = [("time_in", "time_embedder.timestep_embedder")]
    if cfg.guidance_embed:
        embedders.append(("guidance_in", "guidance_embedder.timestep_embedder"))
    for theirs, ours in embedders:
        pairs += [(f"{theirs}.in_layer", f"{ours}.0"), (f"{theirs}.out_layer", f"{ours}.2")]
    pairs += [("vector_in.in_layer", "pooled_text_embedder.0"), ("vector_in.out_layer", "pooled_text_embedder.2")]
    t, q = "double_blocks.{i}", "blocks.{i}"
    for theirs, ours in (("img", "a"), ("txt", "b")):
        pairs += [
            (f"{t}.{theirs}_mod.lin", f"{q}.norm1_{ours}.linear"),
            (f"{t}.{theirs}_attn.qkv", f"{q}.attn.{ours}_to_qkv"),
        ]
        pairs += [(f"{t}.{theirs}_attn.proj", f"{q}.attn.{ours}_to_out")]
        pairs += [(f"{t}.{theirs}_mlp.0", f"{q}.ff_{ours}.0"), (f"{t}.{theirs}_mlp.2", f"{q}.ff_{ours}.2")]
    s, r = "single_blocks.{j}", "single_blocks.{j}"
    pairs += [
        (f"{s}.linear1", f"{r}.to_qkv_mlp"),
        (f"{s}.linear2", f"{r}.proj_out"),
        (f"{s}.modulation.lin", f"{r}.norm.linear"),
    ]
    rules = [x for theirs, ours in pairs for x in linear(theirs, ours)]
    for theirs, ours in (("img", "a"), ("txt", "b")):
        for qk, n in (("query", "q"), ("key", "k")):
            rules.append(rule(f"{t}.{theirs}_attn.norm.{qk}_norm.scale", f"{q}.attn.norm_{n}_{ours}.weight"))
    rules += [rule(f"{s}.norm.{qk}_norm.scale", f"{r}.norm_{n}_a.weight") for qk, n in (("query", "q"), ("key", "k"))]
    rules += linear("final_layer.adaLN_modulation.1", "final_norm_out.linear", weight=Chain((HalfSwap(0), LINEAR)))
    rules[-1] = rule("final_layer.adaLN_modulation.1.bias", "final_norm_out.linear.bias", HalfSwap(0))
    return Mapping("flux_dit_bfl", tuple(rules), _counts(cfg))
