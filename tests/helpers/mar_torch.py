"""PyTorch reference of the UniPic-1 / Harmon MAR encoder and decoder, written from unipic.md 2.4 / 2.6.

Upstream semantics kept on purpose: masked tokens are *dropped* in the encoder
(``x[(1 - mask_with_buffer).nonzero()]``), timm ``Block`` (fused qkv rows q|k|v, exact GELU),
``F.interpolate(mode='bilinear')`` positional resizing.
``load_into_nnx`` copies a torch state dict into our nnx modules by name (Linear weights transposed, Embedding
``weight`` -> ``embedding``) through ``conversion.engine.same_names``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

from configs.mar import MARConfig


class TorchAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class TorchMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TorchBlock(nn.Module):
    """timm ViT Block (pre-LN, no layer scale, dropout off)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = TorchAttention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = TorchMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _resize(image_pe: torch.Tensor, seq_h: int, seq_w: int, h: int, w: int) -> torch.Tensor:
    """[1, seq_h*seq_w, C] -> [1, h*w, C] with F.interpolate bilinear (align_corners=False)."""
    c = image_pe.shape[-1]
    grid = image_pe.reshape(1, seq_h, seq_w, c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h, w), mode="bilinear")
    return grid.permute(0, 2, 3, 1).reshape(1, h * w, c)


class TorchMAR(nn.Module):
    """MAR encoder/decoder with upstream token dropping (no diffusion head)."""

    def __init__(self, cfg: MARConfig):
        super().__init__()
        c, n = cfg.width, cfg.seq_len
        self.seq_h, self.seq_w, self.buffer_size = cfg.seq_h, cfg.seq_w, cfg.buffer_size
        self.class_emb = nn.Embedding(cfg.num_classes, c)
        self.fake_latent = nn.Parameter(torch.randn(1, c) * 0.02)
        self.z_proj = nn.Linear(cfg.token_embed_dim, c)
        self.z_proj_ln = nn.LayerNorm(c, eps=cfg.layer_norm_eps)
        self.encoder_pos_embed_learned = nn.Parameter(torch.randn(1, n + cfg.buffer_size, c) * 0.02)
        blk = dict(num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, eps=cfg.layer_norm_eps)
        self.encoder_blocks = nn.ModuleList([TorchBlock(c, **blk) for _ in range(cfg.encoder_depth)])
        self.encoder_norm = nn.LayerNorm(c, eps=cfg.layer_norm_eps)
        self.decoder_embed = nn.Linear(c, c)
        self.mask_token = nn.Parameter(torch.randn(1, 1, c) * 0.02)
        self.decoder_pos_embed_learned = nn.Parameter(torch.randn(1, n + cfg.buffer_size, c) * 0.02)
        self.decoder_blocks = nn.ModuleList([TorchBlock(c, **blk) for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(c, eps=cfg.layer_norm_eps)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.randn(1, n, c) * 0.02)

    def _pos(self, table: torch.Tensor, buffer: int, shape) -> torch.Tensor:
        if shape is None or tuple(shape) == (self.seq_h, self.seq_w):
            return table
        image = _resize(table[:, buffer:], self.seq_h, self.seq_w, *shape)
        return torch.cat([table[:, :buffer], image], dim=1)

    def forward_mae_encoder(self, x, mask, class_embedding, image_shape=None):
        x = self.z_proj(x)
        bsz, _, c = x.shape
        x = torch.cat([x.new_zeros(bsz, self.buffer_size, c), x], dim=1)
        mask_with_buffer = torch.cat([mask.new_zeros(bsz, self.buffer_size), mask], dim=1)
        x[:, : self.buffer_size] = class_embedding.view(bsz, -1, c)
        x = x + self._pos(self.encoder_pos_embed_learned, self.buffer_size, image_shape)
        x = self.z_proj_ln(x)
        x = x[(1 - mask_with_buffer).nonzero(as_tuple=True)].reshape(bsz, -1, c)
        for block in self.encoder_blocks:
            x = block(x)
        return self.encoder_norm(x)

    def forward_mae_decoder(self, x, mask, image_shape=None, x_con=None):
        x = self.decoder_embed(x)
        mask_with_buffer = torch.cat([torch.zeros(x.size(0), self.buffer_size), mask], dim=1)
        mask_tokens = self.mask_token.repeat(mask_with_buffer.shape[0], mask_with_buffer.shape[1], 1).to(x.dtype)
        x_after_pad = self.decoder_embed(x_con) if x_con is not None else mask_tokens.clone()
        x_after_pad[(1 - mask_with_buffer).nonzero(as_tuple=True)] = x.reshape(x.shape[0] * x.shape[1], x.shape[2])
        x = x_after_pad + self._pos(self.decoder_pos_embed_learned, self.buffer_size, image_shape)
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)[:, self.buffer_size:]
        return x + self._pos(self.diffusion_pos_embed_learned, 0, image_shape)


def torch_projector(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """``Sequential(Linear(in, hidden), SiLU, Linear(hidden, out))`` as UniPic's proj_in / proj_out."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))


def randomize_(module: nn.Module, seed: int = 0, std: float = 0.2) -> nn.Module:
    """Overwrite every parameter with N(0, std) noise (LayerNorm scales around 1) so no path is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1.0 + noise if name.endswith(("norm1.weight", "norm2.weight", "_ln.weight", "norm.weight"))
                    else noise)
    return module


def load_into_nnx(module: nnx.Module, torch_module: nn.Module) -> None:
    """Copy ``torch_module``'s state dict into ``module`` (in place) by name through the converter's same-name rule
    (``conversion.engine.same_names``); every tensor and every parameter must be matched."""
    from conversion.engine import same_names
    from conversion.load import load
    from conversion.state import param_shapes

    load(module, same_names("torch_same_names", param_shapes(module)), torch_module.state_dict())
