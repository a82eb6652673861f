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



class TorchUniPic(nn.Module):
    """Container with upstream's attribute names, so ``state_dict()`` has the published ``pytorch_model.bin`` keys
    (``llm.``, ``mar.`` incl. ``mar.diffloss.net.``, ``proj_in.``, ``proj_out.``)."""

    def __init__(self, llm: nn.Module, mar: nn.Module, diffloss: nn.Module, proj_in: nn.Module, proj_out: nn.Module):
        super().__init__()
        self.llm, self.mar, self.proj_in, self.proj_out = llm, mar, proj_in, proj_out
        self.mar.diffloss = diffloss


def jax_from_torch(ctor, mapping, state_dict: dict[str, torch.Tensor]):
    """An nnx module built abstractly by ``ctor`` (no random init, no per-shape init compiles) and filled from a torch
    state dict through a conversion table (``conversion.engine``)."""
    from flax import nnx

    from conversion.engine import execute, plan
    from conversion.state import assign, param_shapes

    module = nnx.eval_shape(ctor)
    sd = {k: v.detach().numpy() for k, v in state_dict.items()}
    steps = plan(mapping, {k: v.shape for k, v in sd.items()}, param_shapes(module), "to_jax")
    return assign(module, dict(execute(steps, sd.__getitem__)))


def reference_models(cfg, *, vae: bool = True):
    """Random torch UniPic (+ KL-16 VAE codec and the head's diffusion) at ``cfg`` and the JAX models holding the same
    weights, imported through the real tables. Returns (torch UniPic, diffusion, codec, JAX UniPic, JAX VAE)."""
    from flax import nnx

    from conversion.tables.kl16_vae import kl16_mapping
    from conversion.tables.unipic import unipic_mapping
    from nexus_jax.models.unipic.model import UniPic
    from nexus_jax.models.vae import FluxVAE
    from tests.helpers.diffloss_torch import DiffLoss, Diffusion, cosine_betas, randomise_, space_timesteps
    from tests.helpers.kl16_torch import KL16AutoencoderKL, UniPicVAECodec
    from tests.helpers.mar_torch import TorchMAR, randomize_, torch_projector
    from tests.helpers.qwen2_reference import build_hf_model

    text, mar_cfg, head = cfg.text, cfg.mar, cfg.head
    t_diff = DiffLoss(in_channels=head.in_channels, width=head.width, out_channels=head.out_channels,
                      z_channels=head.z_channels, depth=head.depth, time_dim=head.time_dim)
    randomise_(t_diff, seed=3)
    tu = TorchUniPic(
        build_hf_model(text, seed=1, std=0.08), randomize_(TorchMAR(mar_cfg), seed=2), t_diff,
        randomize_(torch_projector(mar_cfg.width, text.hidden_size, text.hidden_size), seed=4),
        randomize_(torch_projector(text.hidden_size, text.hidden_size, mar_cfg.width), seed=5),
    ).eval()
    model = jax_from_torch(lambda: UniPic(cfg, rngs=nnx.Rngs(0)), unipic_mapping(cfg), tu.state_dict())
    diffusion = Diffusion(cosine_betas(cfg.diffusion.num_timesteps, cfg.diffusion.max_beta),
                          space_timesteps(cfg.diffusion.num_timesteps, int(cfg.diffusion.sampling_steps)))
    if not vae:
        return tu, diffusion, None, model, None
    vcfg = cfg.vae
    ch = vcfg.block_out_channels[0]
    t_vae = KL16AutoencoderKL(ch=ch, ch_mult=tuple(c // ch for c in vcfg.block_out_channels),
                              embed_dim=vcfg.latent_channels, groups=vcfg.norm_num_groups).eval()
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in t_vae.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    jvae = jax_from_torch(lambda: FluxVAE(vcfg, rngs=nnx.Rngs(0)), kl16_mapping(vcfg), t_vae.state_dict())
    return tu, diffusion, UniPicVAECodec(t_vae, vcfg.scaling_factor), model, jvae


@torch.no_grad()
def iteration(
    model: TorchUniPic, diffusion, kv, ctx_mask: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
    orders: torch.Tensor, step: int, init_noise: torch.Tensor, step_noise: torch.Tensor, *, num_iter: int, cfg: float,
    cfg_schedule: str, temperature: float, buffer_size: int, x_con: torch.Tensor | None = None, image_shape=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One upstream iteration on the cond tokens [G, N, C] and mask [G, N] (1 = masked) -> (tokens, mask_next).
    ``image_shape`` (h, w): a grid other than the MAR's trained one (positional tables resized)."""
    mar, net = model.mar, model.mar.diffloss.net
    g, n = orders.shape
    cur = tokens.clone()
    tokens2, mask2 = torch.cat([tokens, tokens]), torch.cat([mask, mask])
    x_enc = mar.forward_mae_encoder(tokens2, mask2, mar.fake_latent.expand(2 * g, -1), image_shape)
    x_enc = bridge(model.llm.model, model.proj_in, model.proj_out, x_enc, kv, ctx_mask, buffer_size)
    z = mar.forward_mae_decoder(x_enc, mask2, image_shape, x_con=x_con)
    ratio = np.cos(math.pi / 2.0 * (step + 1) / num_iter)
    mask_len = torch.Tensor([np.floor(n * ratio)])
    mask_len = torch.maximum(torch.Tensor([1]), torch.minimum(torch.sum(mask, dim=-1, keepdims=True) - 1, mask_len))
    mask_next = mask_by_order(int(mask_len[0]), orders, n)
    to_pred = mask.bool() if step >= num_iter - 1 else torch.logical_xor(mask.bool(), mask_next)
    z_pred = z[torch.cat([to_pred, to_pred]).nonzero(as_tuple=True)]
    cfg_iter = cfg if cfg_schedule == "constant" else 1 + (cfg - 1) * (n - mask_len[0]) / n
    x_t = torch.cat([init_noise, init_noise])
    steps = torch.cat([step_noise, step_noise], dim=1)
    out = diffusion.p_sample_loop(net, z_pred, x_t, steps, temperature, cfg=cfg_iter)
    cur[to_pred.nonzero(as_tuple=True)] = out.chunk(2, dim=0)[0]
    return cur, mask_next.float()


@torch.no_grad()
def sample(
    model: TorchUniPic, diffusion, codec, ctx_embeds: torch.Tensor, ctx_mask: torch.Tensor, orders: torch.Tensor,
    init_noise, step_noise, *, num_iter: int, cfg: float, cfg_schedule: str = "constant", temperature: float = 1.0,
    buffer_size: int, grid: int, x_con: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream ``SkyworkUnipic.sample`` with CFG: ctx rows [cond G; uncond G] (right-padded), orders [G, N].

    Randomness comes in: ``init_noise[k]`` [G * n_k, C] is the head's x_T for the step's predicted cond tokens (rows
    in ``nonzero`` order, shared by the uncond half), ``step_noise[k]`` [S, G * n_k, C] the per-step noise of the cond
    half (the uncond half's x never reaches the output). Returns (tokens [G, N, C], pixels [G, 3, R, R]).
    """
    g, n = orders.shape
    c = init_noise[0].shape[-1]
    kv = prefill(model.llm.model, ctx_embeds)
    tokens, mask = torch.zeros(g, n, c), torch.ones(g, n)
    for step in range(num_iter):
        tokens, mask = iteration(model, diffusion, kv, ctx_mask, tokens, mask, orders, step, init_noise[step],
                                 step_noise[step], num_iter=num_iter, cfg=cfg, cfg_schedule=cfg_schedule,
                                 temperature=temperature, buffer_size=buffer_size, x_con=x_con,
                                 image_shape=(grid, grid))
    return tokens, codec.decode(tokens.reshape(g, grid, grid, c))
