"""End to end: default checkpoint (upstream layout) -> converter -> ``nexus-jax infer`` on the shipped examples.

One output per request; a run SIGKILLed half way and restarted gives the same outputs without recomputing the
requests that were complete; bad input is recorded per request and only an all-failed run exits non-zero.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nexus_jax.inference import cli as infer_cli
from nexus_jax.inference.examples import example_requests
from tests.helpers.checkpoints import converted_default_checkpoint

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "requests.jsonl"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    return converted_default_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=1234)


def infer_cmd(ckpt: Path, requests: Path, out: Path, batch_size: int = 1) -> list[str]:
    return [sys.executable, "-m", "nexus_jax.cli", "infer", "--checkpoint", str(ckpt), "--input", str(requests),
            "--output", str(out), "--batch-size", str(batch_size), "--no-progress"]


def env() -> dict:
    e = dict(os.environ)
    e["XLA_FLAGS"] = ""  # one CPU device in the subprocess
    e["PYTHONPATH"] = str(REPO)
    return e


def results(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def journal_ok(out: Path) -> list[str]:
    path = out / "journal.jsonl"
    if not path.exists():
        return []
    ids = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("status") == "ok":
            ids.append(rec["id"])
    return ids


def comparable(rec: dict) -> tuple:
    return rec["status"], rec.get("text"), rec.get("image"), rec.get("image_sha256")


@pytest.mark.slow  # three inference processes (~1 min of CPU each)
def test_examples_complete_and_sigkill_resume(converted, tmp_path):
    ids = [r["id"] for r in example_requests()]
    assert sorted({r["task"] for r in example_requests()}) == ["editing", "generation", "understanding"]
    # uninterrupted reference run
    ref_out = tmp_path / "ref"
    subprocess.run(infer_cmd(converted, EXAMPLES, ref_out), env=env(), check=True, cwd=REPO, timeout=900)
    ref = results(ref_out)
    assert list(ref) == ids and all(r["status"] == "ok" for r in ref.values())
    images = sorted(p.name for p in (ref_out / "images").iterdir())
    assert images == sorted(f"{r['id']}.png" for r in example_requests() if r["task"] != "understanding")
    assert all(isinstance(ref[i]["text"], str) and ref[i]["text"] for i in ids if i.startswith("und"))

    # kill half way, restart
    out = tmp_path / "killed"
    proc = subprocess.Popen(infer_cmd(converted, EXAMPLES, out), env=env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    while len(journal_ok(out)) < len(ids) // 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = journal_ok(out)
    assert len(ids) // 2 <= len(done_before) < len(ids), done_before
    assert not (out / "results.jsonl").exists()  # the killed run never finished
    stamps = {i: os.stat(out / "images" / f"{i}.png").st_mtime_ns for i in done_before if not i.startswith("und")}
    subprocess.run(infer_cmd(converted, EXAMPLES, out), env=env(), check=True, cwd=REPO, timeout=900)
    final = results(out)
    assert list(final) == ids
    assert {i: comparable(final[i]) for i in ids} == {i: comparable(ref[i]) for i in ids}
    # completed requests were not recomputed: one ok record each, PNG files untouched
    after = journal_ok(out)
    assert all(after.count(i) == 1 for i in ids), after
    assert {i: os.stat(out / "images" / f"{i}.png").st_mtime_ns for i in stamps} == stamps
    assert json.loads((out / "summary.json").read_text())["skipped"] == len(done_before)
    assert not [p for p in (out / "images").iterdir() if p.name.startswith(".tmp")]


def test_bad_input_is_recorded_and_only_all_failed_exits_nonzero(converted, tmp_path):
    img = REPO / "examples" / "images" / "sunset.png"
    bad = [
        "{this is not json",
        json.dumps({"id": "t1", "task": "painting", "messages": [{"role": "user", "content": "x"}]}),
        json.dumps({"id": "t2", "task": "editing", "images": [str(tmp_path / "missing.png")],
                    "messages": [{"role": "user", "content": "x"}]}),
        json.dumps({"id": "t3", "task": "generation", "messages": [{"role": "user", "content": "y" * 5000}]}),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(bad) + "\n")
    out = tmp_path / "bad_out"
    assert infer_cli.main(["--checkpoint", str(converted), "--input", str(path), "--output", str(out),
                           "--no-progress"]) == 1
    recs = results(out)
    assert list(recs) == ["line-00001", "t1", "t2", "t3"]
    assert all(r["status"] == "error" for r in recs.values())
    assert "malformed JSON" in recs["line-00001"]["error"]
    assert "unknown task 'painting'" in recs["t1"]["error"]
    assert "missing image" in recs["t2"]["error"] and "missing.png" in recs["t2"]["error"]
    assert "over-long prompt" in recs["t3"]["error"] and "max_length=2048" in recs["t3"]["error"]
    # one good request among the bad ones: exit 0, the good one answered
    good = json.dumps({"id": "ok1", "task": "understanding", "images": [str(img)],
                       "messages": [{"role": "user", "content": "<image> what is it?"}]})
    path.write_text("\n".join([*bad, good]) + "\n")
    out2 = tmp_path / "mixed_out"
    assert infer_cli.main(["--checkpoint", str(converted), "--input", str(path), "--output", str(out2),
                           "--max-new-tokens", "4", "--no-progress"]) == 0
    recs = results(out2)
    assert recs["ok1"]["status"] == "ok" and [r["status"] for r in recs.values()].count("error") == 4
    # usage errors
    assert infer_cli.main(["--checkpoint", str(converted), "--input", str(tmp_path / "nope.jsonl"),
                           "--output", str(out2)]) == 2
    assert infer_cli.main(["--checkpoint", str(converted), "--input", str(path), "--output", str(out2),
                           "--batch-size", "0"]) == 2
