"""Planner checks on a v5p 2x2x1 topology (4 chips, AOT via libtpu): matmul-only model vs hand-computed memory and
FLOPs, topology / mesh parsing, and the bad-input messages."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("libtpu", reason="ahead-of-time TPU compilation needs libtpu (pip install 'jax[tpu]')")

from configs import plans  # noqa: E402
from configs.plans import MatmulConfig, get_plan  # noqa: E402
from launch import plan as planner  # noqa: E402
from launch.topology import CHIPS, GiB, parse_topology, topology_devices  # noqa: E402

TOPO = parse_topology("v5p:2x2x1")
F32 = 4


@pytest.fixture(scope="module")
def devices():
    return topology_devices(TOPO)


def _matmul_plan(dim: int, layers: int, batch: int) -> plans.PlanConfig:
    return get_plan("tiny_matmul").replace(model=MatmulConfig(dim=dim, num_layers=layers), global_batch=batch)


# --- hand-computed figures of the matmul-only train step ----------------------------------------------------------
# State per parameter: fp32 value + AdamW mu + nu = 3 x 4 bytes, sharded over fsdp x tensor (every kernel has one
# "embed" (fsdp) and one "mlp" (tensor) axis). The batch x [B, d] fp32 is sharded over data x fsdp.
# FLOPs: 2 B d^2 (3L - 1) for the whole step (forward 2BdL d, weight grads 2BLd^2, input grads 2B(L-1)d^2),
# divided evenly over the 4 devices.


def hand_state_bytes(dim: int, layers: int, fsdp: int, tensor: int) -> float:
    return 3 * F32 * layers * dim * dim / (fsdp * tensor)


def hand_batch_bytes(dim: int, batch: int, data: int, fsdp: int) -> float:
    return F32 * batch * dim / (data * fsdp)


@pytest.mark.parametrize("mesh", [(1, 2, 2), pytest.param((1, 4, 1), marks=pytest.mark.slow),
                                  pytest.param((2, 2, 1), marks=pytest.mark.slow)])
def test_matmul_memory_and_flops_match_hand_computation(devices, mesh):
    dim, layers, batch = 256, 4, 4096
    rep = planner.report(_matmul_plan(dim, layers, batch), TOPO, mesh, "none", devices=devices)
    data, fsdp, tensor = mesh
    hand_flops = 2 * batch * dim**2 * (3 * layers - 1) / 4
    assert rep["flops_per_step_per_device"] == pytest.approx(hand_flops, rel=0.05)
    assert rep["model_flops_per_device"] == pytest.approx(hand_flops, rel=1e-12)
    mem = rep["memory_per_device"]
    state = hand_state_bytes(dim, layers, fsdp, tensor)
    hand_args = state + hand_batch_bytes(dim, batch, data, fsdp)
    assert mem["arguments"] == pytest.approx(hand_args, rel=0.05)
    # the whole train state is donated: the new state aliases the old one
    assert mem["aliased_outputs"] == pytest.approx(state, rel=0.05)
    # temporaries: at most every layer's activation (saved for the backward pass) + its gradient + the gathered
    # full weights and their gradients; at least one activation
    act = hand_batch_bytes(dim, batch, data, fsdp)
    upper = (layers + 2) * act * (1 + tensor) + 2 * layers * dim * dim * F32
    assert act <= mem["temporaries"] <= upper
    total = mem["arguments"] + mem["outputs"] - mem["aliased_outputs"] + mem["temporaries"] + mem["generated_code"]
    assert rep["bytes_per_device"] == total
    assert rep["hbm_bytes_per_device"] == 95 * GiB and rep["fits"] is True
    assert 0 < rep["estimated_mfu"] <= 1.0


@pytest.mark.slow
def test_extrapolated_estimate_matches_full_compile(devices):
    plan = _matmul_plan(256, 6, 4096)
    full = planner.report(plan, TOPO, (1, 4, 1), "full", full=True, devices=devices)
    fast = planner.report(plan, TOPO, (1, 4, 1), "full", full=False, devices=devices)
    assert full["flops_source"].startswith("unrolled compile")
    assert fast["flops_source"].startswith("layer-difference extrapolation")
    assert fast["flops_per_step"] == pytest.approx(full["flops_per_step"], rel=0.02)
    assert fast["memory_per_device"]["arguments"] == pytest.approx(full["memory_per_device"]["arguments"], rel=0.01)


@pytest.mark.slow
def test_search_ranks_fitting_candidates(devices, capsys):
    ranked = planner.search(get_plan("tiny_matmul"), TOPO, ["none", "full"], [(1, 4, 1), (2, 2, 1)], verify=True)
    assert len(ranked) == 4 and all(r["fits"] for r in ranked)
    assert ranked[0]["memory_source"] == "full compile" and ranked[1]["memory_source"].startswith("layer-difference")
    mfus = [r["estimated_mfu"] for r in ranked]
    assert mfus == sorted(mfus, reverse=True)


# --- topology and mesh input ----------------------------------------------------------------------------------
def test_topology_parsing_and_specs():
    t = parse_topology("v5p:4x4x4")
    assert (t.num_chips, t.num_hosts, t.accelerator_type) == (64, 16, "v5p-128")
    t = parse_topology("v6e:8x8")
    assert (t.num_chips, t.num_hosts, t.accelerator_type, t.hbm_bytes_per_device) == (64, 16, "v6e-64", 32 * GiB)
    t = parse_topology("v6e:2x4")
    assert (t.num_chips, t.num_hosts, t.chips_per_host_bounds) == (8, 1, (2, 4, 1))
    assert parse_topology("v5e:16x16").accelerator_type == "v5litepod-256"
    assert set(CHIPS) == {"v4", "v5e", "v5p", "v6e"}
    assert CHIPS["v5p"].peak_bf16_flops == 459e12


@pytest.mark.parametrize(
    "text, message",
    [
        ("v9z:4x4x4", "unknown TPU generation 'v9z'"),
        ("v5p:4x4", "has 2 dimensions but v5p slices have 3"),
        ("v6e:8x8x8", "has 3 dimensions but v6e slices have 2"),
        ("v5p", "expected '<generation>:<AxB[xC]>'"),
        ("v5p:0x4x4", "zero dimension"),
        ("v5p:3x3x3", "not multiples of the per-host chip block"),
    ],
)
def test_bad_topology_messages(text, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_topology(text)


def test_mesh_must_multiply_to_device_count():
    with pytest.raises(ValueError, match=r"data=2 x fsdp=3 x tensor=1 = 6 devices, but topology v5p:2x2x1 has 4"):
        planner.resolve_mesh((2, 3, 1), 4, "v5p:2x2x1")
    with pytest.raises(ValueError, match="multiply to 3, which does not divide the 4 devices"):
        planner.resolve_mesh((3, -1, 1), 4, "v5p:2x2x1")
    assert planner.resolve_mesh((1, -1, 2), 64, "v5p:4x4x4") == (1, 32, 2)


def test_cli_bad_inputs(capsys):
    assert planner.main(["--config", "tiny_matmul", "--topology", "v9z:2x2x1"]) == 2
    assert "unknown TPU generation 'v9z'" in capsys.readouterr().err
    assert planner.main(["--config", "tiny_matmul", "--mesh", "1,3,1"]) == 2
    assert "the mesh must multiply to 4" in capsys.readouterr().err
    assert planner.main(["--config", "no_such_config"]) == 2
    assert "unknown plan config 'no_such_config'" in capsys.readouterr().err


def test_config_that_does_not_fit_says_by_how_much(monkeypatch, capsys, tmp_path):
    # 8 x 32768^2 fp32 params + AdamW moments = 96 GiB of state, replicated on each chip by a data-only mesh
    huge = dataclasses.replace(get_plan("tiny_matmul"), name="huge_matmul", mesh=(4, 1, 1), global_batch=64,
                               model=MatmulConfig(dim=32768, num_layers=8))
    monkeypatch.setitem(plans.PLANS, "huge_matmul", huge)
    rc = planner.main(["--config", "huge_matmul", "--json", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert rc == 1
    need = 3 * F32 * 8 * 32768**2
    assert "does not fit" in err and "over by" in err and "GiB" in err
    import json

    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["fits"] is False and rep["bytes_per_device"] > need > 0
    over = (rep["bytes_per_device"] - rep["hbm_bytes_per_device"]) / GiB
    assert f"over by {over:.2f} GiB" in err
