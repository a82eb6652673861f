"""Analytic model FLOPs per step (what MFU is measured against): 6 x matmul params x tokens + attention.

Conventions (MaxText / PaLM style): a multiply-add is 2 FLOPs; training = 3 x forward (forward, input gradients,
weight gradients); embedding lookups and element-wise work are not counted; causal attention counts half of the
score and value matmuls (``2 * S * heads * head_dim`` forward FLOPs per token and layer), bidirectional attention
all of it (``4 * S * heads * head_dim``). Recomputation (remat) is not model FLOPs.
"""

from __future__ import annotations

from configs.flux import FluxDiTConfig
from configs.qwen2_5 import Qwen2TextConfig

ADAPTER_IN = 3584  # Nexus-Gen generation adapter: Linear(3584 -> 4096) LN ReLU Linear(4096 -> 4096) LN


def qwen_matmul_params(cfg: Qwen2TextConfig) -> int:
    """Parameters of the decoder's matmuls per token: layers (q, k, v, o, gate, up, down) + lm_head."""
    d = cfg.hidden_size
    attn = d * cfg.q_size + 2 * d * cfg.kv_size + cfg.q_size * d
    mlp = 3 * d * cfg.intermediate_size
    return cfg.num_layers * (attn + mlp) + d * cfg.vocab_size


def ar_train_flops(cfg: Qwen2TextConfig, batch: int, seq_len: int, extra_matmul_params: int = 0) -> float:
    """One AR train step: 6 (N + extra) T + causal attention; ``extra`` e.g. the Nexus ``vision_head`` (d x d)."""
    tokens = batch * seq_len
    dense = 6.0 * (qwen_matmul_params(cfg) + extra_matmul_params) * tokens
    attention = 3.0 * 2.0 * seq_len * cfg.q_size * cfg.num_layers * tokens
    return dense + attention


def dit_forward_flops(cfg: FluxDiTConfig, image_tokens: int, context_tokens: int, context_dim_in: int = 0) -> float:
    """One DiT forward for one sample: per-token matmuls of both streams + bidirectional joint attention.

    Double block, per stream: qkv 3D^2 + out D^2 + MLP 2 * D * mlp_dim; single block: fused qkv+MLP-in
    D (3D + mlp_dim) + out (D + mlp_dim) D. Embedders: x (in_ch -> D), context (context_dim -> D), final (D -> in_ch).
    ``context_dim_in`` > 0 adds the generation adapter (context_dim_in -> context_dim -> context_dim) on the context.
    Modulation / timestep MLPs act once per sample and are not counted.
    """
    d, m = cfg.hidden_size, cfg.mlp_dim
    tokens = image_tokens + context_tokens
    double = (4 * d * d + 2 * d * m) * tokens
    single = (d * (3 * d + m) + (d + m) * d) * tokens
    embed = 2 * cfg.in_channels * d * image_tokens + cfg.context_dim * d * context_tokens
    adapter = (context_dim_in * cfg.context_dim + cfg.context_dim**2) * context_tokens if context_dim_in else 0
    dense = 2.0 * (cfg.num_double_blocks * double + cfg.num_single_blocks * single + embed + adapter)
    attention = 4.0 * tokens * tokens * d * (cfg.num_double_blocks + cfg.num_single_blocks)
    return dense + attention


def adapter_forward_flops(cfg: FluxDiTConfig, context_tokens: int) -> float:
    """Generation adapter forward for one sample."""
    return 2.0 * (ADAPTER_IN * cfg.context_dim + cfg.context_dim**2) * context_tokens


def merger_forward_flops(tokens: int, hidden: int = 3584, intermediate: int = 18944, heads: int = 28,
                         kv_heads: int = 4, head_dim: int = 128, projector: int = 16384, out: int = 4096) -> float:
    """Editing merger forward for one sample: one bidirectional Qwen2.5 layer + projector on ``tokens``."""
    layer = hidden * heads * head_dim * 2 + 2 * hidden * kv_heads * head_dim + 3 * hidden * intermediate
    dense = 2.0 * (layer + hidden * projector + projector * out) * tokens
    return dense + 4.0 * tokens * tokens * heads * head_dim


def decoder_train_flops(cfg: FluxDiTConfig, batch: int, image_tokens: int, context_tokens: int) -> float:
    """Generation-decoder train step (DiT + adapter all trainable): 3 x forward."""
    return 3.0 * batch * dit_forward_flops(cfg, image_tokens, context_tokens, ADAPTER_IN)


def sample_flops(
    cfg: FluxDiTConfig, batch: int, image_tokens: int, context_tokens: int, negative_tokens: int, steps: int,
    cfg_scale: float,
) -> float:
    """Sampling: the adapter once, then ``steps`` x (positive DiT pass [+ negative pass if cfg_scale != 1])."""
    pos = dit_forward_flops(cfg, image_tokens, context_tokens)
    neg = dit_forward_flops(cfg, image_tokens, negative_tokens) if cfg_scale != 1.0 else 0.0
    return batch * (steps * (pos + neg) + adapter_forward_flops(cfg, context_tokens))
