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
    """A jitted matmul loop in a child pinned to one core does its work one thread at a time: never more CPU time
    than wall time, and at most two working threads (the caller and one PJRT worker: PJRT:CPU runs an execution on
    the calling thread or hands it to a worker, and a default-suite run under xdist load once split the ticks 52/25
    between them), never an N-thread Eigen pool."""
    out = harness.check_threads(1)
    assert 1 <= out["working_threads"] <= 2, out
    assert out["cpu_s"] <= 1.05 * out["wall_s"] + 0.02, out


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


def test_run_all_repeats_keep_the_median_run_and_list_every_run(tmp_path, monkeypatch):
    values = {"vae": [0.9, 1.1, 0.8], "decoder": [1.3, None, 1.0]}  # decoder's round 2 fails
    calls = []

    def fake_run_one(name, smoke, threads):
        calls.append(name)
        v = values[name][sum(c == name for c in calls) - 1]
        if v is None:
            return {"error": "exited 1", "wall_s": 1.0}
        key = "ratio" if name == "vae" else "step_ratio"
        return {key: v, "sample_ratio": 2 * v, "load": [0.1], "busy": False, "threads": 2}

    monkeypatch.setattr(run_all, "run_one", fake_run_one)
    monkeypatch.setattr(run_all, "RESULTS", str(tmp_path))
    summary = run_all.main(["--only", "vae", "decoder", "--repeats", "3", "--no-readme"])
    assert calls == ["decoder", "vae"] * 3  # round by round, not one benchmark three times in a row
    vae, decoder = summary["results"]["vae"], summary["results"]["decoder"]
    assert vae["ratio"] == 0.9 and [r["ratio"] for r in vae["runs"]] == [0.9, 1.1, 0.8]
    assert decoder["step_ratio"] == 1.0 and decoder["sample_ratio"] == 2.0  # lower middle of the 2 that ran
    assert decoder["runs"][1] == {"error": "exited 1"}
    assert run_all.measured_cell(vae, ("ratio",)).startswith("0.90 [0.80-1.10] (median of 3 runs [range], pinned")
    cell = run_all.measured_cell(decoder, ("step_ratio", "sample_ratio"))
    assert cell.startswith("1.00 [1.00-1.30], 2.00 [2.00-2.60] (median of 2 runs")
    runs = [{"step_ratio": 1.2, "sample_ratio": 0.8}, {"step_ratio": 1.4, "sample_ratio": 1.1},
            {"step_ratio": 1.3, "sample_ratio": 0.9}]  # each key's own median: 1.30 and 0.90
    assert run_all.measured_cell(runs[2] | {"runs": runs}, ("step_ratio", "sample_ratio")).startswith(
        "1.30 [1.20-1.40], 0.90 [0.80-1.10]")
    with pytest.raises(SystemExit, match="--repeats must be >= 1"):
        run_all.main(["--repeats", "0", "--no-readme"])


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
