"""Optimiser, schedule, trainable subsets, gradient accumulation, sharded == unsharded train step, CLI errors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import nexus_gen
from configs.training import AR_STAGE1, AR_STAGE2, AR_STAGE3, PRESETS, OptimConfig
from nexus_jax import sharding
from nexus_jax.models.nexus_ar import NexusGenAR
from nexus_jax.training import state as state_lib
from nexus_jax.training.cli import build_parser, config_from_args, main
from nexus_jax.training.optim import learning_rate_schedule, path_string, split_trainable, trainable_filter
from tests.test_checkpoint import TwoLayer, mse_loss

RULES = sharding.TRAIN_RULES


def test_warmup_cosine_and_constant_schedules():
    cfg = OptimConfig(learning_rate=1e-3, warmup_steps=10, decay_steps=110, min_lr_ratio=0.1)
    s = learning_rate_schedule(cfg)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(s(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(s(60)), 1e-4 + 0.5 * 9e-4, rtol=1e-5)  # cosine half-way
    np.testing.assert_allclose(float(s(110)), 1e-4, rtol=1e-5)
    c = learning_rate_schedule(dataclasses.replace(cfg, schedule="constant"))
    np.testing.assert_allclose([float(c(5)), float(c(10)), float(c(10_000))], [5e-4, 1e-3, 1e-3], rtol=1e-6)


def test_config_validation_names_the_value():
    with pytest.raises(ValueError, match="grad_accum must be >= 1, got 0"):
        OptimConfig(grad_accum=0)
    with pytest.raises(ValueError, match="schedule must be 'cosine' or 'constant', got 'linear'"):
        OptimConfig(schedule="linear")
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        OptimConfig(learning_rate=0.0)


def _ar_paths(cfg: OptimConfig) -> tuple[set[str], set[str]]:
    model = nnx.eval_shape(lambda: NexusGenAR(nexus_gen.tiny(), rngs=nnx.Rngs(0)))
    keep = trainable_filter(cfg)
    trained, frozen = set(), set()
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            (trained if keep(path, var) else frozen).add(path_string(path))
    return trained, frozen


def test_ar_stage_trainable_subsets():
    vit = ("visual/",)
    s1_train, _ = _ar_paths(dataclasses.replace(AR_STAGE1.optim, frozen=AR_STAGE1.optim.frozen))
    assert s1_train == {"vision_head/kernel", "image_prefill_embeds"}
    for stage in (AR_STAGE2, AR_STAGE3):
        train, frozen = _ar_paths(stage.optim)
        assert not any(p.startswith(vit) for p in train)
        assert any(p.startswith(vit) for p in frozen)
        assert {"vision_head/kernel", "image_prefill_embeds", "language_model/lm_head/kernel"} <= train
        assert any("layers/0/self_attn/q_proj" in p for p in train)
    with pytest.raises(ValueError, match="select no parameter"):
        split_trainable(TwoLayer(nnx.Rngs(0)), OptimConfig(trainable=("nothing_matches",)))


def _data(seed=0):
    r = np.random.default_rng(seed)
    return {"x": r.standard_normal((8, 16)).astype(np.float32), "y": r.standard_normal((8, 8)).astype(np.float32)}


def _steps(optim: OptimConfig, mesh, n=3):
    graphdef, state, abstract = state_lib.init_train_state(lambda: TwoLayer(nnx.Rngs(0)), optim, mesh, RULES, 0)
    fn = state_lib.jit_train_step(state_lib.make_train_step(graphdef, mse_loss, optim),
                                  jax.tree.map(lambda a: a.sharding, abstract),
                                  state_lib.batch_shardings(_data(), mesh, RULES))
    out = []
    with sharding.sharding_context(mesh, RULES):
        for i in range(n):
            state, m = fn(state, _data(i))
            out.append({k: float(v) for k, v in m.items()})
    return state, out


def test_grad_accumulation_matches_full_batch():
    base = OptimConfig(learning_rate=1e-2, warmup_steps=0, decay_steps=10, clip_norm=None)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    s1, m1 = _steps(base, mesh)
    s2, m2 = _steps(dataclasses.replace(base, grad_accum=4), mesh)
    for a, b in zip(m1, m2):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_clipping_bounds_the_update_and_reports_raw_norm():
    cfg = OptimConfig(learning_rate=1e-2, warmup_steps=0, decay_steps=10, clip_norm=1e-3, weight_decay=0.0)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    _, m = _steps(cfg, mesh, n=1)
    assert m[0]["grad_norm"] > 1e-3  # the reported norm is before clipping


def test_sharded_step_equals_unsharded():
    optim = OptimConfig(learning_rate=1e-2, warmup_steps=1, decay_steps=10, grad_accum=2)
    single = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    multi = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    s1, m1 = _steps(optim, single)
    s8, m8 = _steps(optim, multi)
    spec = s8["params"]["up"]["kernel"][...].sharding.spec
    assert spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    mu = s8["opt_state"][1][0].mu["up"]["kernel"][...]
    assert mu.sharding.spec == spec  # optimiser moments shard like their parameters
    err = max(abs(a["loss"] - b["loss"]) for a, b in zip(m1, m8))
    perr = max(float(jnp.max(jnp.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s8["params"])))
    print(f"sharded vs unsharded: loss max abs err {err:.2e}, params {perr:.2e}")
    assert err <= 1e-5 and perr <= 1e-5


def test_cli_overrides_and_bad_input(tmp_path, capsys):
    args = build_parser().parse_args(["--preset", "tiny_ar", "--data", "x.jsonl", "--run-dir", str(tmp_path),
                                      "--steps", "7", "--grad-accum", "2", "--mesh", "2,4,1", "--resume", "none"])
    cfg = config_from_args(args)
    assert (cfg.loop.total_steps, cfg.optim.grad_accum, cfg.checkpoint.resume) == (7, 2, "none")
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (2, 4, 1)
    assert set(PRESETS) >= {"ar_stage1", "ar_stage2", "ar_stage3", "generation_decoder", "editing_decoder"}
    rc = main(["--preset", "tiny_ar", "--data", str(tmp_path / "missing.jsonl"), "--run-dir", str(tmp_path)])
    assert rc == 2 and "missing.jsonl" in capsys.readouterr().err
    rc = main(["--preset", "tiny_ar", "--data", "x", "--run-dir", str(tmp_path), "--mesh", "2,4"])
    assert rc == 2 and "--mesh must be three integers" in capsys.readouterr().err
