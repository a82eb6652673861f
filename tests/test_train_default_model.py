"""``scripts/train_default_model.py``'s vision pre-training: it trains only the vision tower, brings the merged tokens
back to the initial tower's norm, and ``default_checkpoint.build(ar_module=...)`` writes that very module."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from conversion.pipeline import load_model
from nexus_jax import default_checkpoint, main_job
from nexus_jax.models.nexus_ar import NexusGenAR

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_default_model.py"


def load_script():
    spec = importlib.util.spec_from_file_location("train_default_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flat(module) -> dict[str, np.ndarray]:
    return {"/".join(map(str, k)): np.asarray(v.value) for k, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def test_pretrain_vision_trains_the_tower_only_and_keeps_its_token_norm(tmp_path):
    script = load_script()
    cfgs = script.model_configs()
    ar = NexusGenAR(cfgs["ar"], rngs=nnx.Rngs(0))
    before = flat(ar)
    report = script.pretrain_vision(ar, steps=3, batch=4, lr=1e-3, seed=0)
    after = flat(ar)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all(k.startswith("visual/") for k in changed), sorted(changed)[:5]
    assert any(k.startswith("visual/blocks") for k in changed)
    norms = report["token_norm"]
    np.testing.assert_allclose(norms["rescaled"], norms["initial"], rtol=1e-5)
    assert norms["trained"] != norms["initial"]
    assert set(report["held_out"]) == {"colour", "shape", "background"}

    # build() writes the given module in the upstream layout: converting it back gives the same parameters
    default_checkpoint.build(tmp_path / "ck", 0, configs=cfgs, own_init=True, ar_module=ar)
    assert main_job.convert(tmp_path / "ck", tmp_path / "conv") == 0
    back = flat(load_model(tmp_path / "conv" / "ar"))
    assert back.keys() == after.keys()
    for k in after:
        np.testing.assert_array_equal(back[k], after[k], err_msg=k)


def test_decoder_presets_match_the_models_the_script_builds():
    """`nexus-jax train --init-from` refuses a preset whose model differs from the checkpoint's: the script's decoder
    stages name presets that build exactly the decoders its init stage writes (the generation one wider)."""
    from configs.nexus_decoders import NexusDecoderConfig
    from configs.training import PRESETS
    from nexus_jax.training.decoder_loop import decoder_parts
    from nexus_jax.training.init_from import config_differences

    script = load_script()
    cfgs = script.model_configs()
    for stage, preset, key in script.DECODER_STAGES:
        train_cfg = PRESETS[preset]
        parts = decoder_parts(train_cfg.task, train_cfg.model_preset)
        assert config_differences(parts.decoder, cfgs[key]) == [], (stage, preset)
    assert cfgs["generation"].dit == NexusDecoderConfig.shapes().dit != NexusDecoderConfig.tiny().dit
    assert cfgs["generation"].dit.hidden_size == 80 and cfgs["editing"].dit == NexusDecoderConfig.tiny().dit


def test_export_applies_the_scripts_sampler_settings_and_flow_loss_settings_parse(tmp_path):
    """The export writes model_configs()' samplers (generation CFG 3, editing none) into the decoders' configs, so a
    work dir from before a sampler change exports the current ones; the stages' flow-loss settings are valid
    ``--set`` overrides (conditioning dropout for the generation decoder's CFG)."""
    import json

    from configs.training import PRESETS, apply_overrides

    script = load_script()
    cfgs = script.model_configs()
    assert (cfgs["generation"].sampler.cfg_scale, cfgs["editing"].sampler.cfg_scale) == (3.0, 1.0)
    from conversion import orbax as orbax_io

    for sub in ("generation_decoder", "edit_decoder"):
        (tmp_path / sub).mkdir()
        orbax_io.write_config(tmp_path / sub, sub, {"dit": {"num_heads": 5},
                                                    "sampler": {"cfg_scale": 7.0, "num_steps": 2}}, source="x")
    script.apply_samplers(tmp_path, cfgs)
    gen = json.loads((tmp_path / "generation_decoder" / "config.json").read_text())
    edit = json.loads((tmp_path / "edit_decoder" / "config.json").read_text())
    assert gen["family"] == "generation_decoder" and gen["config"]["dit"] == {"num_heads": 5}
    assert gen["source"] == "x" and gen["format_version"] == orbax_io.FORMAT_VERSION  # provenance kept
    assert (gen["config"]["sampler"]["cfg_scale"], gen["config"]["sampler"]["num_steps"]) == (3.0, 50)
    assert edit["config"]["sampler"]["cfg_scale"] == 1.0

    for stage, preset, _ in script.DECODER_STAGES:
        sets = [f"flow_loss.{k}={v}" for k, v in script.FLOW_LOSS[stage].items()]
        flow = apply_overrides(PRESETS[preset], sets).flow_loss
        assert flow.dropped_rows(script.BATCH[stage]) == round(script.FLOW_LOSS[stage].get("cond_dropout", 0)
                                                               * script.BATCH[stage])
    assert script.FLOW_LOSS["gen"]["cond_dropout"] > 0



@pytest.mark.slow  # a tiny checkpoint built, converted and run through the inference runner: ~1 min on 2 cores
def test_decoder_records_add_vit_feature_records(tmp_path, monkeypatch):
    """The embeds stage: generation records on the AR's predictions, then (first in the file) records on the ViT
    features of the same targets and of random-colour shapes; editing records keep their references."""
    import json

    from nexus_jax.data import shapes

    script = load_script()
    monkeypatch.setattr(script, "GENERIC_RECORDS", 3)
    default_checkpoint.build(tmp_path / "ck", 0, configs=script.model_configs(), own_init=True)
    assert main_job.convert(tmp_path / "ck", tmp_path / "conv") == 0
    script.write_decoder_records(tmp_path / "conv", tmp_path / "dec", 4, seed=1)
    gen = [json.loads(x) for x in (tmp_path / "dec" / "generation.jsonl").read_text().splitlines()]
    assert [r["id"] for r in gen] == [f"gtg{i}" for i in range(4)] + [f"r{i}" for i in range(3)] + [
        f"g{i}" for i in range(4)]
    shapes_seen = {np.load(tmp_path / "dec" / r["embed"]).shape for r in gen}
    assert len(shapes_seen) == 1 and len(next(iter(shapes_seen))) == 2  # [slots, dim] for every kind
    assert [r["image"] for r in gen[:4]] == [r["image"] for r in gen[7:]]  # ViT features of the same targets
    for r in gen[4:7]:
        got = shapes.classify(np.asarray(Image.open(tmp_path / "dec" / r["image"]).convert("RGB")))
        assert (got["colour"], got["shape"], got["background"]) not in shapes.HELD_OUT
    edit = [json.loads(x) for x in (tmp_path / "dec" / "editing.jsonl").read_text().splitlines()]
    assert len(edit) == 4 and all("ref_embed" in r for r in edit)
