"""Conversion engine, I/O and CLI error handling (no reference models needed: sources are synthesised from the
tables themselves)."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest
import torch

from configs.flux import FluxDiTConfig
from conversion import engine, io
from conversion.cli import main as convert
from conversion.cli import parse_size
from conversion.errors import ConversionError, ShapeMismatchError, UnknownSchemeError
from conversion.families import get_family
from conversion.schemes import detect_scheme
from conversion.state import abstract_params
from conversion.tables import flux_dit

CFG = FluxDiTConfig.tiny()


def random_source(mapping: engine.Mapping, jax_shapes, dtype=np.float32, seed: int = 0) -> dict[str, np.ndarray]:
    """A torch-side state dict with the shapes the table expects for ``jax_shapes``."""
    rng = np.random.default_rng(seed)
    out = {}
    for r in mapping.concrete():
        for name, shape in zip(r.torch, r.transform.torch_shapes([jax_shapes[j] for j in r.jax])):
            out[name] = rng.standard_normal(shape).astype(dtype)
    return out


@pytest.fixture(scope="module")
def flux_shapes():
    from flax import nnx

    family = get_family("flux_dit")
    return {k: v.shape for k, v in abstract_params(lambda: family.build(CFG, nnx.Rngs(0)))[1].items()}


def write_st(directory, sd, shard_bytes=20_000, prefix="diffusion_pytorch_model"):
    directory.mkdir(parents=True, exist_ok=True)
    w = io.SafetensorsWriter(directory, [(k, v.shape, v.dtype) for k, v in sd.items()], shard_bytes, prefix=prefix)
    for k, v in sd.items():
        w.write(k, v)
    return w.close()


# ----------------------------------------------------------------------------------------------------- transforms
@pytest.mark.parametrize(
    "transform,shapes",
    [
        (engine.LINEAR, [(5, 3)]),
        (engine.CONV2D, [(4, 3, 3, 2)]),
        (engine.ConvToMatmul((3, 2, 2, 2)), [(5, 3, 2, 2, 2)]),
        (engine.HalfSwap(0), [(6, 3)]),
        (engine.Chain((engine.HalfSwap(0), engine.LINEAR)), [(6, 3)]),
        (engine.Chain((engine.Concat(0, (2, 3, 4)), engine.LINEAR)), [(2, 5), (3, 5), (4, 5)]),
        (engine.Split(1, (3, 1)), [(2, 4)]),
        (engine.Chain((engine.LINEAR, engine.Reshape((5, 6), (5, 3, 2)))), [(6, 5)]),
    ],
)
def test_transforms_invert_exactly_and_predict_shapes(transform, shapes):
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(s).astype(ml_dtypes.bfloat16) for s in shapes]
    ys = transform.to_jax(xs)
    assert [y.shape for y in ys] == transform.jax_shapes(shapes)
    assert transform.torch_shapes([y.shape for y in ys]) == [tuple(s) for s in shapes]
    back = transform.to_torch(ys)
    assert all(b.dtype == x.dtype and b.tobytes() == x.tobytes() for b, x in zip(back, xs))
    assert any(y.tobytes() != x.tobytes() for y, x in zip(ys, xs)) or transform == engine.Split(1, (3, 1))


def test_rule_arity_and_wildcards_are_checked():
    with pytest.raises(ValueError, match="takes 3 torch"):
        engine.rule(["a", "b"], "c", engine.Concat(0, (1, 1, 1)))
    with pytest.raises(ValueError, match="different wildcards"):
        engine.rule("a.{i}.w", "b.w")
    with pytest.raises(ValueError, match="no count"):
        engine.Mapping("m", (engine.rule("a.{i}.w", "b.{i}.w"),)).concrete()


def test_plan_reports_missing_unexpected_and_misshaped(flux_shapes):
    table = flux_dit.diffsynth_mapping(CFG)
    src = {k: v.shape for k, v in random_source(table, flux_shapes).items()}
    gone = sorted(src)[:25]
    bad = dict(src)
    for k in gone:
        del bad[k]
    bad.update({f"extra.{i}": (1,) for i in range(3)})
    with pytest.raises(ConversionError) as e:
        engine.plan(table, bad, flux_shapes, "to_jax")
    msg = str(e.value)
    assert "25 tensors missing" in msg and "(25 in total)" in msg and gone[0] in msg and gone[19] in msg
    assert gone[20] not in msg.split("missing")[1].split("\n")[0]
    assert "3 unexpected tensors" in msg and "extra.2" in msg
    wrong = dict(src, **{"x_embedder.weight": (48, 63)})
    with pytest.raises(ShapeMismatchError, match=r"x_embedder.weight has shape \(48, 63\), expected \(48, 64\)"):
        engine.plan(table, wrong, flux_shapes, "to_jax")


# --------------------------------------------------------------------------------------------------------- schemes
def test_detect_scheme_covers_every_upstream_layout():
    dit = {"x_embedder.weight", "blocks.0.attn.a_to_qkv.weight", "single_blocks.0.to_qkv_mlp.weight"}
    assert detect_scheme(dit | {"0.weight", "1.weight", "3.weight", "4.weight"}) == "nexus_v1_decoder"
    assert detect_scheme({"adapter.0.weight"} | {f"pipe.dit.{k}" for k in dit}) == "nexus_v2_generation"
    assert detect_scheme({"embedding_merger.projector.1.weight"} | {f"pipe.dit.{k}" for k in dit}) == (
        "nexus_v2_editing"
    )
    assert detect_scheme(dit) == "diffsynth_flux_dit"
    assert detect_scheme({"x_embedder.weight", "single_transformer_blocks.0.proj_out.weight"}) == (
        "diffusers_flux_transformer"
    )
    assert detect_scheme({"img_in.weight", "double_blocks.0.img_attn.qkv.weight"}) == "bfl_flux"
    assert detect_scheme({"encoder.conv_in.weight", "encoder.down_blocks.0.resnets.0.conv1.weight"}) == "diffusers_vae"
    assert detect_scheme({"encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight"}) == "bfl_vae"
    ar = {"model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"}
    assert detect_scheme(ar | {"vision_head.weight"}) == "nexus_ar"
    with pytest.raises(UnknownSchemeError, match=r"known schemes: .*nexus_v2_editing.*k19, \.\.\. \(30 in total\)"):
        detect_scheme({f"k{i:02d}" for i in range(30)})


# -------------------------------------------------------------------------------------------------------------- I/O
def test_safetensors_writer_shards_and_reader_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    sd = {
        "a": rng.standard_normal((30, 40)).astype(ml_dtypes.bfloat16),
        "b": rng.standard_normal((50,)).astype(np.float16),
        "c": rng.integers(0, 9, (7, 3)).astype(np.int64),
        "big": rng.standard_normal((100, 100)).astype(np.float32),  # bigger than a shard: alone
        "s": np.asarray(3.5, np.float32),
    }
    weight_map = write_st(tmp_path, sd, shard_bytes=4000, prefix="model")
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) == 3 and weight_map["a"] == weight_map["c"]  # [a, b, c], [big], [s]
    assert len({weight_map["a"], weight_map["big"], weight_map["s"]}) == 3
    for f in files:
        data = os.path.getsize(tmp_path / f) - 8 - len(json.dumps(io.read_safetensors_header(tmp_path / f)[0]))
        assert data <= 40_000 + 200
    from safetensors import safe_open  # the reference reader agrees with ours

    with safe_open(str(tmp_path / weight_map["a"]), "pt") as f:
        assert f.get_tensor("a").dtype == torch.bfloat16
        np.testing.assert_array_equal(io.torch_to_numpy(f.get_tensor("a")), sd["a"])
    with io.open_checkpoint(tmp_path) as r:
        for k, v in sd.items():
            assert r.read(k).dtype == v.dtype and r.read(k).tobytes() == v.tobytes()


def test_torch_bin_reader_and_writer_keep_bf16(tmp_path):
    sd = {"w": torch.randn(4, 6, dtype=torch.bfloat16), "b": torch.randn(6)}
    torch.save(sd, tmp_path / "x.bin")
    with io.open_checkpoint(tmp_path / "x.bin") as r:
        assert r.dtypes["w"] == ml_dtypes.bfloat16
        assert r.read("w").tobytes() == io.torch_to_numpy(sd["w"]).tobytes()
        write_st(tmp_path / "staged", {k: r.read(k) for k in r.shapes}, prefix="m")
    io.write_torch_bin(tmp_path / "y.bin", io.SafetensorsReader([tmp_path / "staged" / "m.safetensors"]))
    back = torch.load(tmp_path / "y.bin", weights_only=True)
    assert back["w"].dtype == torch.bfloat16 and torch.equal(back["w"], sd["w"]) and torch.equal(back["b"], sd["b"])


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("64KiB") == 65536 and parse_size("100") == 100
    with pytest.raises(Exception, match="invalid size"):
        parse_size("5 parsecs")


# ------------------------------------------------------------------------------------------------ CLI bad input
@pytest.fixture()
def flux_source(tmp_path, flux_shapes):
    sd = random_source(flux_dit.diffusers_mapping(CFG), flux_shapes)
    write_st(tmp_path / "src", sd)
    return sd, tmp_path


def run_failing(capsys, argv, out) -> str:
    assert convert(argv) == 1
    assert not out.exists(), "partial output left behind"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")], "temp dir left behind"
    return capsys.readouterr().err


def test_cli_rejects_missing_and_unexpected_tensors(flux_source, capsys):
    sd, tmp = flux_source
    removed = sorted(sd)[:23]
    bad = {k: v for k, v in sd.items() if k not in removed}
    bad["transformer_blocks.0.attn.mystery.weight"] = np.zeros(3, np.float32)
    write_st(tmp / "bad", bad)
    err = run_failing(capsys, ["import", str(tmp / "bad"), str(tmp / "out"), "--family", "flux_dit", "--config",
                               "tiny", "--no-progress"], tmp / "out")
    assert "23 tensors missing" in err and "(23 in total)" in err and removed[0] in err
    assert "1 unexpected tensors" in err and "attn.mystery.weight" in err


def test_cli_rejects_wrong_shapes(flux_source, capsys):
    sd, tmp = flux_source
    sd = dict(sd, **{"proj_out.weight": np.zeros((64, 47), np.float32)})
    write_st(tmp / "bad", sd)
    err = run_failing(capsys, ["import", str(tmp / "bad"), str(tmp / "out"), "--family", "flux_dit", "--config",
                               "tiny", "--no-progress"], tmp / "out")
    assert "proj_out.weight has shape (64, 47), expected (64, 48)" in err


def test_cli_rejects_truncated_shard(flux_source, capsys):
    _, tmp = flux_source
    index = json.loads((tmp / "src" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = tmp / "src" / sorted(set(index["weight_map"].values()))[2]
    os.truncate(shard, os.path.getsize(shard) - 100)
    lost = [k for k, f in index["weight_map"].items() if f == shard.name]
    err = run_failing(capsys, ["import", str(tmp / "src"), str(tmp / "out"), "--family", "flux_dit", "--config",
                               "tiny", "--no-progress"], tmp / "out")
    assert f"truncated file {shard}" in err and lost[-1] in err


def test_cli_rejects_truncated_bin_and_unknown_scheme(tmp_path, capsys):
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "d.bin")
    os.truncate(tmp_path / "d.bin", 3000)
    err = run_failing(capsys, ["import", str(tmp_path / "d.bin"), str(tmp_path / "out"), "--family", "flux_dit",
                               "--config", "tiny"], tmp_path / "out")
    assert "cannot read torch checkpoint" in err and "d.bin" in err
    write_st(tmp_path / "odd", {f"foo.{i}.weight": np.zeros(2, np.float32) for i in range(25)})
    err = run_failing(capsys, ["import", str(tmp_path / "odd"), str(tmp_path / "out"), "--family", "flux_dit",
                               "--config", "tiny"], tmp_path / "out")
    assert "unknown key scheme" in err and "foo.0.weight" in err and "(25 in total)" in err


def test_cli_rejects_scheme_of_another_family_and_existing_output(flux_source, capsys):
    _, tmp = flux_source
    err = run_failing(capsys, ["import", str(tmp / "src"), str(tmp / "out"), "--family", "vae", "--config", "tiny"],
                      tmp / "out")
    assert "family 'vae' has no table for key scheme 'diffusers_flux_transformer'" in err
    (tmp / "taken").mkdir()
    assert convert(["import", str(tmp / "src"), str(tmp / "taken"), "--family", "flux_dit", "--config", "tiny"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert convert(["import", str(tmp / "src")]) == 2  # usage error


def test_interrupted_conversion_leaves_no_output(flux_source, monkeypatch):
    _, tmp = flux_source

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("conversion.orbax.write_config", boom)
    with pytest.raises(KeyboardInterrupt):
        convert(["import", str(tmp / "src"), str(tmp / "out"), "--family", "flux_dit", "--config", "tiny",
                 "--no-progress"])
    assert sorted(p.name for p in tmp.iterdir()) == ["src"]


def test_nexus_gen_config_json_gives_the_full_size_config():
    """The released Nexus-Gen config.json (transformers 4.49 flat layout; nexus-gen.md 1.2) -> NexusGenConfig."""
    from configs import nexus_gen
    from conversion.families import nexus_config_from_hf

    hf = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "vocab_size": 152064, "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 128000,
        "rope_scaling": {"type": "default", "mrope_section": [16, 24, 24]}, "tie_word_embeddings": False,
        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_config": {"hidden_size": 1280, "in_chans": 3, "spatial_patch_size": 14, "tokens_per_second": 2},
    }
    v2 = nexus_config_from_hf(hf, {"image_prefill_embeds.weight": (81, 3584)})
    assert v2 == nexus_gen.nexus_gen_v2()
    assert nexus_config_from_hf(hf, {"vision_head.weight": (3584, 3584)}) == nexus_gen.nexus_gen_v1()
    with pytest.raises(ConversionError, match="has 9 rows"):
        nexus_config_from_hf(hf, {"image_prefill_embeds.weight": (9, 3584)})


def test_index_naming_absent_shards_is_reported(flux_source, capsys):
    _, tmp = flux_source
    index = json.loads((tmp / "src" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (tmp / "src" / gone).unlink()
    err = run_failing(capsys, ["import", str(tmp / "src"), str(tmp / "out"), "--family", "flux_dit", "--config",
                               "tiny", "--no-progress"], tmp / "out")
    lost = [k for k, f in index["weight_map"].items() if f == gone]
    assert f"names shard files that do not exist: ['{gone}']" in err and lost[0] in err
