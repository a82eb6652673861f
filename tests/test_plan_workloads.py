"""Tiny configs of every workload compiled for v5p:2x2x1 (4 chips): the reports are complete and sane, parameters
are really sharded, and compiler FLOPs agree with the analytic model FLOPs."""

from __future__ import annotations

import dataclasses

import jax
import pytest

pytest.importorskip("libtpu", reason="ahead-of-time TPU compilation needs libtpu (pip install 'jax[tpu]')")

from configs.plans import get_plan  # noqa: E402
from launch import flops  # noqa: E402
from launch import kernels as kernels_lib  # noqa: E402
from launch import plan as planner  # noqa: E402
from launch.topology import parse_topology, topology_devices  # noqa: E402
from launch.workloads import make_workload  # noqa: E402
from nexus_jax.layers import splash_block, splash_tiles  # noqa: E402

TOPO = parse_topology("v5p:2x2x1")
REQUIRED = ("topology", "mesh", "fits", "bytes_per_device", "hbm_bytes_per_device", "flops_per_step", "estimated_mfu")


@pytest.fixture(scope="module")
def devices():
    return topology_devices(TOPO)


def _sharded_param_fraction(program) -> float:
    """Fraction of train-state parameter bytes whose sharding splits them over more than one device."""
    state = program.args[0]
    leaves = jax.tree.leaves(state["params"])
    total = sum(leaf.size for leaf in leaves)
    split = sum(leaf.size for leaf in leaves if leaf.sharding.shard_shape(leaf.shape) != leaf.shape)
    return split / total


def _counted_flops(rep: dict) -> float:
    """Compiler-counted FLOPs of the step plus the Mosaic kernels' (which the cost model does not count), slice-wide."""
    return rep["flops_per_step"] + rep["kernel_flops_per_device"] * rep["num_devices"]


@pytest.mark.slow
def test_tiny_ar_train_step(devices):
    plan = get_plan("tiny_ar_train")
    rep = planner.report(plan, TOPO, plan.mesh, "full", devices=devices)
    assert all(k in rep for k in REQUIRED)
    assert rep["fits"] and rep["topology"] == "v5p:2x2x1" and rep["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert rep["notes"]["loss"].startswith("nexus_jax.nexus.loss.nexus_ar_loss")
    text = plan.model.vl.text
    hand = flops.ar_train_flops(text, plan.global_batch, plan.seq_len, text.hidden_size**2)
    assert rep["model_flops_per_step"] == pytest.approx(hand)
    # full remat recomputes the forward (x 4/3); the splash kernel computes whole diagonal tiles; the frozen ViT is
    # not run. So compiler + kernel FLOPs sit between the model FLOPs and ~2x them.
    assert 1.0 <= _counted_flops(rep) / rep["model_flops_per_step"] <= 2.0
    program = make_workload(plan, "full").build(planner._mesh(devices, (1, 4, 1)), None)
    assert _sharded_param_fraction(program) > 0.9


@pytest.mark.slow
def test_tiny_ar_plan_compiles_and_prices_the_splash_kernel(devices):
    """"auto" attention is planned as the TPU runs it (the Mosaic splash kernel, not this host's XLA attention), and
    the kernel's matmuls, which XLA's cost model does not price, are added to the step time at the assumed
    efficiency."""
    plan = get_plan("tiny_ar_train")
    text = plan.model.vl.text
    assert text.attention_impl == "auto"
    rep = planner.report(plan, TOPO, plan.mesh, "full", devices=devices)
    assert rep["custom_calls"] >= text.num_layers and "splash" in rep["notes"]["attention"]
    # per device: 8 sequences / 4 fsdp shards, every query head, forward + remat recompute (2 x 2 matmuls) and the
    # backward (7 matmuls) per computed tile (the tile count is checked against the kernel's own mask in
    # tests/test_plan_kernels.py)
    block = splash_block(plan.seq_len, causal=True)
    tiles = splash_tiles(plan.seq_len, block, causal=True)
    hand = text.num_layers * (plan.global_batch // 4) * text.num_heads * tiles * 11 * (2.0 * block**2 * text.head_dim)
    assert rep["kernel_flops_per_device"] == pytest.approx(hand)
    roofline = max(hand / rep["peak_bf16_flops_per_device"],
                   rep["kernel_hbm_bytes_per_device"] / TOPO.chip.hbm_bandwidth)
    assert rep["kernel_seconds"] == pytest.approx(roofline / kernels_lib.KERNEL_EFFICIENCY)
    by_eff = rep["estimated_mfu_by_kernel_efficiency"]
    assert by_eff[str(kernels_lib.KERNEL_EFFICIENCY)] == pytest.approx(rep["estimated_mfu"])
    assert by_eff["1.0"] > by_eff["0.5"] > by_eff["0.25"] > 0
    assert "Mosaic kernels" in rep["step_time_source"] and "kernels:" in planner.format_report(rep)
    # the same step with XLA's attention: no custom calls, nothing priced outside the cost model
    xla = plan.replace(model=plan.model.replace(vl=dataclasses.replace(plan.model.vl, text=text.replace(
        attention_impl="jax_nn"))))
    rep_xla = planner.report(xla, TOPO, plan.mesh, "full", devices=devices)
    assert rep_xla["custom_calls"] == 0 and rep_xla["kernel_flops_per_device"] == rep_xla["kernel_seconds"] == 0
    assert "causal query chunks" in rep_xla["notes"]["attention"]


@pytest.mark.slow
def test_tiny_decoder_train_step(devices):
    plan = get_plan("tiny_decoder_train")
    rep = planner.report(plan, TOPO, plan.mesh, "full", devices=devices)
    assert rep["fits"] and all(k in rep for k in REQUIRED)
    # the DiT's joint attention runs the splash kernel (as "auto" does on TPU), priced outside the cost model
    assert rep["custom_calls"] > 0 and rep["kernel_seconds"] > 0 and "splash" in rep["notes"]["attention"]
    assert 1.0 <= _counted_flops(rep) / rep["model_flops_per_step"] <= 2.0
    program = make_workload(plan, "full").build(planner._mesh(devices, (1, 4, 1)), None)
    assert _sharded_param_fraction(program) > 0.9


@pytest.mark.slow
def test_tiny_editing_decoder_train_step(devices):
    plan = get_plan("tiny_editing_decoder_train")
    rep = planner.report(plan, TOPO, plan.mesh, "full", devices=devices)
    assert rep["fits"] and rep["workload"] == "editing_decoder_train" and rep["custom_calls"] > 0
    assert 1.0 <= _counted_flops(rep) / rep["model_flops_per_step"] <= 2.0


@pytest.mark.slow
def test_tiny_sampling_loop_uses_loop_scaling(devices):
    plan = get_plan("tiny_decoder_sample")
    rep = planner.report(plan, TOPO, plan.mesh, "none", devices=devices)
    assert rep["fits"] and all(k in rep for k in REQUIRED)
    assert "x 4 loop steps" in rep["flops_source"]
    # the fori_loop program's own cost analysis counts one step: the extrapolated figure must be ~steps x larger
    assert _counted_flops(rep) > 3 * rep["model_flops_per_step"] / plan.num_steps
    assert rep["custom_calls"] >= plan.num_steps and rep["kernel_seconds"] > 0


@pytest.mark.slow
@pytest.mark.heavy  # ~7 min of TPU compiles; the other plan workloads' depth extrapolation runs in CI
def test_tiny_unipic_train_plans_without_windowed_einsum_loops():
    """Under fsdp 8 on v6e XLA windows the weight all-gathers into while loops (the cost model counts one window);
    the workload's compiler options switch that off, so depth extrapolation gets loop-free programs."""
    from launch import compiled

    plan = get_plan("tiny_unipic_train")
    topo = parse_topology(plan.topology)
    devs = topology_devices(topo)
    workload = make_workload(plan)
    one_block = {"llm_layers": 1, "mar_blocks": 1, "head_blocks": 1}
    windowed = compiled.compile_and_measure(workload.build(planner._mesh(devs, (1, 8, 1)), one_block))
    assert windowed.has_while and windowed.windowed_einsum  # the control: without the options the loops are there
    rep = planner.report(plan, topo, plan.mesh, plan.remat, full=False, devices=devs)
    assert rep["compiler_options"] == dict(compiled.NO_WINDOWED_EINSUM)
    assert rep["fits"] and all(k in rep for k in REQUIRED) and rep["estimated_mfu"] > 0
    assert "layer-difference extrapolation" in rep["flops_source"]
    # the tiny model's frozen VAE encode (run in the step, not in the model FLOPs) and remat weigh more than at full
    # size: measured 2.96
    assert 1.0 <= rep["flops_per_step"] / rep["model_flops_per_step"] <= 4.0
