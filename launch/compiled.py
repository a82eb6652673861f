"""Compile a program ahead of time and read the compiler's per-device memory and cost figures.

The figures come from ``Compiled.memory_analysis()`` and ``Compiled.cost_analysis()``; both are *per device*.
Trap: XLA's cost analysis counts the body of a while loop (``lax.scan``, ``fori_loop``) once, whatever its trip count.
:func:`has_while_loop` detects that, and :func:`extrapolate` combines loop-free compiles of reduced depth instead.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax

from launch import kernels

_WHILE_RE = re.compile(r"=\s*[^=]*\bwhile\(")
_SIZE_RE = re.compile(r"\(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class CompilerOutOfMemory(RuntimeError):
    """XLA refused the program: its temporaries alone exceed the chip's HBM.

    ``required_bytes`` / ``available_bytes`` are parsed from the compiler message (binary units), 0 if absent.
    """

    def __init__(self, message: str, required_bytes: int, available_bytes: int):
        super().__init__(message)
        self.required_bytes, self.available_bytes = required_bytes, available_bytes


def _parse_oom(message: str) -> CompilerOutOfMemory | None:
    if "RESOURCE_EXHAUSTED" not in message or "memory" not in message.lower():
        return None
    sizes = [int(float(v) * _UNITS[u]) for v, u in _SIZE_RE.findall(message)]
    required, available = (sizes + [0, 0])[:2]
    return CompilerOutOfMemory(message.strip().splitlines()[0], required, available)


def argument_bytes(args: Any) -> int:
    """Per-device bytes of abstract arguments (largest shard of each sharded ``ShapeDtypeStruct``)."""
    total = 0
    for leaf in jax.tree.leaves(args):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) else leaf.shape
        total += math.prod(shape) * jax.numpy.dtype(leaf.dtype).itemsize
    return total


@dataclasses.dataclass(frozen=True)
class Program:
    """A jitted function and abstract arguments (``jax.ShapeDtypeStruct`` carrying shardings)."""

    fn: Any  # the jax.jit-wrapped function
    args: tuple[Any, ...]
    compiler_options: Mapping[str, Any] | None = None  # XLA options for ``.compile()`` (e.g. NO_WINDOWED_EINSUM)


# XLA's SPMD partitioner turns an fsdp all-gather (reduce-scatter) feeding a matmul into a "windowed einsum": a while
# loop overlapping each shard's transfer with its part of the matmul. The cost model then counts one window of the
# loop, so depth extrapolation refuses such programs. Planning with these options compiles the same step with plain
# all-gathers / reduce-scatters: same FLOPs, same collective bytes, no overlap (the estimate is pessimistic where the
# real run would overlap), and the weights gathered whole (temporaries an upper bound of the windowed program's).
NO_WINDOWED_EINSUM: Mapping[str, Any] = {
    "xla_tpu_enable_windowed_einsum_for_all_gather": False,
    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False,
}


def no_windowed_einsum_note(when: str) -> str:
    """A plan report's note for a workload compiled with :data:`NO_WINDOWED_EINSUM`; ``when`` says where XLA would
    window the gathers (e.g. "under fsdp 8")."""
    return (f"windowed einsum off (launch.compiled.NO_WINDOWED_EINSUM): {when} XLA overlaps the weight all-gathers "
            "with the matmuls in while loops that the cost model counts once; planned with plain collectives (no "
            "overlap: a pessimistic step time)")


@dataclasses.dataclass(frozen=True)
class Measurement:
    """Per-device figures of one compiled program."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops: float
    bytes_accessed: float
    optimal_seconds: float
    has_while: bool
    compile_seconds: float
    windowed_einsum: bool = False  # the optimised HLO holds XLA SPMD windowed-einsum loops
    custom_calls: int = 0  # Mosaic kernel calls (launch.kernels): their work is missing from flops / optimal_seconds

    @property
    def total_bytes(self) -> int:
        """Peak per-device HBM: arguments + outputs not aliased to (donated) arguments + temporaries + code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


def linear_fields(m: Measurement) -> dict[str, float]:
    names = ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "code_bytes", "flops", "bytes_accessed",
             "optimal_seconds", "custom_calls")
    return {n: float(getattr(m, n)) for n in names}


def has_while_loop(hlo_text: str) -> bool:
    """True when the optimised HLO contains a while loop (whose cost XLA counts once)."""
    return bool(_WHILE_RE.search(hlo_text))


def compile_and_measure(program: Program) -> Measurement:
    """Lower + compile ``program`` for the devices its argument shardings name; return per-device figures."""
    start = time.perf_counter()
    try:
        lowered = program.fn.lower(*program.args)
        compiled = lowered.compile(dict(program.compiler_options)) if program.compiler_options else lowered.compile()
    except Exception as exc:  # XLA reports "does not fit" as a compile error
        oom = _parse_oom(str(exc))
        if oom is None:
            raise
        raise oom from exc
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax returned one dict per program
        cost = cost[0] if cost else {}
    return Measurement(
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes),
        flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        optimal_seconds=float(cost.get("optimal_seconds", 0.0)),
        has_while=has_while_loop(hlo := compiled.as_text()),
        compile_seconds=seconds,
        windowed_einsum="windowed_dot_general" in hlo,
        custom_calls=kernels.count_custom_calls(hlo),
    )


def _while_hint(m: Measurement) -> str:
    if m.windowed_einsum:
        return (" (XLA's windowed-einsum loops: give the workload compiler_options=launch.compiled.NO_WINDOWED_EINSUM)")
    return ""


def extrapolate(
    build: Callable[[Mapping[str, int]], Program],
    depths: Mapping[str, int],
    fixed: Mapping[str, int] | None = None,
) -> tuple[dict[str, float], list[Measurement]]:
    """Per-device figures of the full-depth program from loop-free compiles at reduced depth.

    Every figure is assumed affine in each depth knob (identical repeated blocks):
    ``f(full) = f(1,..,1) + sum_k (depth_k - 1) * (f(.., k=2, ..) - f(1,..,1))``. Costs ``1 + len(depths)`` compiles.
    ``fixed`` overrides are passed to every build (e.g. ``{"steps": 1}``).
    """
    base_depths = {**(fixed or {}), **{k: 1 for k in depths}}
    base = compile_and_measure(build(base_depths))
    if base.has_while:
        raise ValueError("depth extrapolation needs loop-free programs, but the 1-block program has a while loop"
                         + _while_hint(base))
    total = linear_fields(base)
    measured = [base]
    for knob, full in depths.items():
        if full < 1:
            raise ValueError(f"depth knob {knob!r} must be >= 1, got {full}")
        if full == 1:
            continue
        two = compile_and_measure(build({**base_depths, knob: 2}))
        if two.has_while:
            raise ValueError(f"depth extrapolation needs loop-free programs, but the {knob}=2 program has a while loop"
                             + _while_hint(two))
        measured.append(two)
        for name, value in linear_fields(two).items():
            total[name] += (full - 1) * (value - linear_fields(base)[name])
    if any(m.optimal_seconds <= 0 for m in measured):
        # the TPU cost model gave no estimate (0) or a meaningless one (negative: seen for v6e decoder steps) for
        # some part; an extrapolation through it would be noise, so the planner falls back to the roofline
        total["optimal_seconds"] = 0.0
    return total, measured


def as_measurement(fields: Mapping[str, float], has_while: bool, compile_seconds: float) -> Measurement:
    """Rebuild a Measurement from (possibly extrapolated) linear fields; byte counts are clamped at 0 (a 2-block
    program can get a slightly smaller buffer assignment than the 1-block one)."""
    ints = {k: max(0, int(round(fields[k]))) for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes",
                                               "code_bytes")}
    return Measurement(**ints, flops=fields["flops"], bytes_accessed=fields["bytes_accessed"],
                       optimal_seconds=fields["optimal_seconds"], has_while=has_while,
                       compile_seconds=compile_seconds, custom_calls=max(0, round(fields.get("custom_calls", 0))))


def clear_caches() -> None:
    """Drop jit caches between big compiles (keeps host memory flat during --search)."""
    jax.clear_caches()
