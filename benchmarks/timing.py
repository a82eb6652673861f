"""Shared timing helper for the benchmark scripts."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def median_seconds(fn: Callable[[], object], iters: int) -> tuple[float, float]:
    """Median (wall seconds, process CPU seconds) per call of ``fn`` over ``iters`` calls (the caller warms up).

    On a shared machine the CPU time is the steadier of the two.
    """
    wall, cpu = [], []
    for _ in range(iters):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return float(np.median(wall)), float(np.median(cpu))

