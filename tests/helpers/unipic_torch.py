"""PyTorch reference of UniPic-1's LLM bridge and masked-AR sampling loop (unipic.md 2.5, 3.1, 3.2), written from the
specification as upstream ``SkyworkUnipic.forward_mae_encoder`` / ``sample`` do it: token dropping, a transformers
``Qwen2Model`` with a ``DynamicCache`` prefix that is cropped back to the context after every iteration.

The MAR, diffusion head and VAE are the other helpers' torch modules (passed in); this file only composes them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def prefill(qwen: nn.Module, ctx_embeds: torch.Tensor):
    """Upstream prefill: ``attention_mask=None, position_ids=None, use_cache=True`` -> the DynamicCache."""
    return qwen(inputs_embeds=ctx_embeds, attention_mask=None, position_ids=None, use_cache=True).past_key_values


def bridge(
    qwen: nn.Module, proj_in: nn.Module, proj_out: nn.Module, x_enc: torch.Tensor, past_key_values,
    ctx_mask: torch.Tensor, buffer_size: int,
) -> torch.Tensor:
    """x_enc (B, buffers + N_vis, C) after token dropping -> x_enc + proj_out(h); the cache is cropped back.

    attention_mask = [ctx_mask ; ones], position_ids = cumsum - 1 (clamped at 0), last L_img of them with a cache.
    """
    z = proj_in(x_enc)
    z = torch.cat([z[:, buffer_size:], z[:, :buffer_size]], dim=1)
    b, l_img = z.shape[:2]
    attention_mask = torch.cat([ctx_mask.long(), torch.ones(b, l_img, dtype=torch.long)], dim=1)
    position_ids = (torch.cumsum(attention_mask, dim=1) - 1).clamp(min=0)[:, -l_img:]
    out = qwen(inputs_embeds=z, attention_mask=attention_mask, position_ids=position_ids,
               past_key_values=past_key_values, use_cache=True)
    past_key_values.crop(-l_img)  # back to the context (upstream curtail_cache)
    h = out.last_hidden_state[:, -l_img:]
    h = torch.cat([h[:, -buffer_size:], h[:, :-buffer_size]], dim=1)
    return x_enc + proj_out(h)


def mask_by_order(mask_len: int, orders: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first ``mask_len`` entries of each row's order stay masked (MAR ``mask_by_order``)."""
    masking = torch.zeros(orders.shape[0], seq_len)
    masking = torch.scatter(masking, -1, orders[:, :mask_len].long(), torch.ones(orders.shape[0], seq_len))
    return masking.bool()


def mask_len_at(step: int, num_iter: int, seq_len: int, num_masked: int) -> int:
    """MaskGIT cosine: floor(N cos(pi/2 (step+1)/num_iter)) clipped to [1, num_masked - 1] (upstream numpy/torch)."""
    ratio = math.cos(math.pi / 2.0 * (step + 1) / num_iter)
    mask_len = int(np.floor(seq_len * ratio))
    return max(1, min(num_masked - 1, mask_len))
