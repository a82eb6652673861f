"""The ceiling of a benchmark, measured in the same run: its dominant fp32 matmul (or 3x3 conv) shapes, JAX vs torch.

XLA's CPU dot runs at about 0.83x oneDNN's on these machines (/work/shared/reference/environment.md), so a
matmul-bound JAX program cannot be expected to beat torch by more than that. Each benchmark child calls
:func:`measure` with its dominant ``(m, k, n)`` shapes (on its pinned cores, with its thread count); the parent's
``combine`` calls :func:`keys`::

    ceiling              = JAX GFLOP/s / torch GFLOP/s over those shapes (best wall time of ``repeats`` calls)
    fraction_of_ceiling  = the benchmark's JAX/torch ratio / ceiling  (>= 1: JAX beats its matmul handicap)

plus ``ceiling_cpu`` (the same from process CPU time, steadier on a busy machine) and the GFLOP/s of each side.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import numpy as np

Shape = tuple[int, int, int]  # (m, k, n): [m, k] @ [k, n]


def _best(fn, repeats: int) -> tuple[float, float]:
    """(best wall seconds, best process-CPU seconds) of ``fn()`` over ``repeats`` calls (after one warm-up)."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return min(wall), min(cpu)


def measure(side: str, shapes: Sequence[Shape], repeats: int = 5, rounds: int = 4) -> dict:
    """GFLOP/s (wall and CPU) of ``side`` ("jax" | "torch") running every shape's matmul ``rounds`` times per call.

    JAX runs one jitted program of independent dots (every output returned, so none is dropped); torch runs
    ``torch.mm`` in a loop. Same random fp32 operands on both sides.
    """
    rng = np.random.default_rng(0)
    # distinct operands per round, so XLA cannot merge the rounds (and caches are not kept artificially warm)
    ops = [(rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32))
           for _ in range(rounds) for m, k, n in shapes]
    flops = rounds * sum(2 * m * k * n for m, k, n in shapes)
    if side == "jax":
        import jax
        import jax.numpy as jnp

        args = [(jnp.asarray(a), jnp.asarray(b)) for a, b in ops]
        run = jax.jit(lambda args: [a @ b for a, b in args])
        wall, cpu = _best(lambda: jax.block_until_ready(run(args)), repeats)
    elif side == "torch":
        torch = sys.modules["torch"]
        args = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in ops]
        wall, cpu = _best(lambda: [torch.mm(a, b) for a, b in args], repeats)
    else:
        raise ValueError(f"side must be 'jax' or 'torch', got {side!r}")
    return {"gflops": flops / wall / 1e9, "cpu_gflops": flops / cpu / 1e9, "shapes": [list(s) for s in shapes]}


ConvShape = tuple[int, int, int, int, int]  # (batch, height, width, in channels, out channels) of a 3x3 'same' conv


def measure_conv(side: str, shapes: Sequence[ConvShape], repeats: int = 5) -> dict:
    """As :func:`measure` for fp32 3x3 stride-1 'same' convolutions (the VAE's dominant op): JAX NHWC
    ``lax.conv_general_dilated`` (the layout nexus_jax's VAE uses) vs torch NCHW ``conv2d``."""
    rng = np.random.default_rng(0)
    ops = [(rng.standard_normal((b, h, w, ci), np.float32), rng.standard_normal((3, 3, ci, co), np.float32) * 0.05)
           for b, h, w, ci, co in shapes]
    flops = sum(2 * b * h * w * 9 * ci * co for b, h, w, ci, co in shapes)
    if side == "jax":
        import jax

        args = [(jax.numpy.asarray(x), jax.numpy.asarray(k)) for x, k in ops]
        run = jax.jit(lambda args: [jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
                                    for x, k in args])
        wall, cpu = _best(lambda: jax.block_until_ready(run(args)), repeats)
    elif side == "torch":
        torch = sys.modules["torch"]
        args = [(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(k.transpose(3, 2, 0, 1).copy()))
                for x, k in ops]
        wall, cpu = _best(lambda: [torch.nn.functional.conv2d(x, k, padding=1) for x, k in args], repeats)
    else:
        raise ValueError(f"side must be 'jax' or 'torch', got {side!r}")
    return {"gflops": flops / wall / 1e9, "cpu_gflops": flops / cpu / 1e9, "shapes": [list(s) for s in shapes]}


def keys(jax_side: dict, torch_side: dict, ratio: float) -> dict:
    """The benchmark's ceiling keys from both children's :func:`measure` results and its JAX/torch ``ratio``."""
    ceiling = jax_side["gflops"] / torch_side["gflops"]
    ceiling_cpu = jax_side["cpu_gflops"] / torch_side["cpu_gflops"]
    print(f"ceiling over {len(jax_side['shapes'])} dominant shapes: JAX {jax_side['gflops']:.1f} GFLOP/s, "
          f"torch {torch_side['gflops']:.1f} GFLOP/s -> ceiling {ceiling:.3f} (CPU time {ceiling_cpu:.3f}); "
          f"ratio {ratio:.3f} is {ratio / ceiling:.3f} of it")
    return {
        "ceiling": round(ceiling, 3),
        "fraction_of_ceiling": round(ratio / ceiling, 3),
        "ceiling_cpu": round(ceiling_cpu, 3),
        "ceiling_gflops": {"jax": round(jax_side["gflops"], 1), "torch": round(torch_side["gflops"], 1)},
        "ceiling_shapes": jax_side["shapes"],
    }
