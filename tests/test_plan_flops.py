"""The analytic model FLOPs count exactly the matmul weights of the real (full-size, abstract) models."""

from __future__ import annotations

import math

from flax import nnx

from configs import qwen2_5
from configs.flux import FluxDiTConfig
from launch import flops


def _kernel_params(module: nnx.Module, *, exclude: tuple[str, ...] = ()) -> int:
    """Parameters of 2-D ``kernel`` weights (Linear layers), skipping paths containing any ``exclude`` part."""
    total = 0
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        names = [str(p) for p in path]
        if names[-1] == "kernel" and len(var.shape) == 2 and not any(e in names for e in exclude):
            total += math.prod(var.shape)
    return total


def test_qwen_matmul_params_match_the_7b_decoder():
    from nexus_jax.models.qwen2 import Qwen2ForCausalLM

    full = qwen2_5.qwen2_5_vl_7b()
    cfg = full.replace(num_layers=2)  # full width, 2 layers: the count is per layer
    model = nnx.eval_shape(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)))
    assert flops.qwen_matmul_params(cfg) == _kernel_params(model)
    # 28 layers: 6,525,618,176 layer params (nexus-gen.md 1.1) minus norms and biases, plus the 544,997,376 lm_head
    assert flops.qwen_matmul_params(full) == 6_525_618_176 - 28 * (2 * 3584 + 3584 + 2 * 512) + 544_997_376


def test_dit_per_token_params_match_flux_dev():
    from nexus_jax.models.flux.dit import FluxDiT

    cfg = FluxDiTConfig.full(num_double_blocks=1, num_single_blocks=2)  # full width; counts are per block
    dit = nnx.eval_shape(lambda: FluxDiT(cfg, rngs=nnx.Rngs(0)))
    # per-token weights: both streams of the double blocks, single blocks (modulation acts once per sample)
    d, m = cfg.hidden_size, cfg.mlp_dim
    per_token_double = 2 * (4 * d * d + 2 * d * m)
    per_token_single = d * (3 * d + m) + (d + m) * d
    blocks = _kernel_params(dit, exclude=("time_embedder", "guidance_embedder", "pooled_text_embedder",
                                          "x_embedder", "context_embedder", "final_proj_out", "final_norm_out",
                                          "norm1_a", "norm1_b", "norm"))
    assert blocks == cfg.num_double_blocks * per_token_double + cfg.num_single_blocks * per_token_single
    one_image_token = flops.dit_forward_flops(cfg, 1, 0) - flops.dit_forward_flops(cfg, 0, 0)
    attention_one = 4.0 * d * (cfg.num_double_blocks + cfg.num_single_blocks)
    hand = 2.0 * (cfg.num_double_blocks * per_token_double / 2 + cfg.num_single_blocks * per_token_single
                  + 2 * cfg.in_channels * d)
    assert one_image_token == hand + attention_one
