"""``nexus-jax infer`` as several JAX processes (``launch.distributed`` via the ``launch.local`` harness).

The processes split the pending requests, each serving its share on its own devices; process 0 merges the
per-process journals. The merged ``results.jsonl`` and PNGs must equal a single-process run's (timing and batch
fields aside); a process killed mid-run stops the others within the heartbeat timeout, and a rerun with the same or
another process count completes only the missing requests. Also: the coordination helpers, journals of several
process counts, ``--merge`` and URL (``etils.epath``) file handling, without a model.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from nexus_jax import paths
from nexus_jax.inference import cli as infer_cli
from nexus_jax.inference import outputs
from nexus_jax.inference.multiprocess import Group, PeerFailed, local_mesh
from tests.helpers.checkpoints import converted_default_checkpoint
from tests.helpers.multihost import run_processes

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "requests.jsonl"
NOT_COMPARED = {"batch_seconds", "batch_size", "batch_real"}  # timing / batching of the run, not the answer


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    return converted_default_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=1234)


def small_requests(path: Path) -> Path:
    """Two generation and two understanding requests; with 2 processes (every other line) process 0 serves the
    generation ones, process 1 the understanding ones, so each compiles one kind of program."""
    reqs = [
        {"id": "g1", "task": "generation", "seed": 7, "messages": [{"role": "user", "content": "a red fox"}]},
        {"id": "u1", "task": "understanding", "messages": [{"role": "user", "content": "Name three colours."}]},
        {"id": "g2", "task": "generation", "seed": 3, "messages": [{"role": "user", "content": "a city in rain"}]},
        {"id": "u2", "task": "understanding", "messages": [{"role": "user", "content": "Why is the sky blue?"}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in reqs))
    return path


def infer_args(ckpt: Path, requests: Path, out: Path) -> list[str]:
    return ["infer", "--checkpoint", ckpt, "--input", requests, "--output", out, "--batch-size", "2",
            "--max-new-tokens", "6", "--no-progress"]


def run_infer(ckpt, requests, out, processes, **kw):
    return run_processes(infer_args(ckpt, requests, out), processes, out.parent / f"{out.name}-logs",
                         devices_per_process=2, **kw)


def results(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def comparable(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in NOT_COMPARED} for r in recs]


def assert_same_outputs(out: Path, ref: Path) -> None:
    got, want = results(out), results(ref)
    assert [r["id"] for r in got] == [r["id"] for r in want]
    assert all(r["status"] == "ok" for r in got), got
    assert comparable(got) == comparable(want)
    names = sorted(p.name for p in (ref / "images").iterdir())
    assert sorted(p.name for p in (out / "images").iterdir() if not p.name.startswith(".tmp")) == names
    for n in names:
        assert (out / "images" / n).read_bytes() == (ref / "images" / n).read_bytes(), n


def journal_ids(path: Path) -> list[str]:
    return [r["id"] for r in outputs.read_jsonl_tolerant(str(path)) if r.get("status") == "ok"]


# ------------------------------------------------------------------------------------------------ real processes
def test_two_processes_split_the_requests_and_merge_to_the_single_process_outputs(converted, tmp_path):
    requests = small_requests(tmp_path / "req.jsonl")
    ref = tmp_path / "ref"
    run_infer(converted, requests, ref, 1)
    out = tmp_path / "two"
    run = run_infer(converted, requests, out, 2)
    for r in run.results:
        assert "2 of 4 pending requests (0 already complete)" in r.log(), run.summary()
    shares = [journal_ids(out / f"journal-{i:05d}-of-00002.jsonl") for i in range(2)]
    assert shares == [["g1", "g2"], ["u1", "u2"]], shares
    assert_same_outputs(out, ref)
    summary, ref_summary = (json.loads((d / "summary.json").read_text()) for d in (out, ref))
    assert summary.keys() == ref_summary.keys()
    assert {k: summary[k] for k in ("requests", "ok", "error", "skipped", "missing")} == {
        "requests": 4, "ok": 4, "error": 0, "skipped": 0, "missing": 0}
    assert (summary["processes"], summary["devices"], ref_summary["processes"]) == (2, 4, 1)

    # merge after the fact, with and without the requests file
    before = (out / "results.jsonl").read_bytes()
    for extra in (["--input", str(requests)], []):
        (out / "results.jsonl").unlink()
        (out / "summary.json").unlink()
        assert infer_cli.main(["--merge", "--output", str(out), *extra]) == 0
        assert (out / "results.jsonl").read_bytes() == before
        merged = json.loads((out / "summary.json").read_text())
        assert (merged["ok"], merged["missing"], len(merged["journals"])) == (4, 0, 2)


def test_an_error_in_one_process_stops_the_others_with_its_message(converted, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(  # process 1 only: its plan step raises
        "from nexus_jax.inference import cli\n\n"
        "def broken(*a, **k):\n    raise ValueError('injected: cannot read the journals')\n\n"
        "cli.plan = broken\n")
    requests = small_requests(tmp_path / "req.jsonl")
    run = run_infer(converted, requests, tmp_path / "out", 2, expect_ok=False, grace_s=60,
                    extra_env=[{}, {"PYTHONPATH": os.pathsep.join([str(hook), str(REPO)])}])
    p0, p1 = run.results
    assert (p1.returncode, p0.returncode, p0.killed) == (2, 1, False), run.summary()
    assert "injected: cannot read the journals" in p1.log(), run.summary()
    assert "infer: error: process 1 of 2 failed: ValueError: injected: cannot read the journals" in p0.log()
    assert not list((tmp_path / "out").glob("journal*")) and not (tmp_path / "out" / "results.jsonl").exists()


@pytest.mark.slow  # reference + killed run + two resumes over the example requests (~3-4 min on 2 busy cores)
def test_killed_process_stops_the_others_and_reruns_with_any_process_count_complete_the_rest(converted, tmp_path):
    ref = tmp_path / "ref"
    run_infer(converted, EXAMPLES, ref, 1)
    n_requests = len(results(ref))
    # kill process 1 (the coordination service lives on in process 0), then process 0 (the service dies with it)
    for victim, resume_processes in ((1, 2), (0, 3)):
        out = tmp_path / f"killed-{victim}-then-{resume_processes}"
        killed_at: dict[str, float] = {}

        def kill_after_first_record(procs, out=out, killed_at=killed_at, victim=victim):
            journal = out / f"journal-{victim:05d}-of-00002.jsonl"
            deadline = time.monotonic() + 400
            while not journal_ids(journal) and time.monotonic() < deadline and procs[victim].poll() is None:
                time.sleep(0.05)
            os.killpg(procs[victim].pid, signal.SIGKILL)
            killed_at["t"] = time.monotonic()

        start = time.monotonic()
        run = run_infer(converted, EXAMPLES, out, 2, expect_ok=False, grace_s=60, on_start=kill_after_first_record)
        survivor = run.results[1 - victim]
        # the survivor stopped by itself (not killed by the harness) with the coordination service's error, within
        # the 10 s heartbeat timeout plus a margin for a busy machine
        assert not survivor.killed and survivor.returncode not in (0, None), run.summary()
        assert "detected fatal errors" in survivor.log(), run.summary()
        assert run.wall_s - (killed_at["t"] - start) < 45, run.summary()
        assert not (out / "results.jsonl").exists()
        done = set(journal_ids(out / "journal-00000-of-00002.jsonl")) | set(
            journal_ids(out / "journal-00001-of-00002.jsonl"))
        assert 1 <= len(done) < n_requests, done

        again = run_infer(converted, EXAMPLES, out, resume_processes)
        pending = n_requests - len(done)
        for r in again.results:
            assert f"of {pending} pending requests ({len(done)} already complete)" in r.log(), again.summary()
        redone = [json.loads((out / f"summary-{i:05d}-of-{resume_processes:05d}.json").read_text())["ok"]
                  for i in range(resume_processes)]
        assert sum(redone) == pending, redone  # only the missing requests ran
        assert_same_outputs(out, ref)
        summary = json.loads((out / "summary.json").read_text())
        assert (summary["skipped"], summary["ok"], summary["missing"]) == (len(done), pending, 0)
        every = [i for p in sorted(out.glob("journal*.jsonl")) for i in journal_ids(p)]
        assert sorted(every) == sorted({r["id"] for r in results(ref)}), every  # nothing computed twice


# ------------------------------------------------------------------------------------ coordination (no processes)
class FakeKV:
    """The key-value part of JAX's distributed client, shared by threads standing in for processes."""

    def __init__(self):
        self.data: dict[str, str] = {}
        self.lock = threading.Lock()

    def key_value_set(self, key, value):
        with self.lock:
            if key in self.data:
                raise RuntimeError(f"{key} already set")
            self.data[key] = value

    def key_value_dir_get(self, prefix):
        with self.lock:
            return [(k, v) for k, v in self.data.items() if k.startswith(prefix)]


def _all(n, fn):
    kv, out, threads = FakeKV(), [None] * n, []

    def body(i):
        try:
            out[i] = fn(Group(i, n, kv, poll_s=0.01))
        except Exception as e:  # noqa: BLE001 - collected for the assertions
            out[i] = e

    for i in range(n):
        threads.append(threading.Thread(target=body, args=(i,)))
        threads[-1].start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads), "a process hung"
    return out


def test_group_gathers_agrees_and_stops_on_a_peer_failure():
    assert _all(3, lambda g: g.gather_json("done", {"i": g.index})) == [[{"i": 0}, {"i": 1}, {"i": 2}]] * 3
    assert _all(2, lambda g: g.agree("plan", "abc")) == [None, None]
    res = _all(2, lambda g: g.agree("plan", "abc" if g.index == 0 else "abd"))
    assert all(isinstance(e, RuntimeError) and "disagree" in str(e) for e in res), res

    def one_fails(g):
        if g.index == 1:
            g.fail("ValueError: bad checkpoint")
            return "failed"
        return g.wait("done", timeout_s=5)

    res = _all(2, one_fails)
    assert isinstance(res[0], PeerFailed) and "process 1 of 2 failed: ValueError: bad checkpoint" in str(res[0])
    assert Group().wait("x", "v") == ["v"]  # one process: no client needed
    with pytest.raises(TimeoutError, match=r"processes \[1\] did not reach 'late'"):
        Group(0, 2, FakeKV(), poll_s=0.01).wait("late", timeout_s=0.05)


def test_local_mesh_uses_this_process_devices_and_names_a_bad_mesh():
    import jax

    assert local_mesh(None).size == jax.local_device_count() == 8
    assert dict(local_mesh("2,2,2").shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="--mesh 3,1,1 needs 3 devices, but this process has 8 local devices"):
        local_mesh("3,1,1")
    assert local_mesh(None, jax.local_devices()[:1]) is None


# ------------------------------------------------------------------------------ journals of several process counts
def test_resume_and_merge_read_the_journals_of_every_process_count(tmp_path):
    img = np.zeros((4, 4, 3), np.float32)
    first = outputs.OutputDir(tmp_path, 0, 2)
    path_a, sha_a = first.write_image("a", img)
    first.record({"id": "a", "index": 0, "status": "ok", "image": path_a, "image_sha256": sha_a})
    first.record({"id": "b", "index": 1, "status": "error", "error": "boom"})
    first.close()
    second = outputs.OutputDir(tmp_path, 1, 2)
    second.record({"id": "c", "index": 2, "status": "ok", "text": "hi", "image": None})
    second.close()
    time.sleep(0.01)
    third = outputs.OutputDir(tmp_path, 2, 3)  # a later run with 3 processes sees both journals
    assert third.is_complete("a") and third.is_complete("c") and not third.is_complete("b")
    lines = [json.dumps({"id": i, "task": "understanding", "messages": [{"role": "user", "content": "q"}]})
             for i in "abcd"]
    ids, pending = infer_cli.plan(lines, third)
    assert ids == list("abcd") and pending == [1, 3]
    third.record({"id": "b", "index": 1, "status": "ok", "text": "retried", "image": None})
    # an ok record whose PNG does not match loses to the earlier complete one
    third.record({"id": "a", "index": 0, "status": "ok", "image": path_a, "image_sha256": "0" * 64})
    third.close()
    merger = outputs.OutputDir(tmp_path)
    assert merger.chosen("a") == ({"id": "a", "index": 0, "status": "ok", "image": path_a, "image_sha256": sha_a},
                                  True)
    summary = merger.merge(ids)
    assert [r["id"] for r in results(tmp_path)] == ["a", "b", "c"] and results(tmp_path)[1]["text"] == "retried"
    assert (summary["ok"], summary["error"], summary["missing"]) == (3, 0, 1)
    assert not (tmp_path / "journal.jsonl").exists()  # merging writes no journal
    (tmp_path / "images" / ".tmp-stale").write_bytes(b"x")
    assert merger.remove_stale_temps() == 1 and not (tmp_path / "images" / ".tmp-stale").exists()
    # --merge: order from the records' line indices; a request without a record makes it exit 1
    (tmp_path / "req.jsonl").write_text("\n".join(lines) + "\n")
    assert infer_cli.main(["--merge", "--output", str(tmp_path)]) == 0
    assert [r["id"] for r in results(tmp_path)] == ["a", "b", "c"]
    assert infer_cli.main(["--merge", "--output", str(tmp_path), "--input", str(tmp_path / "req.jsonl")]) == 1
    assert infer_cli.main(["--merge", "--output", str(tmp_path / "nope")]) == 2
    assert infer_cli.main(["--output", str(tmp_path)]) == 2  # --input / --checkpoint needed without --merge


# ------------------------------------------------------------------------------------------------ URLs via epath
class _FakeURL:
    """``testfs:///abs/path`` -> the local ``/abs/path``, through the pathlib-like API etils.epath gives."""

    writes: list[str] = []

    def __init__(self, url):
        self.url = str(url)
        self.local = Path(self.url.split("://", 1)[1])

    def joinpath(self, *parts):
        return _FakeURL("/".join([self.url.rstrip("/"), *parts])) if parts else self

    __truediv__ = joinpath

    @property
    def name(self):
        return self.local.name

    def __fspath__(self):
        return self.url

    def exists(self):
        return self.local.exists()

    def is_file(self):
        return self.local.is_file()

    def is_dir(self):
        return self.local.is_dir()

    def mkdir(self, parents=False, exist_ok=False):
        self.local.mkdir(parents=parents, exist_ok=exist_ok)

    def iterdir(self):
        return (_FakeURL(f"{self.url.rstrip('/')}/{p.name}") for p in self.local.iterdir())

    def read_bytes(self):
        return self.local.read_bytes()

    def read_text(self):
        return self.local.read_text()

    def write_bytes(self, data):  # an object store needs no parent "directories"
        _FakeURL.writes.append(self.url)
        self.local.parent.mkdir(parents=True, exist_ok=True)
        self.local.write_bytes(data)

    def stat(self):
        class S:
            mtime = self.local.stat().st_mtime

        return S()


@pytest.fixture
def fake_scheme():
    from etils.epath import register

    register._URI_PREFIXES_TO_CLS["testfs://"] = _FakeURL
    _FakeURL.writes = []
    yield "testfs://"
    del register._URI_PREFIXES_TO_CLS["testfs://"]


def test_requests_images_and_outputs_through_urls(fake_scheme, tmp_path):
    from configs import nexus_gen
    from nexus_jax.inference.reader import Prepared, iterate, prepare_request, request_dataset
    from nexus_jax.inference.requests import read_lines
    from nexus_jax.nexus.tiny import ByteTokenizer

    (tmp_path / "in" / "pics").mkdir(parents=True)
    (tmp_path / "in" / "pics" / "s.png").write_bytes((REPO / "examples" / "images" / "sunset.png").read_bytes())
    req = {"id": "u", "task": "understanding", "images": ["pics/s.png"],
           "messages": [{"role": "user", "content": "<image> what?"}]}
    (tmp_path / "in" / "req.jsonl").write_text(json.dumps(req) + "\n\n")
    url_in = f"{fake_scheme}{tmp_path}/in/req.jsonl"
    lines = read_lines(url_in)
    assert len(lines) == 1 and paths.parent(url_in) == f"{fake_scheme}{tmp_path}/in"
    cfg, tok = nexus_gen.tiny("v2"), ByteTokenizer()
    ds = request_dataset(lines, paths.parent(url_in), lambda r: prepare_request(r, cfg, tok.encode, 8), indices=[0])
    (item,) = list(iterate(ds, num_threads=0))
    assert isinstance(item, Prepared), item
    assert item.request.images == (f"{fake_scheme}{tmp_path}/in/pics/s.png",) and item.pixels is not None

    root = f"{fake_scheme}{tmp_path}/out"
    out = outputs.OutputDir(root, 0, 2)
    path, digest = out.write_image("g", np.zeros((4, 4, 3), np.float32))
    out.record({"id": "g", "index": 0, "status": "ok", "image": path, "image_sha256": digest})
    out.record({"id": "u", "index": 1, "status": "ok", "text": "x", "image": None})
    out.close()
    assert outputs.OutputDir(root).is_complete("g") and outputs.OutputDir(root).is_complete("u")
    assert outputs.OutputDir(root).merge(["g", "u"])["missing"] == 0
    assert [r["id"] for r in results(tmp_path / "out")] == ["g", "u"]
    assert f"{root}/journal-00000-of-00002.jsonl" in _FakeURL.writes  # whole-object rewrites, no append
    assert f"{root}/results.jsonl" in _FakeURL.writes and f"{root}/images/g.png" in _FakeURL.writes
    assert not [p for p in (tmp_path / "out").rglob(".tmp*")]
