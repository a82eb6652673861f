"""The benchmark scripts' smoke modes run end to end (subprocess, tiny sizes) and their JAX / reference outputs agree.

Benchmarks without a quick mode (conversion, decoder, text_decoder, train_step, unipic, vae, vision, plan_reports)
are not run here.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args: str) -> dict:
    """Run ``benchmarks/<script> args`` from the repository root; its last stdout line parsed as JSON."""
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_inference_benchmark_smoke():
    # JAX runner vs the transformers + diffusers pipeline on one 2-step 32x32 generation request
    out = _run("benchmarks/inference.py", "--smoke")
    assert set(out) == {"ratio_b1", "cpu_ratio_b1", "max_abs_err_b1"}
    assert out["ratio_b1"] > 0 and out["max_abs_err_b1"] < 1e-3


def test_prefill_slots_benchmark_tiny():
    out = _run("benchmarks/prefill_slots.py", "--tiny", "--repeats", "1")
    assert out["num_slots"] == 81 and out["ratio"] > 0 and out["max_abs_err"] < 1e-4
