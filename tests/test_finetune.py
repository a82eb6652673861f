"""Fine-tuning from converted weights: ``train --init-from``, ``--set`` overrides, ``convert from-run``.

Flow (slow tests): default checkpoint (upstream PyTorch layout) -> ``convert import`` -> ``train --init-from`` a few
steps (step-1 loss = the converted weights' loss, not a random init's) -> ``convert from-run`` -> ``convert export``
-> transformers / torch reference -> same outputs as the JAX model of the from-run checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conversion.cli import main as convert
from conversion.pipeline import load_arrays, load_model
from nexus_jax import sharding
from nexus_jax.training import state as state_lib
from nexus_jax.training.cli import build_parser, config_from_args, make_task
from nexus_jax.training.cli import main as train_main
from nexus_jax.training.init_from import model_setup
from tests.helpers.checkpoints import converted_default_checkpoint


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """The main job's converted checkpoint: ar/, generation_decoder/, edit_decoder/, vae/, empty_prompt."""
    return converted_default_checkpoint(tmp_path_factory.mktemp("ft"), seed=7)


def _args(preset: str, data: str, run: Path, *extra: str) -> list[str]:
    return ["--preset", preset, "--data", data, "--run-dir", str(run), *extra]


def test_set_overrides_and_schedule_follows_steps(tmp_path, capsys):
    parse = build_parser().parse_args
    cfg = config_from_args(parse(_args("tiny_ar", "x", tmp_path, "--steps", "500")))
    assert cfg.loop.total_steps == 500 and cfg.optim.decay_steps == 500  # preset decays over 40
    cfg = config_from_args(parse(_args("tiny_ar", "x", tmp_path, "--steps", "500", "--set", "optim.decay_steps=80",
                                       "--set", "loop.log_every=3", "--set", "optim.clip_norm=none",
                                       "--set", "optim.frozen=a/,b/", "--set", "checkpoint.async_save=false")))
    assert (cfg.optim.decay_steps, cfg.loop.log_every, cfg.optim.clip_norm, cfg.optim.frozen,
            cfg.checkpoint.async_save) == (80, 3, None, ("a/", "b/"), False)
    from nexus_jax.training.optim import learning_rate_schedule

    assert float(learning_rate_schedule(config_from_args(parse(_args("tiny_ar", "x", tmp_path, "--steps", "400")))
                                        .optim)(300)) > 0  # the preset's 40-step decay would give 0
    for bad, needle in (("optim.decay=5", "no field 'decay'"), ("optim.decay_steps=x", "not an integer"),
                        ("loop.compute_dtype=fp8", "compute_dtype"), ("optim", "section.field=value"),
                        ("optim.schedule=linear", "not one of"), ("data=1", "is a section")):
        assert train_main(_args("tiny_ar", "x", tmp_path, "--set", bad)) == 2
        err = capsys.readouterr().err
        assert needle in err and bad.split("=")[0] in err, (bad, err)


def _abstract_and_hook(cfg, init_from):
    setup = model_setup(cfg, init_from)
    task = make_task(cfg, setup=setup)
    optim = dataclasses.replace(cfg.optim, frozen=cfg.optim.frozen + task.frozen)
    mesh = sharding.mesh_from_config(cfg.mesh)
    _, _, abstract = state_lib.init_train_state(task.model_ctor, optim, mesh, sharding.TRAIN_RULES, 0)
    model_abstract = {k: abstract[k] for k in ("params", "frozen")}
    return model_abstract, task.init_params(model_abstract)


def _flat(tree) -> dict[str, jax.Array]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[".".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))] = leaf
    return out


@pytest.mark.parametrize("preset", ["tiny_ar", pytest.param("tiny_generation_decoder", marks=pytest.mark.slow),
                                    pytest.param("tiny_editing_decoder", marks=pytest.mark.slow)])
def test_init_from_fills_every_parameter_in_its_sharding(converted, tmp_path, preset):
    cfg = config_from_args(build_parser().parse_args(_args(preset, "x", tmp_path)))
    abstract, loaded = _abstract_and_hook(cfg, converted)
    want: dict[str, np.ndarray] = {}
    if preset == "tiny_ar":
        want = {f"{g}.{k}": v for k, v in load_arrays(converted / "ar").items() for g in ("params", "frozen")}
    else:
        sub = "generation_decoder" if "generation" in preset else "edit_decoder"
        from safetensors.numpy import load_file

        for prefix, d in (("decoder.", sub), ("vae.", "vae")):
            want |= {f"{g}.{prefix}{k}": v for k, v in load_arrays(converted / d).items() for g in ("params", "frozen")}
        want |= {"frozen.pooled": load_file(str(converted / "empty_prompt.safetensors"))["pooled"]}
    got, shapes = _flat(loaded), _flat(abstract)
    assert set(got) == set(shapes) and set(got) <= set(want)
    assert len(got) > 50
    sharded = 0
    for name, x in got.items():
        assert x.sharding == shapes[name].sharding and x.dtype == shapes[name].dtype, name
        np.testing.assert_array_equal(np.asarray(x), want[name], err_msg=name)
        sharded += not x.sharding.is_fully_replicated
    assert sharded > 0  # some parameters really are split over the mesh


def test_init_from_mismatch_and_missing_are_named(converted, tmp_path):
    cfg = config_from_args(build_parser().parse_args(_args("tiny_ar", "x", tmp_path)))
    with pytest.raises(ValueError, match=r"differs from the preset's: .*version: preset 'v1', checkpoint 'v2'"):
        model_setup(dataclasses.replace(cfg, model_preset="tiny_v1"), converted)
    with pytest.raises(FileNotFoundError, match="no ar/ model directory"):
        model_setup(cfg, tmp_path)
    with pytest.raises(ValueError, match="holds family 'vae', this job needs 'nexus_ar'"):
        model_setup(cfg, converted / "vae")
    dec = config_from_args(build_parser().parse_args(_args("tiny_editing_decoder", "x", tmp_path)))
    with pytest.raises(FileNotFoundError, match="edit_decoder does not exist"):
        model_setup(dec, tmp_path)
    with pytest.raises(ValueError, match="holds family 'generation_decoder', this job needs 'editing_decoder'"):
        import shutil

        shutil.copytree(converted, tmp_path / "c")
        shutil.rmtree(tmp_path / "c" / "edit_decoder")
        shutil.copytree(converted / "generation_decoder", tmp_path / "c" / "edit_decoder")
        model_setup(dec, tmp_path / "c")


def test_decoder_init_from_reads_the_empty_prompt(converted, tmp_path):
    """Decoder runs get CLIP("") pooled and T5("") (flow_loss.cond_dropout's negative context) from the checkpoint."""
    from safetensors.numpy import load_file

    empty = load_file(str(converted / "empty_prompt.safetensors"))
    cfg = config_from_args(build_parser().parse_args(_args("tiny_generation_decoder", "x", tmp_path)))
    setup = model_setup(cfg, converted)
    np.testing.assert_array_equal(setup.pooled, empty["pooled"].reshape(-1))
    np.testing.assert_array_equal(setup.negative_context, empty["t5"].reshape(empty["t5"].shape[-2:]))
    assert setup.negative_context.shape[1] == setup.model_cfg.decoder.dit.context_dim


# ----------------------------------------------------------------------------------------------- slow: full flow
def _steps(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "steps.jsonl").read_text().splitlines())
            if "loss" in r}


def _reference_loss(argv: list[str], model: nnx.Module, run: Path) -> float:
    """Step-1 loss of ``model``'s weights through the same loop, loaded independently (conversion.load_model)."""
    from nexus_jax.training.loop import train
    from nexus_jax.training.optim import split_trainable

    cfg = config_from_args(build_parser().parse_args(argv))
    cfg = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, total_steps=1))
    task = make_task(cfg)

    def hook(abstract):
        optim = dataclasses.replace(cfg.optim, frozen=cfg.optim.frozen + task.frozen)
        _, params, rest = split_trainable(model, optim)
        return {k: jax.device_put(v, jax.tree.map(lambda a: a.sharding, abstract[k]))
                for k, v in (("params", params), ("frozen", rest))}

    return train(cfg, dataclasses.replace(task, init_params=hook), run).losses[1]


@pytest.mark.slow
def test_ar_finetune_from_run_export_matches_transformers(converted, tmp_path, capsys):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from nexus_jax.data.synthetic import write_ar_dataset
    from nexus_jax.inference import loading
    from tests.test_conversion_ar import padded_text_batch

    data = str(write_ar_dataset(tmp_path / "data", 8, seed=3))
    argv = _args("tiny_ar", data, tmp_path / "run", "--steps", "3", "--batch-size", "4", "--ckpt-every", "3",
                 "--init-from", str(converted), "--set", "loop.log_every=1")
    assert train_main(argv) == 0
    losses = _steps(tmp_path / "run")
    ref = _reference_loss(argv, load_model(converted / "ar"), tmp_path / "ref")
    rand = _reference_loss(argv, make_task(config_from_args(build_parser().parse_args(argv))).model_ctor(),
                           tmp_path / "rand")
    print(f"AR step-1 loss: init-from {losses[1]:.6f}, converted weights {ref:.6f}, random init {rand:.6f}")
    assert abs(losses[1] - ref) <= 1e-5 * abs(ref) and abs(losses[1] - rand) > 1e-3
    capsys.readouterr()
    assert train_main([*argv[:argv.index("--steps") + 1], "4", *argv[argv.index("--steps") + 2:]]) == 0
    assert "done: step 4 (resumed from 3)" in capsys.readouterr().out  # the train checkpoint wins over --init-from
    assert abs(_steps(tmp_path / "run")[4] - losses[3]) > 0  # continued training, not restarted

    assert convert(["from-run", str(tmp_path / "run") + "/3", str(tmp_path / "out")]) == 0
    ck = loading.load(tmp_path / "out")  # what `nexus-jax infer` loads: trained ar/ + the base's decoders / vae
    assert ck.generation is not None and ck.vae is not None
    trained, start = load_arrays(tmp_path / "out" / "ar"), load_arrays(converted / "ar")
    assert max(np.abs(trained[k] - start[k]).max() for k in start if not k.startswith("visual.")) > 0
    assert all(np.array_equal(trained[k], v) for k, v in start.items() if k.startswith("visual."))  # frozen ViT

    assert convert(["export", str(tmp_path / "out" / "ar"), str(tmp_path / "hf"), "--no-progress"]) == 0
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    model = ck.ar
    ids, mask = padded_text_batch(model.config.vl.text.vocab_size, (40, 17), seed=5)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1])[None, None], (3, *ids.shape))
    out = nnx.jit(lambda m, i, p, a: m(i, positions=p, slot_index=jnp.full(i.shape, -1), attention_mask=a))(
        model, jnp.asarray(ids), positions, jnp.asarray(mask))
    import torch

    from conversion import io

    with io.open_checkpoint(tmp_path / "hf") as r:  # the fine-tuned vision_head, as Nexus-Gen's torch code applies it
        head = torch.from_numpy(np.asarray(r.read("vision_head.weight"), np.float32))
    with torch.no_grad():
        t = hf.float()(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                       output_hidden_states=True)
        t_embeds = (t.hidden_states[-1] @ head.T).numpy()
    err = np.abs(np.asarray(out.logits)[mask] - t.logits.numpy()[mask]).max()
    embed_err = np.abs(np.asarray(out.image_embeds)[mask] - t_embeds[mask]).max()
    print(f"AR from-run -> export -> transformers: logits max abs err {err:.2e}, vision_head {embed_err:.2e}")
    assert err <= 1e-4 and embed_err <= 1e-4 and np.abs(t.logits.numpy()).max() > 0.1


@pytest.mark.slow
def test_decoder_finetune_from_run_export_matches_torch(converted, tmp_path):
    import torch

    from nexus_jax.data.synthetic import write_decoder_dataset
    from nexus_jax.models.nexus_decoders import apply_adapter
    from nexus_jax.training.decoder_loop import DecoderTrainModel

    cfg = config_from_args(build_parser().parse_args(_args("tiny_generation_decoder", "x", tmp_path)))
    parts = model_setup(cfg, converted).model_cfg
    data = str(write_decoder_dataset(tmp_path / "data", 8, (parts.embed_rows, parts.embed_dim), seed=2))
    argv = _args("tiny_generation_decoder", data, tmp_path / "run", "--steps", "2", "--batch-size", "4",
                 "--ckpt-every", "2", "--init-from", str(converted), "--set", "loop.log_every=1")
    assert train_main(argv) == 0
    losses = _steps(tmp_path / "run")
    from safetensors.numpy import load_file

    pooled = load_file(str(converted / "empty_prompt.safetensors"))["pooled"]
    model = DecoderTrainModel(load_model(converted / "generation_decoder"), load_model(converted / "vae"), pooled)
    ref = _reference_loss(argv, model, tmp_path / "ref")
    print(f"decoder step-1 loss: init-from {losses[1]:.6f}, converted weights {ref:.6f}")
    assert abs(losses[1] - ref) <= 1e-5 * abs(ref)

    assert convert(["from-run", str(tmp_path / "run" / "2"), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "ar").is_dir() and (tmp_path / "out" / "empty_prompt.safetensors").is_file()
    trained = load_arrays(tmp_path / "out" / "generation_decoder")
    start = load_arrays(converted / "generation_decoder")
    assert max(np.abs(trained[k] - start[k]).max() for k in start) > 0
    vae_out, vae_in = load_arrays(tmp_path / "out" / "vae"), load_arrays(converted / "vae")
    assert all(np.array_equal(vae_out[k], v) for k, v in vae_in.items())  # frozen VAE
    assert convert(["export", str(tmp_path / "out" / "generation_decoder"), str(tmp_path / "bin"), "--format", "bin",
                    "--no-progress"]) == 0
    sd = torch.load(tmp_path / "bin" / "generation_decoder.bin", weights_only=True)
    a = parts.decoder.adapter
    ref_adapter = torch.nn.Sequential(torch.nn.Linear(a.in_dim, a.out_dim), torch.nn.LayerNorm(a.out_dim, eps=a.eps),
                                      torch.nn.ReLU(), torch.nn.Linear(a.out_dim, a.out_dim),
                                      torch.nn.LayerNorm(a.out_dim, eps=a.eps))
    ref_adapter.load_state_dict({k[len("adapter."):]: v for k, v in sd.items() if k.startswith("adapter.")})
    x = np.random.default_rng(0).standard_normal((2, parts.embed_rows, a.in_dim)).astype(np.float32)
    dec = load_model(tmp_path / "out" / "generation_decoder")
    got = np.asarray(apply_adapter(dec.adapter, jnp.asarray(x)))
    with torch.no_grad():
        want = ref_adapter(torch.from_numpy(x)).numpy()
    err = np.abs(got - want).max()
    print(f"decoder from-run -> export .bin -> torch adapter: max abs err {err:.2e}")
    assert err <= 1e-4 and np.abs(want).max() > 0.1
    # the fine-tuned DiT in diffusers layout: FluxTransformer2DModel.from_pretrained gives the JAX DiT's outputs
    from diffusers import FluxTransformer2DModel

    from tests.test_conversion_diffusion import flux_inputs
    from tests.test_diffusers_export import flux_forward

    assert convert(["export", str(tmp_path / "out" / "generation_decoder"), str(tmp_path / "diffusers"), "--scheme",
                    "nexus_diffusers_generation", "--no-progress"]) == 0
    flux = FluxTransformer2DModel.from_pretrained(str(tmp_path / "diffusers" / "transformer")).eval()
    x = flux_inputs(parts.decoder.dit, 2, 4, 6, 7)
    want = np.asarray(nnx.jit(lambda m, a: m.dit(**a))(dec, {k: jnp.asarray(v) for k, v in x.items()}))
    err = float(np.abs(flux_forward(flux, x) - want).max())
    print(f"decoder from-run -> export diffusers -> FluxTransformer2DModel: max abs err {err:.2e}")
    assert err <= 1e-4 and np.abs(want).max() > 0.1
    assert convert(["import", str(tmp_path / "bin" / "generation_decoder.bin"), str(tmp_path / "back"),
                    "--family", "generation_decoder", "--config", str(tmp_path / "out" / "generation_decoder" /
                                                                       "config.json"), "--no-progress"]) == 0
    back = load_arrays(tmp_path / "back")
    assert set(back) == set(trained) and all(np.array_equal(back[k], v) for k, v in trained.items())


def test_config_differences_ignore_input_geometry_only():
    """The editing merger's reference grid and the sampler shape no weight (the run takes the checkpoint's); a
    different merger width does and is named."""
    from configs.nexus_decoders import NexusDecoderConfig
    from nexus_jax.training.init_from import config_differences

    preset = NexusDecoderConfig.tiny()
    regridded = dataclasses.replace(preset, merger=dataclasses.replace(preset.merger, ref_grid=(6, 6)),
                                    sampler=preset.sampler.replace(num_steps=50))
    assert config_differences(preset, regridded) == []
    wider = dataclasses.replace(preset, merger=dataclasses.replace(preset.merger, out_dim=40))
    assert config_differences(preset, wider) == ["merger.out_dim: preset 32, checkpoint 40"]
