"""FLUX DiT conversion: a diffusers original imported and compared at the output level (fp32), bit-exact round
trips through every supported layout (diffusers, DiffSynth, BFL), sharded import."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from flax import nnx

from configs.flux import FluxDiTConfig
from conversion import io, state
from conversion.cli import main as convert
from conversion.pipeline import load_model
from nexus_jax.models.flux import image_ids

FLUX = FluxDiTConfig.tiny()


def torch_flux(cfg: FluxDiTConfig, seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=cfg.in_channels,
        num_layers=cfg.num_double_blocks,
        num_single_layers=cfg.num_single_blocks,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_dim,
        pooled_projection_dim=cfg.pooled_dim,
        guidance_embeds=cfg.guidance_embed,
        axes_dims_rope=cfg.rope_axes_dim,
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm_q" in name or "norm_k" in name or "norm_added" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.6 / max(p.shape[-1], 1) ** 0.5 if p.ndim == 2 else 0.05))
    return model


def flux_inputs(cfg: FluxDiTConfig, b: int, h: int, w: int, lt: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    txt_ids = np.stack([np.ones(lt), rng.uniform(0, 30, lt), rng.uniform(0, 30, lt)], -1).astype(np.float32)
    return dict(
        tokens=rng.standard_normal((b, (h // 2) * (w // 2), cfg.in_channels)).astype(np.float32),
        sigma=np.linspace(0.93, 0.21, b).astype(np.float32),
        context=rng.standard_normal((b, lt, cfg.context_dim)).astype(np.float32),
        pooled=rng.standard_normal((b, cfg.pooled_dim)).astype(np.float32),
        txt_ids=txt_ids,
        img_ids=np.asarray(image_ids(h, w)),
        guidance=np.linspace(3.5, 1.0, b).astype(np.float32),
    )


def state_dict_np(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: io.torch_to_numpy(v) for k, v in model.state_dict().items()}


def assert_same_tensors(path, want: dict[str, np.ndarray]) -> None:
    with io.open_checkpoint(path) as got:
        assert sorted(got.shapes) == sorted(want)
        for k, v in want.items():
            x = got.read(k)
            assert x.dtype == v.dtype and x.shape == v.shape and x.tobytes() == v.tobytes(), k


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    ref = torch_flux(FLUX)
    ref.save_pretrained(root / "diffusers", max_shard_size="40KB")
    assert (
        convert(
            [
                "import",
                str(root / "diffusers"),
                str(root / "jax"),
                "--family",
                "flux_dit",
                "--config",
                "tiny",
                "--no-progress",
            ]
        )
        == 0
    )
    return ref, root


def test_imported_flux_matches_diffusers(flux):
    ref, root = flux
    model = load_model(root / "jax")
    x = flux_inputs(FLUX, 2, 8, 12, 520)  # non-square latent grid, long context
    out = np.asarray(nnx.jit(lambda m, a: m(**a))(model, {k: jnp.asarray(v) for k, v in x.items()}))
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    with torch.no_grad():
        want = ref(
            hidden_states=t["tokens"],
            encoder_hidden_states=t["context"],
            pooled_projections=t["pooled"],
            timestep=t["sigma"],
            img_ids=t["img_ids"],
            txt_ids=t["txt_ids"],
            guidance=t["guidance"],
        ).sample
    err = np.abs(out - want.numpy()).max()
    print(f"FLUX DiT imported from diffusers: max abs err {err:.2e} (|ref| max {want.abs().max():.2f})")
    assert err <= 1e-4 and want.abs().max() > 0.1


def test_flux_round_trips_through_every_layout(flux):
    ref, root = flux
    sd = state_dict_np(ref)
    assert convert(["export", str(root / "jax"), str(root / "back"), "--max-shard-size", "64KB", "--no-progress"]) == 0
    assert_same_tensors(root / "back", sd)  # default export = the layout it came from (diffusers)
    d = FLUX.hidden_size
    for scheme in ("bfl_flux", "diffsynth_flux_dit"):
        out = root / scheme
        assert convert(["export", str(root / "jax"), str(out), "--scheme", scheme, "--no-progress"]) == 0
        assert convert(["detect", str(out)]) == 0
        assert (
            convert(
                [
                    "import",
                    str(out),
                    str(root / f"{scheme}_jax"),
                    "--family",
                    "flux_dit",
                    "--config",
                    "tiny",
                    "--no-progress",
                ]
            )
            == 0
        )
        assert (
            convert(
                [
                    "export",
                    str(root / f"{scheme}_jax"),
                    str(root / f"{scheme}_back"),
                    "--scheme",
                    "diffusers_flux_transformer",
                    "--no-progress",
                ]
            )
            == 0
        )
        assert_same_tensors(root / f"{scheme}_back", sd)
    with io.open_checkpoint(root / "bfl_flux") as bfl, io.open_checkpoint(root / "diffsynth_flux_dit") as ds:
        swapped = bfl.read("final_layer.adaLN_modulation.1.weight")  # BFL: (shift, scale)
        ours = ds.read("final_norm_out.linear.weight")  # DiffSynth: (scale, shift)
        np.testing.assert_array_equal(swapped[:d], ours[d:])
        np.testing.assert_array_equal(swapped[d:], ours[:d])
        np.testing.assert_array_equal(ours, sd["norm_out.linear.weight"])
        qkv = ds.read("blocks.1.attn.a_to_qkv.weight")
        np.testing.assert_array_equal(qkv[d : 2 * d], sd["transformer_blocks.1.attn.to_k.weight"])


def test_flux_import_sharded_equals_unsharded(flux, tmp_path):
    """--mesh stores each tensor with its target sharding; loading on the mesh gives sharded parameters equal to
    the unsharded import, bit for bit (the sharded forward itself is tested with the model)."""
    _, root = flux
    from nexus_jax.sharding import TRAIN_RULES, make_mesh

    assert (
        convert(
            [
                "import",
                str(root / "diffusers"),
                str(tmp_path / "j"),
                "--family",
                "flux_dit",
                "--config",
                "tiny",
                "--mesh",
                "1,4,2",
                "--no-progress",
            ]
        )
        == 0
    )
    a = state.flat_variables(load_model(tmp_path / "j", mesh=make_mesh(1, 4, 2), rules=TRAIN_RULES))
    b = state.flat_variables(load_model(root / "jax"))
    assert sorted(a) == sorted(b)
    for name, var in a.items():
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(b[name].get_value()), err_msg=name)
    k = a["single_blocks.0.to_qkv_mlp.kernel"].get_value()
    assert not k.sharding.is_fully_replicated and len(k.sharding.device_set) == 8
    assert k.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert convert(["export", str(tmp_path / "j"), str(tmp_path / "back"), "--no-progress"]) == 0
    assert_same_tensors(tmp_path / "back", state_dict_np(flux[0]))
