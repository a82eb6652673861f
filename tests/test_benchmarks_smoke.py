"""The benchmark harness pins each side's threads, flags busy machines and rewrites the README table; every benchmark's
``--smoke`` mode runs end to end (subprocess, tiny sizes, one thread per side) and its JAX / torch outputs agree.

Children run one after the other. The heavier smokes (a JAX and a torch child of ~15-35 CPU-seconds each) are marked
slow; the default run keeps the thread check, vae, prefill_slots and inference.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import harness, run_all  # noqa: E402

HARNESS_KEYS = {"load", "busy", "threads", "cores"}


def _run(*args: str) -> dict:
    """Run ``benchmarks/<script> args`` from the repository root; its last stdout line parsed as JSON."""
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert HARNESS_KEYS <= set(out), f"{args}: harness keys missing from {sorted(out)}"
    assert out["threads"] == 1 and len(out["cores"]) == 1 and len(out["load"]) >= 2
    assert out["busy"] == harness.is_busy(out["load"], 1)
    return out


def _smoke(name: str) -> dict:
    return _run(f"benchmarks/{name}.py", "--smoke", "--threads", "1")


def test_pinned_child_runs_xla_on_one_thread():
    # a jitted matmul loop in a child pinned to one core burns its CPU time on a single OS thread
    out = harness.check_threads(1)
    assert out["working_threads"] == 1, out


def test_busy_flag_and_argument_passthrough():
    assert harness.is_busy([2.6, 1.0], 2) and not harness.is_busy([2.4, 2.5], 2)
    assert harness._drop_values(["--smoke", "--threads", "2", "--cores=0,1", "--iters", "3"]) == [
        "--smoke", "--iters", "3"]


def test_run_all_rewrites_only_the_marked_table(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro | `vae.py` | x | keep |\n<!-- benchmarks:begin -->\n| Benchmark | keys | Measured |\n"
                      "| `vae.py` | `ratio` | 2.11 (old) |\n| `conversion.py` | `read_fraction` | 0.28 |\n"
                      "<!-- benchmarks:end -->\nprose\n")
    result = {"ratio": 1.234, "load": [0.5, 0.7], "busy": False, "threads": 2}
    run_all.update_readme({"vae": result}, str(readme))
    text = readme.read_text()
    assert "| `vae.py` | `ratio` | 1.23 (pinned harness, 2 thread(s) per side, load 0.5/0.7) |" in text
    assert "intro | `vae.py` | x | keep |" in text and "| `conversion.py` | `read_fraction` | 0.28 |" in text
    run_all.update_readme({"vae": result | {"busy": True}}, str(readme))
    assert "BUSY machine" in readme.read_text()


def test_vae_benchmark_smoke():
    out = _smoke("vae")
    assert out["ratio"] > 0 and out["max_abs_err"] < 1e-3
    assert out["ceiling"] > 0 and out["fraction_of_ceiling"] > 0  # conv ceiling (benchmarks/ceiling.py)


def test_inference_benchmark_smoke():
    # JAX runner vs the transformers + diffusers pipeline on one 2-step 32x32 generation request
    out = _smoke("inference")
    assert {"ratio_b1", "cpu_ratio_b1", "max_abs_err_b1"} <= set(out)
    assert out["ratio_b1"] > 0 and out["max_abs_err_b1"] < 1e-3


def test_prefill_slots_benchmark_smoke():
    out = _run("benchmarks/prefill_slots.py", "--tiny", "--repeats", "1", "--threads", "1")
    assert out["num_slots"] == 81 and out["ratio"] > 0 and out["max_abs_err"] < 1e-4


@pytest.mark.slow
def test_vision_benchmark_smoke():
    out = _smoke("vision")
    assert out["ratio"] > 0 and out["max_abs_err"] < 1e-4


@pytest.mark.slow
def test_decoder_benchmark_smoke():
    out = _smoke("decoder")
    assert out["step_ratio"] > 0 and out["sample_ratio"] > 0
    assert out["ceiling"] > 0 and out["fraction_of_ceiling"] > 0 and out["sample_fraction_of_ceiling"] > 0
    assert out["step_max_abs_err"] < 1e-4 and out["sample_image_max_abs_err"] < 1e-3


@pytest.mark.slow
def test_text_decoder_benchmark_smoke():
    out = _smoke("text_decoder")
    assert out["forward_ratio"] > 0 and out["decode_ratio"] > 0 and out["decode_batch_scaling"] > 0
    assert out["decode_batch_scaling_batches"] == [1, 2] and out["decode_scaling_ceiling"] > 0
    assert set(out["decode_matmul_ms"]["jax"]) == {"1", "2"}
    assert out["ceiling"] > 0 and out["fraction_of_ceiling"] > 0
    assert out["forward_last_logits_max_abs_err"] < 1e-3


@pytest.mark.slow
def test_train_step_benchmark_smoke():
    out = _smoke("train_step")
    assert out["ratio"] > 0 and out["loader_headroom"] > 0
    assert out["ceiling"] > 0 and out["fraction_of_ceiling"] > 0
    assert abs(out["first_step_loss"]["jax"] - out["first_step_loss"]["torch"]) < 1e-3


@pytest.mark.slow
def test_unipic_benchmark_smoke():
    out = _smoke("unipic")
    assert out["ceiling"] > 0 and out["fraction_of_ceiling"] > 0  # benchmarks/ceiling.py, measured in the same run
    assert out["ratio"] > 0  # errors relative to the outputs' scale (|x| ~ 60 with these random weights)
    assert out["encoder_bridge_max_abs_err"] < 1e-3 * out["encoder_bridge_max_abs"]
    assert out["decoder_max_abs_err"] < 1e-2 * out["decoder_max_abs"]  # measured 8e-4: the encoder's error, amplified
