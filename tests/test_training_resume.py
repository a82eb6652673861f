"""Exact resume: a real training subprocess SIGKILLed after its step-20 checkpoint, resumed, must reproduce the
uninterrupted run's losses bitwise at steps 21-40 and see exactly the same records (none twice, none skipped).

Each test starts three training processes (reference, killed, resumed); their compiles make them slow on 2 cores,
hence ``slow``. The default suite still SIGKILLs a real process mid-save (tests/test_checkpoint.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nexus_jax.data.synthetic import write_ar_dataset
from nexus_jax.training.metrics import read_step_log

STEPS, KILL_AFTER = 40, 20


def _cmd(preset: str, data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nexus_jax.training.cli", "--preset", preset, "--data", str(data),
            "--run-dir", str(run_dir), "--steps", str(STEPS), "--ckpt-every", str(KILL_AFTER), "--log-every", "10",
            *extra]


def _env() -> dict[str, str]:
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")


def _run(cmd: list[str]) -> None:
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


def _kill_after_checkpoint(cmd: list[str], run_dir: Path) -> int:
    """Start ``cmd`` (throttled), SIGKILL it once the step-20 checkpoint is complete; return the last logged step."""
    manifest = run_dir / "checkpoints" / str(KILL_AFTER) / "nexus_manifest.json"
    proc = subprocess.Popen(cmd + ["--step-delay", "0.25"], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not manifest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    rows = read_step_log(run_dir / "steps.jsonl")
    last = max(r["step"] for r in rows)
    assert KILL_AFTER <= last < STEPS
    return last


def check_exact_resume(preset: str, data: Path, tmp_path: Path, records: int, batch: int) -> None:
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "interrupted"
    _run(_cmd(preset, data, ref_dir))
    killed_at = _kill_after_checkpoint(_cmd(preset, data, run_dir), run_dir)
    _run(_cmd(preset, data, run_dir, "--resume", "latest-valid"))

    ref = {r["step"]: r for r in read_step_log(ref_dir / "steps.jsonl")}
    resumed = read_step_log(run_dir / "steps.jsonl", last_run_only=True)
    assert [r["step"] for r in resumed] == list(range(KILL_AFTER + 1, STEPS + 1)), (killed_at, resumed[:2])
    for r in resumed:
        assert r["loss"] == ref[r["step"]]["loss"], (r["step"], r["loss"], ref[r["step"]]["loss"])  # bitwise
        assert r["record_ids"] == ref[r["step"]]["record_ids"], r["step"]
    # The uninterrupted stream itself visits every record exactly once per epoch.
    ids = [i for s in range(1, STEPS + 1) for i in ref[s]["record_ids"]]
    per_epoch = records // batch * batch
    for e in range(len(ids) // per_epoch):
        epoch = ids[e * per_epoch:(e + 1) * per_epoch]
        assert len(set(epoch)) == len(epoch), f"epoch {e} repeats a record: {epoch}"
    print(f"{preset}: killed at step {killed_at}, steps {KILL_AFTER + 1}-{STEPS} bitwise equal after resume")


@pytest.mark.slow
def test_ar_exact_resume_after_sigkill(tmp_path):
    data = write_ar_dataset(tmp_path / "data", 16, seed=1)
    check_exact_resume("tiny_ar", data, tmp_path, records=16, batch=4)


def _decoder_data(tmp_path: Path, task: str) -> Path:
    from nexus_jax.data.synthetic import write_decoder_dataset
    from nexus_jax.training.decoder_loop import decoder_parts

    parts = decoder_parts(task, "tiny")
    ref = (parts.ref_rows, parts.embed_dim) if parts.editing else None
    return write_decoder_dataset(tmp_path / "data", 12, (parts.embed_rows, parts.embed_dim), ref, seed=2)


@pytest.mark.slow
def test_generation_decoder_exact_resume_after_sigkill(tmp_path):
    data = _decoder_data(tmp_path, "generation_decoder")
    check_exact_resume("tiny_generation_decoder", data, tmp_path, records=12, batch=4)


@pytest.mark.slow
@pytest.mark.heavy  # ~4 min; the generation decoder's resume (same loop, same checkpoints) runs in CI
def test_editing_decoder_exact_resume_after_sigkill(tmp_path):
    data = _decoder_data(tmp_path, "editing_decoder")
    check_exact_resume("tiny_editing_decoder", data, tmp_path, records=12, batch=4)
