"""PyTorch reference for the UniPic-1 / MAR diffusion head and its IDDPM diffusion, written from the spec
(unipic.md 2.7, 3.1, 4.1): ``SimpleMLPAdaLN``, float64 numpy schedule tables, ``p_sample`` / ``p_sample_loop`` with
temperature and in-head CFG, the hybrid training loss, and the MaskGIT step loop's mask lengths.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

# ---------------------------------------------------------------------------------------------------------- network


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, freq_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    def __init__(self, in_channels: int, width: int, out_channels: int, z_channels: int, depth: int,
                 time_dim: int = 256):
        super().__init__()
        self.in_channels = in_channels
        self.time_embed = TimestepEmbedder(width, time_dim)
        self.cond_embed = nn.Linear(z_channels, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_layer = FinalLayer(width, out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        return cfg_forward(self.forward, self.in_channels, x, t, c, cfg_scale)


def cfg_forward(forward, in_channels: int, x, t, c, cfg_scale):
    """Upstream ``forward_with_cfg``: both halves see the cond x; guided eps for both; own variance channels."""
    half = x[: len(x) // 2]
    out = forward(torch.cat([half, half], dim=0), t, c)
    eps, rest = out[:, :in_channels], out[:, in_channels:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


class OraclePrior(nn.Module):
    """Test denoiser that keeps long sample loops O(1): ``eps = sqrt(1 - ab(t)) x_t + net eps`` (the posterior mean
    of eps for N(0, I) data, plus the random net as a residual). ``coef`` [1000] is indexed by the original t."""

    def __init__(self, net: SimpleMLPAdaLN, coef: np.ndarray):
        super().__init__()
        self.net, self.in_channels, self.coef = net, net.in_channels, torch.from_numpy(coef)

    def forward(self, x, t, c):
        out = self.net(x, t, c)
        return torch.cat([out[:, : self.in_channels] + self.coef[t][:, None] * x, out[:, self.in_channels:]], dim=1)

    def forward_with_cfg(self, x, t, c, cfg_scale):
        return cfg_forward(self.forward, self.in_channels, x, t, c, cfg_scale)


class DiffLoss(nn.Module):
    """Holds ``net`` (so state dict keys are ``net.*``, as under ``mar.diffloss``)."""

    def __init__(self, **kw):
        super().__init__()
        self.net = SimpleMLPAdaLN(**kw)


def randomise_(module: nn.Module, seed: int = 0) -> None:
    """Redraw every parameter (incl. the zero-initialised AdaLN and output layers) so parity tests can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("in_ln.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (0.8 / p.shape[1] ** 0.5))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------------------------ schedule (numpy)


def cosine_betas(num_timesteps: int, max_beta: float) -> np.ndarray:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
                     for i in range(num_timesteps)], dtype=np.float64)


def space_timesteps(num_timesteps: int, count: int) -> set[int]:
    """One section of ``count`` evenly spaced steps with a rounded fractional stride."""
    stride = 1 if count <= 1 else (num_timesteps - 1) / (count - 1)
    return {round(i * stride) for i in range(count)}


class Diffusion:
    """Respaced IDDPM with LEARNED_RANGE variance and eps prediction; float64 tables, float32 torch maths."""

    def __init__(self, base_betas: np.ndarray, use_timesteps: set[int]):
        last, betas, self.timestep_map = 1.0, [], []
        for i, ac in enumerate(np.cumprod(1.0 - base_betas)):
            if i in use_timesteps:
                betas.append(1 - ac / last)
                last = ac
                self.timestep_map.append(i)
        b = self.betas = np.array(betas, dtype=np.float64)
        self.num_timesteps = len(b)
        ac = self.alphas_cumprod = np.cumprod(1.0 - b)
        ac_prev = self.alphas_cumprod_prev = np.append(1.0, ac[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1)
        self.posterior_variance = b * (1.0 - ac_prev) / (1.0 - ac)
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = b * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac)

    @staticmethod
    def _x(arr: np.ndarray, t: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(arr)[t].float()[:, None]

    def net_call(self, net, x, t, **kw):
        return net(x, torch.tensor(self.timestep_map)[t], **kw)

    def q_sample(self, x0, t, noise):
        return self._x(self.sqrt_alphas_cumprod, t) * x0 + self._x(self.sqrt_one_minus_alphas_cumprod, t) * noise

    def q_posterior(self, x0, xt, t):
        mean = self._x(self.posterior_mean_coef1, t) * x0 + self._x(self.posterior_mean_coef2, t) * xt
        return mean, self._x(self.posterior_log_variance_clipped, t)

    def p_mean_variance(self, out, x, t):
        c = x.shape[1]
        eps, v = out[:, :c], out[:, c:]
        min_log, max_log = self._x(self.posterior_log_variance_clipped, t), self._x(np.log(self.betas), t)
        frac = (v + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        x0 = self._x(self.sqrt_recip_alphas_cumprod, t) * x - self._x(self.sqrt_recipm1_alphas_cumprod, t) * eps
        mean, _ = self.q_posterior(x0, x, t)
        return mean, log_var, x0

    def p_sample(self, net, x, t, z, noise, temperature=1.0, cfg=None):
        """One step; ``cfg`` not None -> [cond; uncond] batch through ``forward_with_cfg``."""
        if cfg is None:
            out = self.net_call(net.forward, x, t, c=z)
        else:
            out = self.net_call(net.forward_with_cfg, x, t, c=z, cfg_scale=cfg)
        mean, log_var, _ = self.p_mean_variance(out, x, t)
        nonzero = (t != 0).float()[:, None]
        return mean + nonzero * torch.exp(0.5 * log_var) * noise * temperature

    def p_sample_loop(self, net, z, x_T, step_noise, temperature=1.0, cfg=None):
        x = x_T
        for i, t in enumerate(reversed(range(self.num_timesteps))):
            x = self.p_sample(net, x, torch.full((x.shape[0],), t, dtype=torch.long), z, step_noise[i], temperature,
                              cfg)
        return x

    def training_losses(self, net, x0, t, z, noise):
        xt = self.q_sample(x0, t, noise)
        out = self.net_call(net, xt, t, c=z)
        c = x0.shape[1]
        eps = out[:, :c]
        frozen = torch.cat([eps.detach(), out[:, c:]], dim=1)
        true_mean, true_logvar = self.q_posterior(x0, xt, t)
        mean, log_var, _ = self.p_mean_variance(frozen, xt, t)
        kl = 0.5 * (-1.0 + log_var - true_logvar + torch.exp(true_logvar - log_var)
                    + (true_mean - mean) ** 2 * torch.exp(-log_var))
        kl = kl.mean(dim=1) / np.log(2.0)
        nll = -discretized_log_likelihood(x0, mean, 0.5 * log_var).mean(dim=1) / np.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        return ((noise - eps) ** 2).mean(dim=1) + vb


def discretized_log_likelihood(x, means, log_scales):
    def cdf(v):
        return 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (v + 0.044715 * torch.pow(v, 3))))

    inv = torch.exp(-log_scales)
    cdf_plus = cdf(inv * (x - means + 1.0 / 255.0))
    cdf_min = cdf(inv * (x - means - 1.0 / 255.0))
    log_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_plus, torch.where(x > 0.999, log_one_minus_min, log_delta))


def diff_loss(diffusion: Diffusion, net, target, z, mask, batch_mul, t, noise):
    """MAR forward_loss: ``repeat(batch_mul, 1)`` tiling, mask-weighted mean."""
    target, z, mask = target.repeat(batch_mul, 1), z.repeat(batch_mul, 1), mask.repeat(batch_mul)
    loss = diffusion.training_losses(net, target, t, z, noise)
    return (loss * mask).sum() / mask.sum()


# ------------------------------------------------------------------------------------------------- MaskGIT loop


def maskgit_counts(seq_len: int, num_iter: int) -> tuple[list[int], list[int]]:
    """Run the sampling loop's mask bookkeeping on a random order; return (mask_len after each step, #predicted)."""
    order = torch.randperm(seq_len)[None]
    mask = torch.ones(1, seq_len)
    lens, preds = [], []
    for step in range(num_iter):
        ratio = np.cos(math.pi / 2.0 * (step + 1) / num_iter)
        mask_len = torch.Tensor([np.floor(seq_len * ratio)])
        mask_len = torch.maximum(torch.Tensor([1]), torch.minimum(torch.sum(mask, dim=-1, keepdims=True) - 1, mask_len))
        nxt = torch.zeros(1, seq_len).scatter(-1, order[:, : int(mask_len[0])], torch.ones(1, seq_len)).bool()
        to_pred = mask.bool() if step >= num_iter - 1 else torch.logical_xor(mask.bool(), nxt)
        lens.append(int(mask_len[0]))
        preds.append(int(to_pred.sum()))
        mask = nxt.float()
    return lens, preds
