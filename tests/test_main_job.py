"""The main job's work dir knows which default checkpoint it holds: a changed one is rebuilt, old results kept aside."""

from __future__ import annotations

import json

from nexus_jax import main_job


def _fake_run(out, work, tag):
    """What a main-job run leaves: derived checkpoints under ``work`` and results under ``out``."""
    (work / "converted").mkdir(parents=True, exist_ok=True)
    (work / "converted" / "marker").write_text(tag)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "images" / "a.png").write_bytes(tag.encode())
    for name in ("results.jsonl", "summary.json", "journal.jsonl", "journal-00001-of-00002.jsonl"):
        (out / name).write_text(tag)


def test_a_changed_checkpoint_rebuilds_work_and_moves_results_aside(tmp_path):
    out, work = tmp_path / "outputs", tmp_path / "outputs" / "work"
    main_job.retire_stale(out, work, "random weights, seed 1")  # fresh: nothing to retire
    assert json.loads((work / main_job.IDENTITY_FILE).read_text()) == {"checkpoint": "random weights, seed 1"}
    _fake_run(out, work, "seed1")

    main_job.retire_stale(out, work, "random weights, seed 1")  # same checkpoint: everything stays (resume)
    assert (work / "converted" / "marker").read_text() == "seed1" and (out / "results.jsonl").exists()

    main_job.retire_stale(out, work, "trained default abc")
    assert not (work / "converted").exists()
    assert json.loads((work / main_job.IDENTITY_FILE).read_text()) == {"checkpoint": "trained default abc"}
    prev = out / "previous-1"
    assert sorted(p.name for p in prev.iterdir()) == ["images", "journal-00001-of-00002.jsonl", "journal.jsonl",
                                                        "results.jsonl", "summary.json"]
    assert (prev / "images" / "a.png").read_bytes() == b"seed1"
    assert sorted(p.name for p in out.iterdir()) == ["previous-1", "work"]

    _fake_run(out, work, "trained")
    main_job.retire_stale(out, work, "random weights, seed 2")
    assert (out / "previous-2" / "results.jsonl").read_text() == "trained" and (out / "previous-1").exists()


def test_work_dirs_without_a_record_count_as_stale(tmp_path):
    """Work dirs written before the record existed (e.g. by an older version) are rebuilt."""
    out, work = tmp_path / "o", tmp_path / "w"
    _fake_run(out, work, "old")
    main_job.retire_stale(out, work, "trained default abc")
    assert not (work / "converted").exists() and (out / "previous-1" / "summary.json").read_text() == "old"


def test_checkpoint_identity_names_the_shipped_assets_or_the_seed():
    trained = main_job.checkpoint_identity(None)
    assert trained.startswith("trained default ") and len(trained.split()[-1]) == 16
    assert trained == main_job.checkpoint_identity(None)
    assert main_job.checkpoint_identity(3) == "random weights, seed 3"
