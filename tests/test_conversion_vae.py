"""FLUX VAE conversion: a diffusers AutoencoderKL (tiny, random) imported and compared at the output level (fp32),
and a bit-exact round trip through BFL ``ae.safetensors`` names."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from flax import nnx

from configs.vae import FluxVAEConfig
from conversion import io
from conversion.cli import main as convert
from conversion.pipeline import load_model
from tests.test_conversion_diffusion import assert_same_tensors, state_dict_np

VAE = FluxVAEConfig.tiny()


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    ref = AutoencoderKL(**VAE.diffusers_kwargs()).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.save_pretrained(root / "diffusers", max_shard_size="100KB")
    assert (
        convert(
            [
                "import",
                str(root / "diffusers"),
                str(root / "jax"),
                "--family",
                "vae",
                "--config",
                "tiny",
                "--no-progress",
            ]
        )
        == 0
    )
    return ref, root


def test_imported_vae_matches_diffusers(vae):
    ref, root = vae
    model = load_model(root / "jax")
    z = torch.randn(2, VAE.latent_channels, 5, 7, generator=torch.Generator().manual_seed(2))  # non-square
    with torch.no_grad():
        want = ref.decode(z / VAE.scaling_factor + VAE.shift_factor).sample.numpy().transpose(0, 2, 3, 1)
    out = np.asarray(nnx.jit(lambda m, x: m.decode(x))(model, jnp.asarray(z.numpy().transpose(0, 2, 3, 1))))
    err = np.abs(out - want).max()
    print(f"VAE decoder imported from diffusers: max abs err {err:.2e}")
    assert err <= 1e-4


def test_vae_round_trips_through_bfl(vae):
    ref, root = vae
    sd = state_dict_np(ref)
    assert convert(["export", str(root / "jax"), str(root / "bfl"), "--scheme", "bfl_vae", "--no-progress"]) == 0
    with io.open_checkpoint(root / "bfl") as bfl:
        assert "decoder.up.0.block.2.conv1.weight" in bfl.shapes  # diffusers up_blocks.3 = BFL up.0
        assert bfl.shapes["encoder.mid.attn_1.q.weight"][2:] == (1, 1)
        np.testing.assert_array_equal(
            bfl.read("decoder.up.0.block.2.conv1.weight"), sd["decoder.up_blocks.3.resnets.2.conv1.weight"]
        )
    assert (
        convert(
            ["import", str(root / "bfl"), str(root / "bfl_jax"), "--family", "vae", "--config", "tiny", "--no-progress"]
        )
        == 0
    )
    assert (
        convert(["export", str(root / "bfl_jax"), str(root / "back"), "--scheme", "diffusers_vae", "--no-progress"])
        == 0
    )
    assert_same_tensors(root / "back", sd)
