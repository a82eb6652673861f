"""launch.kernels and the planner's pricing of Mosaic kernels (no compiles: the tile count against the splash
kernel's own mask, the report fields and refusals with stand-in measurements)."""

from __future__ import annotations

import numpy as np
import pytest

from launch import compiled, kernels
from launch import plan as planner
from launch.workloads import Workload
from nexus_jax.layers import splash_tiles


@pytest.mark.parametrize("length,block,causal", [(256, 128, True), (300, 128, True), (77, 32, False),
                                                 (4096, 128, True), (1, 128, True)])
def test_splash_tiles_match_the_kernels_mask(length, block, causal):
    sm = pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_mask")
    padded = -(-length // block) * block
    mask = (sm.CausalMask if causal else sm.FullMask)((padded, padded))
    dense = np.asarray(mask[:, :])
    tiles = dense.reshape(padded // block, block, padded // block, block).any(axis=(1, 3))
    assert splash_tiles(length, block, causal) == int(tiles.sum())


def test_splash_cost_counts_matmuls_and_streamed_tiles():
    one = kernels.splash_cost(1, 1, 128, 64, causal=False, itemsize=2)  # one 128-token tile
    assert one.flops == 2 * (2 * 128 * 128 * 64)  # q k^T and p v
    assert one.hbm_bytes == (2 * 1 + 4 * 1) * 128 * 64 * 2  # k, v streamed per tile; q, o, ... per row of tiles
    train = kernels.splash_cost(3, 5, 256, 64, causal=True, itemsize=2, forward_passes=2,  # 128-token tiles
                                backward_passes=1)
    assert train.flops == 3 * 5 * 3 * (2 * 2 + 7) * (2 * 128 * 128 * 64)  # 3 causal tiles
    assert train.hbm_bytes == 3 * 5 * (2 + 2) * (2 * 3 + 4 * 2) * 128 * 64 * 2  # 2 forward + dq + dkv kernels
    assert (2 * one + one).flops == 3 * one.flops


def test_kernel_roofline_and_efficiency():
    compute_bound = kernels.KernelCost(flops=4e12, hbm_bytes=1e9)
    assert compute_bound.roofline_seconds(4e14, 1e12) == pytest.approx(0.01)
    memory_bound = kernels.KernelCost(flops=4e11, hbm_bytes=1e10)
    assert memory_bound.roofline_seconds(4e14, 1e12) == pytest.approx(0.01)
    assert memory_bound.seconds(4e14, 1e12, efficiency=0.25) == pytest.approx(0.04)
    with pytest.raises(ValueError, match="efficiency"):
        memory_bound.seconds(4e14, 1e12, efficiency=0.0)


def test_splash_tile_is_the_largest_that_adds_little_work():
    from nexus_jax.layers import SPLASH_BLOCKS, SPLASH_MAX_EXTRA_WORK, splash_block

    assert [splash_block(n) for n in (77, 128, 200, 300, 1105, 4096, 4608)] == [128, 128, 256, 384, 384, 512, 512]
    assert [splash_block(n, causal=True) for n in (256, 300, 1105, 4096)] == [128, 128, 384, 512]
    for causal in (False, True):
        for n in range(1, 5000, 7):
            work = {b: splash_tiles(n, b, causal) * b * b for b in SPLASH_BLOCKS}
            block = splash_block(n, causal)
            assert work[block] <= SPLASH_MAX_EXTRA_WORK * work[128]
            assert all(work[b] > SPLASH_MAX_EXTRA_WORK * work[128] for b in SPLASH_BLOCKS if b > block)


def test_count_custom_calls():
    hlo = ('%a = f32[8] custom-call(f32[8] %x), custom_call_target="tpu_custom_call", backend_config="{}"\n'
           '%b = f32[8] custom-call(f32[8] %a), custom_call_target="Sharding"\n'
           '%c = f32[8] custom-call(f32[8] %b), custom_call_target="tpu_custom_call"\n')
    assert kernels.count_custom_calls(hlo) == 2


def _measurement(custom_calls: int, optimal_seconds: float = 1.0, flops: float = 1e12) -> compiled.Measurement:
    return compiled.Measurement(argument_bytes=0, output_bytes=0, alias_bytes=0, temp_bytes=0, code_bytes=0,
                                flops=flops, bytes_accessed=0.0, optimal_seconds=optimal_seconds, has_while=False,
                                compile_seconds=0.0, custom_calls=custom_calls)


def _workload(kernel_cost=None) -> Workload:
    return Workload("w", build=None, depths={}, model_flops=1.0, tokens_per_step=1, rules=(),
                    kernel_cost=kernel_cost)


def test_kernel_cost_prices_the_workloads_kernels():
    work = _workload(lambda sizes: kernels.KernelCost(1e12 * sizes[1], 1e9))
    fields = planner._kernel_cost(work, _measurement(4), (1, 2, 1), 4e14, 1e12)
    assert fields["kernel_flops_per_device"] == 2e12 and fields["custom_calls"] == 4
    assert fields["kernel_roofline_seconds"] == pytest.approx(2e12 / 4e14)
    assert fields["kernel_seconds"] == pytest.approx(2e12 / 4e14 / kernels.KERNEL_EFFICIENCY)
    assert "Mosaic kernels" in fields["step_time_note"]


def test_kernel_cost_flags_unpriced_custom_calls():
    fields = planner._kernel_cost(_workload(), _measurement(3), (1, 1, 1), 4e14, 1e12)
    assert fields["unpriced_custom_calls"] == 3 and fields["kernel_seconds"] == 0
    assert "UNDER-STATED" in fields["step_time_note"]
    assert "unpriced_custom_calls" not in planner._kernel_cost(_workload(), _measurement(0), (1, 1, 1), 4e14, 1e12)


def test_kernel_cost_refuses_a_priced_kernel_that_was_not_compiled():
    work = _workload(lambda sizes: kernels.KernelCost(1.0, 1.0))
    with pytest.raises(ValueError, match="has none"):
        planner._kernel_cost(work, _measurement(0), (1, 1, 1), 4e14, 1e12)
    # a program the compiler refused (no costs at all) prices nothing
    assert planner._kernel_cost(work, _measurement(0, 0.0, 0.0), (1, 1, 1), 4e14, 1e12)["kernel_seconds"] == 0


def test_extrapolated_measurements_keep_the_custom_call_count():
    fields = compiled.linear_fields(_measurement(5))
    assert fields["custom_calls"] == 5
    assert compiled.as_measurement(fields, False, 0.0).custom_calls == 5
