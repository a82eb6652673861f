"""Training as several JAX processes on 127.0.0.1 (the pod code path), proven against one process.

Each run is ``python -m launch.distributed train ...`` started by the harness (tests/helpers/multihost.py) with a free
coordinator port, gloo CPU collectives and fake devices per process; 8 devices in all. The global batch and seed are
the same in every run, so the losses of 1 x 8 and 2 x 4 (and resumed 1 x 8 / 4 x 2) runs must agree step by step and
the runs must read the same records in the same rows.
"""

from __future__ import annotations

import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from nexus_jax.data.synthetic import write_ar_dataset
from nexus_jax.training.metrics import read_step_log
from tests.helpers.multihost import run_processes

BATCH = 8  # divides over the 8 data-parallel devices of every process count tried (1, 2, 4)
TOL = 1e-5  # same global batch, same mesh shape: only the order of cross-process reductions may differ


def _train(preset: str, data: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "--preset", preset, "--data", str(data), "--run-dir", str(run_dir), "--steps", str(steps),
            "--batch-size", str(BATCH), "--ckpt-every", "2", "--log-every", "1", *extra]


def _steps(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_step_log(run_dir / "steps.jsonl", last_run_only=True)}


def _compare(ref: dict[int, dict], got: dict[int, dict], steps: list[int]) -> float:
    """Max |loss difference| over ``steps``; the record ids of every step must be identical."""
    assert sorted(got) == steps, f"logged steps {sorted(got)}, expected {steps}"
    worst = 0.0
    for s in steps:
        assert got[s]["record_ids"] == ref[s]["record_ids"], (s, got[s]["record_ids"], ref[s]["record_ids"])
        if "num_tokens" in ref[s]:  # AR: the same real tokens were counted
            assert got[s]["num_tokens"] == ref[s]["num_tokens"], s
        worst = max(worst, abs(got[s]["loss"] - ref[s]["loss"]))
    assert worst <= TOL, f"loss differs by {worst:.3g} (> {TOL})"
    return worst


def _equal_over_process_counts(tmp_path: Path, preset: str, data: Path, steps: int) -> dict[int, dict]:
    one, two = tmp_path / "p1", tmp_path / "p2"
    t0 = time.perf_counter()
    run_processes(_train(preset, data, one, steps), 1, tmp_path / "logs1")
    t1 = time.perf_counter()
    run_processes(_train(preset, data, two, steps), 2, tmp_path / "logs2")
    t2 = time.perf_counter()
    worst = _compare(_steps(one), _steps(two), list(range(1, steps + 1)))
    print(f"{preset}: 1x8 vs 2x4 max |loss diff| {worst:.3g} over {steps} steps "
          f"(runs {t1 - t0:.1f} s / {t2 - t1:.1f} s)")
    return _steps(two)


def _ar_data(tmp_path: Path) -> Path:
    return write_ar_dataset(tmp_path / "data", 20, seed=1)


def _resume_elsewhere(tmp_path: Path, data: Path, ref: dict[int, dict], procs: int) -> None:
    """The 2-process run's step-2 checkpoint, resumed on ``procs`` processes, continues exactly (steps 3-4)."""
    run_dir = tmp_path / f"resume{procs}"
    shutil.copytree(tmp_path / "p2", run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "4")  # as if the 2-process job had stopped after step 2
    t0 = time.perf_counter()
    run_processes(_train("tiny_ar", data, run_dir, 4, "--resume", "latest"), procs, tmp_path / f"logs-r{procs}")
    worst = _compare(ref, _steps(run_dir), [3, 4])
    print(f"tiny_ar: 2-process checkpoint resumed on {procs} process(es): steps 3-4 max |loss diff| {worst:.3g} "
          f"({time.perf_counter() - t0:.1f} s)")


@pytest.mark.slow  # ~110 s: keeps the default run under 15 min on 2 cores (test_inference_multihost stays default)
def test_ar_two_processes_equal_one_and_resume_on_one(tmp_path):
    """AR: 2 x 4 == 1 x 8 at every step; the 2-process checkpoint of step 2 resumes on 1 process and continues
    with the same records and losses (model, optimiser and data-iterator state)."""
    data = _ar_data(tmp_path)
    ref = _equal_over_process_counts(tmp_path, "tiny_ar", data, 4)
    _resume_elsewhere(tmp_path, data, ref, 1)


@pytest.mark.slow
def test_ar_two_process_checkpoint_resumes_on_four(tmp_path):
    data = _ar_data(tmp_path)
    run_processes(_train("tiny_ar", data, tmp_path / "p2", 4), 2, tmp_path / "logs2")
    _resume_elsewhere(tmp_path, data, _steps(tmp_path / "p2"), 4)


def test_uneven_batch_is_refused_with_a_message(tmp_path):
    """A global batch whose rows cannot be split over the processes' data-parallel devices fails clearly."""
    data = _ar_data(tmp_path)
    run = run_processes(["train", "--preset", "tiny_ar", "--data", str(data), "--run-dir", str(tmp_path / "r"),
                         "--steps", "1", "--batch-size", "4"], 2, tmp_path / "logs", expect_ok=False)
    assert all(r.returncode == 2 for r in run.results), run.summary()
    assert "do not split over the 8 data-parallel devices" in run.results[0].log()


def _decoder_data(tmp_path: Path, task: str) -> Path:
    from nexus_jax.data.synthetic import write_decoder_dataset
    from nexus_jax.training.decoder_loop import decoder_parts

    parts = decoder_parts(task, "tiny")
    ref = (parts.ref_rows, parts.embed_dim) if parts.editing else None
    return write_decoder_dataset(tmp_path / "data", 16, (parts.embed_rows, parts.embed_dim), ref, seed=2)


@pytest.mark.slow
@pytest.mark.parametrize(
    "task",  # the editing run (~3 min) is heavy: the generation run covers the same two-process decoder path in CI
    ["generation_decoder", pytest.param("editing_decoder", marks=pytest.mark.heavy)],
)
def test_decoder_two_processes_equal_one(tmp_path, task):
    _equal_over_process_counts(tmp_path, f"tiny_{task}", _decoder_data(tmp_path, task), 4)


@pytest.mark.slow  # two tiny UniPic train-step compiles per process count
def test_unipic_t2i_two_processes_equal_one(tmp_path):
    """UniPic-1 training runs the shared loop's multi-process path: 2 x 4 devices == 1 x 8, step by step."""
    from tests.test_unipic_train import write_unipic_records

    data = write_unipic_records(tmp_path / "data", "generation", 16, seed=4)
    _equal_over_process_counts(tmp_path, "tiny_unipic_t2i", data, 2)


@pytest.mark.slow
def test_sigkill_of_one_process_stops_the_others_and_a_restart_resumes_exactly(tmp_path):
    """Process 1 is SIGKILLed after the step-2 checkpoint: process 0 exits with the coordination service's error
    within the heartbeat timeout (no hang); a restart with --resume latest-valid reproduces the uninterrupted run."""
    data, steps = _ar_data(tmp_path), 6
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    run_processes(_train("tiny_ar", data, ref_dir, steps), 2, tmp_path / "logs-ref")
    killed_at: list[float] = []

    def kill_after_checkpoint(procs) -> None:
        def killer() -> None:
            manifest = run_dir / "checkpoints" / "2" / "nexus_manifest.json"
            deadline = time.time() + 300
            while not manifest.exists() and time.time() < deadline:
                time.sleep(0.05)
            killed_at.append(time.monotonic())
            procs[1].send_signal(signal.SIGKILL)

        threading.Thread(target=killer, daemon=True).start()

    run = run_processes(_train("tiny_ar", data, run_dir, steps, "--step-delay", "0.5"), 2, tmp_path / "logs-k",
                        expect_ok=False, heartbeat_s=10, grace_s=90, on_start=kill_after_checkpoint)
    ended = time.monotonic()
    p0, p1 = run.results
    assert p1.returncode == -signal.SIGKILL, run.summary()
    assert not p0.killed and p0.returncode not in (0, None), run.summary()  # exited by itself, with an error
    assert "another task died" in p0.log(20000) or "unhealthy" in p0.log(20000), p0.log()
    stop_s = ended - killed_at[0]
    assert stop_s < 60, f"process 0 took {stop_s:.0f} s to stop"
    last = max(_steps(run_dir))
    assert 2 <= last < steps
    run_processes(_train("tiny_ar", data, run_dir, steps, "--resume", "latest-valid"), 2, tmp_path / "logs-r")
    resumed = _steps(run_dir)
    ref = _steps(ref_dir)
    first = min(resumed)
    assert first in (3, 5), first  # the newest complete checkpoint: step 2 or 4
    worst = _compare(ref, resumed, list(range(first, steps + 1)))
    assert worst == 0.0, "same process count and mesh: the resumed losses must be bitwise equal"
    print(f"killed after step {last}; process 0 stopped {stop_s:.1f} s after the kill; resumed from step "
          f"{first - 1}: steps {first}-{steps} bitwise equal")
