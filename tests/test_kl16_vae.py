"""KL-16 VAE (MAR / UniPic-1) on the FluxVAE module: ``kl16.ckpt`` ({"model": sd}) -> JAX through the conversion
CLI, encode/decode parity (fp32) with an LDM-structured torch reference and with diffusers, bit-exact round trip."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from flax import nnx

from configs.vae import FluxVAEConfig, kl16, kl16_tiny
from conversion import io
from conversion.cli import main as convert
from conversion.engine import execute, output_shapes, plan
from conversion.families import get_family
from conversion.pipeline import load_model
from conversion.schemes import detect_scheme
from conversion.state import abstract_params, assign
from conversion.tables.vae import _jax_shapes
from nexus_jax.models.vae import FluxVAE, decode_tokens, encode_tokens, pixels_to_uint8, pixels_to_uint8_unipic
from tests.helpers.kl16_torch import KL16AutoencoderKL, UniPicVAECodec, to_uint8

CFG = kl16_tiny()
BATCH, HEIGHT, WIDTH = 2, 48, 80  # non-square; latent grid 3 x 5
GRID = (HEIGHT // 16, WIDTH // 16)


def torch_kl16(cfg: FluxVAEConfig) -> KL16AutoencoderKL:
    """The LDM torch module with ``cfg``'s widths (MAR's defaults otherwise: attention at nominal resolution 16)."""
    ch = cfg.block_out_channels[0]
    return KL16AutoencoderKL(
        ch=ch,
        ch_mult=tuple(c // ch for c in cfg.block_out_channels),
        embed_dim=cfg.latent_channels,
        groups=cfg.norm_num_groups,
    )


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(torch reference, its state dict, work dir, JAX model imported from ``kl16.ckpt`` by the CLI)."""
    root = tmp_path_factory.mktemp("kl16")
    torch.manual_seed(0)
    ref = torch_kl16(CFG).eval()
    with torch.no_grad():
        for p in ref.parameters():  # non-trivial GroupNorm affines and biases
            p.add_(0.05 * torch.randn_like(p))
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    torch.save({"model": sd}, root / "kl16.ckpt")
    args = ["import", str(root / "kl16.ckpt"), str(root / "jax"), "--family", "kl16_vae", "--config", "tiny"]
    assert convert([*args, "--no-progress"]) == 0
    return ref, sd, root, load_model(root / "jax")


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.rand(BATCH, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    """Scaled latent tokens [B, m*n, 16] as the MAR sampler produces them."""
    return torch.randn(BATCH, GRID[0] * GRID[1], CFG.latent_channels, generator=torch.Generator().manual_seed(2))


def nhwc(x: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def test_kl16_ckpt_is_detected(converted):
    _, sd, _, _ = converted
    assert detect_scheme(sd) == "kl16_vae"
    assert "encoder.down.4.attn.1.q.weight" in sd and not any(".attn." in k for k in sd if k.startswith("decoder.up"))


def test_encode_tokens_matches_torch(converted, pixels):
    ref, _, _, model = converted
    with torch.no_grad():
        want = UniPicVAECodec(ref).encode(pixels).reshape(BATCH, -1, CFG.latent_channels).numpy()
        _, want_logvar = ref.encode(pixels)
    out, (_, logvar) = nnx.jit(lambda m, x: (encode_tokens(m, x), m.encode_moments(x)))(model, nhwc(pixels))
    out = np.asarray(out)
    assert out.shape == (BATCH, GRID[0] * GRID[1], CFG.latent_channels)
    err = np.abs(out - want).max()
    err_logvar = np.abs(np.asarray(logvar) - want_logvar.numpy().transpose(0, 2, 3, 1)).max()
    print(f"KL-16 encode_tokens vs torch LDM reference: max abs err {err:.2e} (logvar {err_logvar:.2e})")
    assert err <= 1e-4 and err_logvar <= 1e-4


def test_decode_tokens_matches_torch(converted, tokens):
    ref, _, _, model = converted
    with torch.no_grad():
        want = UniPicVAECodec(ref).decode(tokens.reshape(BATCH, *GRID, -1)).numpy().transpose(0, 2, 3, 1)
    out = np.asarray(nnx.jit(decode_tokens, static_argnums=(2, 3))(model, jnp.asarray(tokens.numpy()), *GRID))
    assert out.shape == (BATCH, HEIGHT, WIDTH, 3)
    err = np.abs(out - want).max()
    print(f"KL-16 decode_tokens vs torch LDM reference: max abs err {err:.2e}")
    assert err <= 1e-4
    np.testing.assert_array_equal(np.asarray(pixels_to_uint8_unipic(jnp.asarray(out))), to_uint8(torch.tensor(out)))


def test_round_trip_is_bit_exact(converted):
    _, sd, root, _ = converted
    assert convert(["export", str(root / "jax"), str(root / "back"), "--format", "bin", "--no-progress"]) == 0
    back = torch.load(root / "back" / "kl16.bin", weights_only=True)
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_diffusers_autoencoder_is_the_same_model(converted, pixels, tokens):
    """diffusers ``AutoencoderKL(**cfg.diffusers_kwargs())`` (AttnDownEncoderBlock2D, quant convs) loads the
    diffusers-scheme export strictly and computes what the LDM module computes."""
    ref, _, root, _ = converted
    assert convert(["export", str(root / "jax"), str(root / "diff"), "--scheme", "diffusers_vae", "--no-progress"]) == 0
    diff = AutoencoderKL(**CFG.diffusers_kwargs()).eval()
    with io.open_checkpoint(root / "diff") as reader:
        diff.load_state_dict({k: torch.from_numpy(reader.read(k)) for k in reader.shapes}, strict=True)
    kinds = [type(b).__name__ for b in (*diff.encoder.down_blocks, *diff.decoder.up_blocks)]
    assert kinds == ["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"] + ["UpDecoderBlock2D"] * 5
    z = (tokens.reshape(BATCH, *GRID, -1) / CFG.scaling_factor).permute(0, 3, 1, 2)
    with torch.no_grad():
        enc_err = (diff.encode(pixels).latent_dist.mode() - ref.encode(pixels)[0]).abs().max().item()
        dec_err = (diff.decode(z).sample - ref.decode(z)).abs().max().item()
    print(f"diffusers AutoencoderKL vs LDM reference: encode {enc_err:.2e}, decode {dec_err:.2e}")
    assert enc_err <= 1e-4 and dec_err <= 1e-4


def test_full_preset_matches_kl16_ckpt_layout():
    """``kl16()`` gives exactly MAR's ``AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))`` keys and shapes."""
    cfg = kl16()
    table = get_family("kl16_vae").table("kl16_vae", cfg)
    ours = output_shapes(table, _jax_shapes(cfg), "to_torch")  # the model's parameter shapes (cached by the table)
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in KL16AutoencoderKL().state_dict().items()}
    assert ours == want
    n = sum(int(np.prod(s)) for s in want.values())
    print(f"KL-16 full: {n / 1e6:.2f}M parameters, {len(want)} tensors")
    assert round(n / 1e6, 1) == 66.5
    assert cfg.downsample_factor == 16 and cfg.scaling_factor == 0.2325 and cfg.shift_factor == 0.0


@pytest.mark.slow  # a third compiled model (~10 s of CPU)
def test_attention_at_other_levels_and_in_the_decoder(tokens):
    """Per-level attention is general: encoder levels (1, 4) and decoder levels (0, 3) (LDM ``attn_resolutions``
    (128, 16) / (256, 32) of 256) convert by name from the LDM module and decode/encode like it."""
    cfg = kl16_tiny(encoder_attention_levels=(1, 4), decoder_attention_levels=(0, 3))
    torch.manual_seed(4)
    ref = KL16AutoencoderKL(ch=8, embed_dim=16, groups=4, encoder_attn_resolutions=(128, 16),
                            decoder_attn_resolutions=(256, 32)).eval()  # fmt: skip
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert "decoder.up.0.attn.2.q.weight" in sd and "encoder.down.1.attn.1.proj_out.weight" in sd
    model, target = abstract_params(lambda: FluxVAE(cfg, rngs=nnx.Rngs(0)))
    table = get_family("kl16_vae").table("kl16_vae", cfg)
    steps = plan(table, {k: v.shape for k, v in sd.items()}, {k: v.shape for k, v in target.items()}, "to_jax")
    model = assign(model, dict(execute(steps, sd.__getitem__)))
    z = tokens.reshape(BATCH, *GRID, -1)
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        want_x = UniPicVAECodec(ref).decode(z).numpy().transpose(0, 2, 3, 1)
        want_z = UniPicVAECodec(ref).encode(x).numpy()
    out_x, out_z = nnx.jit(lambda m, t, p: (decode_tokens(m, t, *GRID), m.encode(p)))(
        model, jnp.asarray(tokens.numpy()), nhwc(x)
    )
    dec_err, enc_err = np.abs(np.asarray(out_x) - want_x).max(), np.abs(np.asarray(out_z) - want_z).max()
    print(f"KL-16 with decoder attention: decode max abs err {dec_err:.2e}, encode {enc_err:.2e}")
    assert dec_err <= 1e-4 and enc_err <= 1e-4


def test_pixels_not_divisible_by_16_raise(converted):
    model = converted[3]
    with pytest.raises(ValueError, match="multiples of 16"):
        encode_tokens(model, jnp.zeros((1, 40, 80, 3)))
    with pytest.raises(ValueError, match=r"h\*w=15"):
        decode_tokens(model, jnp.zeros((1, 16, 16)), 3, 5)


def test_uint8_conventions():
    x = torch.tensor([-1.5, -1.0, -0.999, -0.5, 0.0, 0.003, 0.5, 0.996, 1.0, 2.0])
    x = torch.cat([x, torch.rand(1000, generator=torch.Generator().manual_seed(3)) * 2.2 - 1.1])
    np.testing.assert_array_equal(np.asarray(pixels_to_uint8_unipic(jnp.asarray(x.numpy()))), to_uint8(x).numpy())
    assert int(pixels_to_uint8_unipic(jnp.float32(0.0))) == 128 and int(pixels_to_uint8(jnp.float32(-1.0))) == 0


def test_bad_attention_levels_raise():
    with pytest.raises(ValueError, match="encoder_attention_levels"):
        kl16_tiny(encoder_attention_levels=(5,))
    with pytest.raises(ValueError, match="decoder_attention_levels"):
        kl16_tiny(decoder_attention_levels=(1, 1))
    with pytest.raises(ValueError, match="use_quant_conv"):
        get_family("kl16_vae").table("kl16_vae", FluxVAEConfig.tiny())
