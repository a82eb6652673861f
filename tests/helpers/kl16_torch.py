"""PyTorch reference of MAR's KL-16 VAE (LDM ``AutoencoderKL``, LTH14/mar ``models/vae.py`` structure and names),
written from the specification for parity and conversion tests: ``state_dict()`` keys are ``kl16.ckpt``'s.

Encoder: ``conv_in``; per level i ``down.i.block.j`` (ResnetBlock, ``nin_shortcut`` when widths change), followed
by ``down.i.attn.j`` where the nominal resolution ``resolution / 2**i`` is in ``attn_resolutions``, and
``down.i.downsample.conv`` (pad (0, 1, 0, 1), 3x3 stride 2) except at the last level; ``mid.{block_1, attn_1,
block_2}``; ``norm_out``; swish; ``conv_out`` (2 * z). Decoder: ``conv_in``; ``mid``; levels from the last to the
first, stored so that ``up[i]`` is level i (``num_res_blocks + 1`` blocks, ``upsample.conv`` after nearest x2 except
at level 0); ``norm_out``; swish; ``conv_out``. MAR builds the decoder with ``attn_resolutions=()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head attention over all positions with 1x1-conv q, k, v, proj_out; scale C**-0.5."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = group_norm(c, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        q = q.reshape(b, c, hh * ww).permute(0, 2, 1)  # b, hw, c
        w = torch.softmax(torch.bmm(q, k.reshape(b, c, hh * ww)) * c**-0.5, dim=2)  # b, hw(q), hw(k)
        out = torch.bmm(v.reshape(b, c, hh * ww), w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(c: int, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(c, c, groups), AttnBlock(c, groups), ResnetBlock(c, c, groups)
    return mid


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


def _stack(blocks: nn.ModuleList, attns: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
    for j, block in enumerate(blocks):
        h = block(h)
        if len(attns) > 0:
            h = attns[j](h)
    return h


class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, groups, in_channels=3):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult, res, block_in = (1, *ch_mult), resolution, ch
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            down = nn.Module()
            down.block, down.attn = nn.ModuleList(), nn.ModuleList()
            block_in = ch * in_mult[i]
            for _ in range(num_res_blocks):
                down.block.append(ResnetBlock(block_in, ch * mult, groups))
                block_in = ch * mult
                if res in attn_resolutions:
                    down.attn.append(AttnBlock(block_in, groups))
            if i != len(ch_mult) - 1:
                down.downsample = Downsample(block_in)
                res //= 2
            self.down.append(down)
        self.mid = _mid(block_in, groups)
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for down in self.down:
            h = _stack(down.block, down.attn, h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, groups, out_ch=3):
        super().__init__()
        n = len(ch_mult)
        block_in, res = ch * ch_mult[-1], resolution // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, groups)
        self.up = nn.ModuleList()
        for i in reversed(range(n)):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, ch * ch_mult[i], groups))
                block_in = ch * ch_mult[i]
                if res in attn_resolutions:
                    up.attn.append(AttnBlock(block_in, groups))
            if i != 0:
                up.upsample = Upsample(block_in)
                res *= 2
            self.up.insert(0, up)
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for i in reversed(range(len(self.up))):
            h = _stack(self.up[i].block, self.up[i].attn, h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class KL16AutoencoderKL(nn.Module):
    """``encode`` -> (mean, logvar clamped to [-30, 20]); ``decode(z) = decoder(post_quant_conv(z))`` (NCHW, raw)."""

    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), embed_dim=16, groups=32, num_res_blocks=2,
                 encoder_attn_resolutions=(16,), decoder_attn_resolutions=(), resolution=256):  # fmt: skip
        super().__init__()
        common = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, resolution=resolution,
                      z_channels=embed_dim, groups=groups)  # fmt: skip
        self.encoder = Encoder(attn_resolutions=encoder_attn_resolutions, **common)
        self.decoder = Decoder(attn_resolutions=decoder_attn_resolutions, **common)
        self.quant_conv = nn.Conv2d(2 * embed_dim, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = torch.chunk(self.quant_conv(self.encoder(x)), 2, dim=1)
        return mean, torch.clamp(logvar, -30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


class UniPicVAECodec(nn.Module):
    """UniPic-1's ``SkyworkUnipic.encode/decode`` around the VAE (patch size 1): tokens are ``b m n c``."""

    def __init__(self, vae: KL16AutoencoderKL, scale: float = 0.2325):
        super().__init__()
        self.vae, self.scale = vae, scale

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, H/16, W/16, C] (posterior mode * scale)."""
        return (self.vae.encode(x)[0] * self.scale).permute(0, 2, 3, 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """[B, m, n, C] -> [B, 3, 16m, 16n]."""
        return self.vae.decode((z / self.scale).permute(0, 3, 1, 2))


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """UniPic-1 text2image.py: ``clamp(127.5 x + 128, 0, 255).to(uint8)``."""
    return torch.clamp(127.5 * x + 128.0, 0, 255).to(dtype=torch.uint8)
