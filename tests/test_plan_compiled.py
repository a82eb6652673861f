"""Compile-and-measure helpers on the local CPU devices (fast): while-loop detection, depth extrapolation, argument
bytes of sharded abstract inputs, and parsing of XLA's out-of-memory message."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from launch import compiled
from nexus_jax.sharding import make_mesh


def _stack(layers: int, loop: bool):
    def f(x, w):
        if loop:
            return jax.lax.fori_loop(0, layers, lambda i, h: jnp.tanh(h @ w), x)
        for _ in range(layers):
            x = jnp.tanh(x @ w)
        return x

    x = jax.ShapeDtypeStruct((64, 128), jnp.float32)
    w = jax.ShapeDtypeStruct((128, 128), jnp.float32)
    return compiled.Program(jax.jit(f), (x, w))


def test_while_loops_are_detected_and_undercounted():
    unrolled = compiled.compile_and_measure(_stack(6, loop=False))
    looped = compiled.compile_and_measure(_stack(6, loop=True))
    assert not unrolled.has_while and looped.has_while
    per_layer = 2 * 64 * 128 * 128
    assert unrolled.flops == pytest.approx(6 * per_layer, rel=0.05)
    assert looped.flops < 2 * per_layer  # XLA counts the loop body once: the trap the planner avoids


def test_depth_extrapolation_reproduces_the_full_program():
    full = compiled.compile_and_measure(_stack(6, loop=False))
    fields, parts = compiled.extrapolate(lambda o: _stack(o["layers"], loop=False), {"layers": 6})
    assert len(parts) == 2
    assert fields["flops"] == pytest.approx(full.flops, rel=1e-6)
    assert fields["bytes_accessed"] == pytest.approx(full.bytes_accessed, rel=0.05)
    with pytest.raises(ValueError, match="needs loop-free programs"):
        compiled.extrapolate(lambda o: _stack(o["layers"], loop=True), {"layers": 6})


def test_extrapolation_drops_a_step_time_the_cost_model_did_not_give(monkeypatch):
    """A part whose optimal_seconds is 0 or negative (libtpu returned -93 s for a 1-block v6e decoder step) must not be
    extrapolated into a plausible-looking total: the total is 0 (no estimate) and the planner uses the roofline."""
    def fake(optimal):
        return compiled.Measurement(argument_bytes=1, output_bytes=1, alias_bytes=0, temp_bytes=1, code_bytes=1,
                                    flops=1e9, bytes_accessed=1e6, optimal_seconds=optimal, has_while=False,
                                    compile_seconds=0.0)

    def extrapolated(base: float, two: float) -> dict[str, float]:
        parts = iter([fake(base), fake(two)])
        monkeypatch.setattr(compiled, "compile_and_measure", lambda program: next(parts))
        return compiled.extrapolate(lambda o: None, {"layers": 10})[0]

    for base, two in ((-93.0, 0.5), (0.0, 0.2), (0.1, -5.0)):
        fields = extrapolated(base, two)
        assert fields["optimal_seconds"] == 0.0 and fields["flops"] == 1e9  # the other figures still extrapolate
    assert extrapolated(0.1, 0.15)["optimal_seconds"] == pytest.approx(0.55)


def test_argument_bytes_of_sharded_abstract_inputs():
    mesh = make_mesh(2, 4, 1)
    a = jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    b = jax.ShapeDtypeStruct((10,), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
    assert compiled.argument_bytes({"a": a, "b": b}) == 64 * 32 * 4 // 8 + 10 * 2


def test_out_of_memory_message_is_parsed():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (128.00G) "
           "exceeds available HBM (95.74G).")
    oom = compiled._parse_oom(msg)
    assert oom is not None
    assert oom.required_bytes == 128 * 2**30 and oom.available_bytes == int(95.74 * 2**30)
    assert compiled._parse_oom("INVALID_ARGUMENT: something else") is None
