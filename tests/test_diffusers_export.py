"""diffusers / transformers round trips without hand-written configs: the FLUX DiT, the VAE and the Nexus-Gen decoders
exported in diffusers layout load with ``from_pretrained`` (config.json written by the export) and give identical
outputs; import reads a pipeline root (``transformer/``, ``vae/``) with ``--config hf``; AR exports keep bos / eos,
dtype and ``nexus_gen_config.json``, so export -> import needs no config."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from flax import nnx

from configs.flux import FluxDiTConfig
from configs.vae import FluxVAEConfig
from conversion import io
from conversion import orbax as orbax_io
from conversion.cli import main as convert
from conversion.families import get_family
from conversion.pipeline import load_arrays, load_model
from tests.test_conversion_diffusion import flux_inputs, torch_flux

FLUX = FluxDiTConfig.tiny()
VAE = FluxVAEConfig.tiny()


def stored_config(path):
    doc = orbax_io.read_config(path)
    return get_family(doc["family"]).config_from_json(doc["config"])


def all_params(path) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in load_arrays(path).items()}


def assert_same_params(a, b) -> None:
    pa, pb = all_params(a), all_params(b)
    assert sorted(pa) == sorted(pb)
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and pa[k].tobytes() == pb[k].tobytes(), k


def flux_forward(model: FluxTransformer2DModel, x: dict[str, np.ndarray]) -> np.ndarray:
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    with torch.no_grad():
        return model(hidden_states=t["tokens"], encoder_hidden_states=t["context"], pooled_projections=t["pooled"],
                     timestep=t["sigma"], img_ids=t["img_ids"], txt_ids=t["txt_ids"], guidance=t["guidance"]
                     ).sample.numpy()


def pipeline_root(tmp_path):
    root = tmp_path / "FLUX.1-dev"
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    return root


# FLUX.1-dev's transformer/config.json and vae/config.json (diffusers 0.30 dev, as published)
FLUX_DEV_TRANSFORMER = {"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.30.0.dev0",
                        "attention_head_dim": 128, "guidance_embeds": True, "in_channels": 64,
                        "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
                        "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768}
FLUX_DEV_VAE = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0.dev0", "act_fn": "silu",
                "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
                "force_upcast": True, "in_channels": 3, "latent_channels": 16, "latents_mean": None,
                "latents_std": None, "layers_per_block": 2, "mid_block_add_attention": True, "norm_num_groups": 32,
                "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
                "up_block_types": ["UpDecoderBlock2D"] * 4, "use_post_quant_conv": False, "use_quant_conv": False}


def test_flux_dev_configs_read_as_the_full_presets():
    from conversion.diffusers_configs import flux_from_diffusers, flux_to_diffusers, vae_from_diffusers
    from conversion.errors import ConversionError

    assert flux_from_diffusers(FLUX_DEV_TRANSFORMER) == FluxDiTConfig.full()
    assert vae_from_diffusers(FLUX_DEV_VAE) == FluxVAEConfig.full()
    assert flux_from_diffusers(flux_to_diffusers(FLUX)) == FLUX
    with pytest.raises(ConversionError, match="mlp_ratio"):
        flux_to_diffusers(FluxDiTConfig.tiny(mlp_ratio=2.0))
    with pytest.raises(ConversionError, match="act_fn"):
        vae_from_diffusers({**FLUX_DEV_VAE, "act_fn": "gelu"})


def test_flux_dit_pipeline_root_imports_with_hf_config_and_exports_for_from_pretrained(tmp_path):
    ref = torch_flux(FLUX)
    root = pipeline_root(tmp_path)
    ref.save_pretrained(root / "transformer", max_shard_size="40KB")
    assert convert(["import", str(root), str(tmp_path / "jax"), "--family", "flux_dit", "--config", "hf",
                    "--no-progress"]) == 0
    assert stored_config(tmp_path / "jax") == FLUX
    assert convert(["import", str(root), str(tmp_path / "jax_default"), "--family", "flux_dit", "--no-progress"]) == 0
    assert_same_params(tmp_path / "jax", tmp_path / "jax_default")
    out = tmp_path / "export"
    assert convert(["export", str(tmp_path / "jax"), str(out), "--max-shard-size", "40KB", "--no-progress"]) == 0
    back = FluxTransformer2DModel.from_pretrained(str(out)).eval()
    keys = ("in_channels", "num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
            "joint_attention_dim", "pooled_projection_dim", "guidance_embeds", "axes_dims_rope")
    assert {k: list(back.config[k]) if k == "axes_dims_rope" else back.config[k] for k in keys} == {
        k: list(ref.config[k]) if k == "axes_dims_rope" else ref.config[k] for k in keys}
    x = flux_inputs(FLUX, 2, 4, 6, 7)
    want, got = flux_forward(ref, x), flux_forward(back, x)
    print(f"FLUX DiT diffusers -> JAX -> diffusers: max abs diff {np.abs(got - want).max():.1e}")
    assert np.array_equal(got, want) and np.abs(want).max() > 0.1
    # other layouts get no diffusers config.json
    assert convert(["export", str(tmp_path / "jax"), str(tmp_path / "ds"), "--scheme", "diffsynth_flux_dit",
                    "--no-progress"]) == 0
    assert not (tmp_path / "ds" / "config.json").exists()


def test_vae_pipeline_root_imports_with_hf_config_and_exports_for_from_pretrained(tmp_path):
    torch.manual_seed(0)
    ref = AutoencoderKL(**VAE.diffusers_kwargs()).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    root = pipeline_root(tmp_path)
    ref.save_pretrained(root / "vae")
    assert convert(["import", str(root), str(tmp_path / "jax"), "--family", "vae", "--config", "hf",
                    "--no-progress"]) == 0
    assert stored_config(tmp_path / "jax") == VAE
    assert convert(["export", str(tmp_path / "jax"), str(tmp_path / "export"), "--no-progress"]) == 0
    back = AutoencoderKL.from_pretrained(str(tmp_path / "export")).eval()
    x = torch.rand(1, 3, 24, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want_z, got_z = ref.encode(x).latent_dist.mean, back.encode(x).latent_dist.mean
        want, got = ref.decode(want_z).sample, back.decode(want_z).sample
    assert torch.equal(got_z, want_z) and torch.equal(got, want)
    assert back.config.scaling_factor == VAE.scaling_factor and back.config.shift_factor == VAE.shift_factor
    # KL-16 (quant convs, encoder attention) through the same config.json
    kl = FluxVAEConfig.kl16_tiny()
    torch.manual_seed(1)
    ref16 = AutoencoderKL(**kl.diffusers_kwargs()).eval()
    ref16.save_pretrained(tmp_path / "kl16_diffusers")
    assert convert(["import", str(tmp_path / "kl16_diffusers"), str(tmp_path / "kl16_jax"), "--family", "kl16_vae",
                    "--no-progress"]) == 0
    assert stored_config(tmp_path / "kl16_jax") == kl


@pytest.mark.parametrize("kind", ["generation", "editing"])
def test_decoder_exports_in_diffusers_layout_and_round_trips(tmp_path, kind):
    from configs.nexus_decoders import NexusDecoderConfig
    from nexus_jax.default_checkpoint import _save_bin, _torch_arrays, randomize_params
    from nexus_jax.models import nexus_decoders

    cfg = NexusDecoderConfig.tiny()
    cls = nexus_decoders.GenerationDecoder if kind == "generation" else nexus_decoders.EditingDecoder
    family = f"{kind}_decoder"
    model = randomize_params(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))), 3)
    scheme = "nexus_v2_generation" if kind == "generation" else "nexus_v2_editing"
    src = tmp_path / f"{kind}.bin"
    _save_bin(src, _torch_arrays(model, get_family(family).table(scheme, cfg)))
    assert convert(["import", str(src), str(tmp_path / "jax"), "--family", family, "--config", "tiny",
                    "--no-progress"]) == 0
    out = tmp_path / "diffusers"
    diffusers_scheme = f"nexus_diffusers_{kind}"
    assert convert(["export", str(tmp_path / "jax"), str(out), "--scheme", diffusers_scheme, "--max-shard-size",
                    "40KB", "--no-progress"]) == 0
    assert (out / "transformer" / "config.json").is_file() and (out / "nexus_decoder_config.json").is_file()
    # the transformer/ folder is a FluxTransformer2DModel equal to the decoder's DiT
    back = FluxTransformer2DModel.from_pretrained(str(out / "transformer")).eval()
    x = flux_inputs(FLUX, 2, 4, 6, 7)
    want = np.asarray(nnx.jit(lambda m, a: m.dit(**a))(load_model(tmp_path / "jax"),
                                                       {k: jnp.asarray(v) for k, v in x.items()}))
    err = float(np.abs(flux_forward(back, x) - want).max())
    print(f"{kind} decoder DiT, diffusers export vs JAX: max abs err {err:.1e}")
    assert err <= 1e-4 and np.abs(want).max() > 0.1
    # import back without a config (nexus_decoder_config.json), scheme detected; bit-exact; and back to the .bin
    assert convert(["detect", str(out)]) == 0
    assert convert(["import", str(out), str(tmp_path / "jax2"), "--family", family, "--no-progress"]) == 0
    assert stored_config(tmp_path / "jax2") == cfg
    assert_same_params(tmp_path / "jax", tmp_path / "jax2")
    assert convert(["export", str(tmp_path / "jax2"), str(tmp_path / "bin"), "--scheme", scheme, "--format", "bin",
                    "--no-progress"]) == 0
    with io.open_checkpoint(src) as a, io.open_checkpoint(tmp_path / "bin") as b:
        assert sorted(a.shapes) == sorted(b.shapes)
        for k in a.shapes:
            assert a.read(k).tobytes() == b.read(k).tobytes(), k
    # a bin export of a split scheme is refused with a clear message
    assert convert(["export", str(tmp_path / "jax2"), str(tmp_path / "bad"), "--scheme", diffusers_scheme,
                    "--format", "bin", "--no-progress"]) == 1


def test_ar_export_keeps_ids_dtype_and_nexus_config_so_import_needs_no_config(tmp_path):
    from transformers import AutoConfig

    from nexus_jax import default_checkpoint

    default_checkpoint.build(tmp_path / "dc")
    ar = tmp_path / "dc" / "ar"
    assert convert(["import", str(ar), str(tmp_path / "jax"), "--family", "nexus_ar", "--no-progress"]) == 0
    cfg = stored_config(tmp_path / "jax")
    assert cfg == stored_config_from_file(ar / "nexus_gen_config.json")
    assert convert(["export", str(tmp_path / "jax"), str(tmp_path / "hf"), "--no-progress"]) == 0
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    tok = cfg.vl.tokens
    assert (hf["bos_token_id"], hf["eos_token_id"]) == (tok.endoftext, tok.im_end)
    assert hf["dtype"] == hf["torch_dtype"] == "float32"
    loaded = AutoConfig.from_pretrained(str(tmp_path / "hf"))
    assert (loaded.text_config.bos_token_id, loaded.text_config.eos_token_id) == (tok.endoftext, tok.im_end)
    assert (tmp_path / "hf" / "nexus_gen_config.json").is_file()
    assert convert(["import", str(tmp_path / "hf"), str(tmp_path / "jax2"), "--family", "nexus_ar",
                    "--no-progress"]) == 0
    assert stored_config(tmp_path / "jax2") == cfg  # slot grid etc. kept: --config hf alone would refuse 9 slots
    assert_same_params(tmp_path / "jax", tmp_path / "jax2")


def stored_config_from_file(path):
    return get_family("nexus_ar").config_from_json(json.loads(path.read_text()))


def test_qwen2_text_reads_the_hf_config(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hf = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2ForCausalLM(hf).save_pretrained(tmp_path / "qwen2")
    assert convert(["import", str(tmp_path / "qwen2"), str(tmp_path / "jax"), "--family", "qwen2_text",
                    "--no-progress"]) == 0
    cfg = stored_config(tmp_path / "jax")
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        64, 32, 2, 4, 2, 8)
    assert cfg.tie_word_embeddings and cfg.mrope_section is None
    with io.open_checkpoint(tmp_path / "qwen2") as r:
        emb = r.read("model.embed_tokens.weight")
    np.testing.assert_array_equal(all_params(tmp_path / "jax")["model.embed_tokens.embedding"], emb)
