"""Records, task detection, the Grain pipeline (sharding, shuffling, skipping, exact iterator state) and AR batches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from configs import nexus_gen
from configs.training import DataConfig
from nexus_jax.data.ar_examples import ARCollator, AREncoder, max_windows_per_image
from nexus_jax.data.pipeline import BatchIterator, build_dataset, pick_bucket, stack
from nexus_jax.data.records import RecordError, detect_task, parse_record
from nexus_jax.data.sources import JsonlSource
from nexus_jax.data.synthetic import write_ar_dataset
from nexus_jax.nexus.tiny import ByteTokenizer

EDIT = {"id": "e", "images": ["a.png", "b.png"], "messages": [
    {"role": "user", "content": "<image> Change the pan to a pot."},
    {"role": "assistant", "content": "Here is the image: <image>"}]}
GEN = {"images": ["b.png"], "messages": [
    {"role": "user", "content": "Generate an image according to the following description: a cat"},
    {"role": "assistant", "content": "Here is an image based on the description: <image>"}]}
UND = {"images": ["a.png"], "messages": [
    {"role": "user", "content": "<image>\nWhat is written here?"}, {"role": "assistant", "content": "Hello"}]}


def test_task_detection_and_record_validation():
    assert detect_task(parse_record(EDIT)) == "editing"
    assert detect_task(parse_record(json.dumps(GEN))) == "generation"
    assert detect_task(parse_record(UND)) == "understanding"
    assert parse_record(EDIT).image_roles == ("user", "assistant")
    with pytest.raises(RecordError, match="2 <image> placeholders but 1 images"):
        parse_record({**EDIT, "images": ["a.png"]})
    with pytest.raises(RecordError, match="not valid JSON"):
        parse_record("{broken")
    with pytest.raises(RecordError, match="no assistant turn"):
        parse_record({"messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(RecordError, match="message 0 must be"):
        parse_record({"messages": [{"role": "robot", "content": "hi"}]})


def _ids(ds) -> list[int]:
    return [int(ds[i]["record_id"]) for i in range(len(ds))]


def _plain(x):
    return {"x": np.asarray(x)}


def test_process_sharding_and_deterministic_shuffle():
    source = list(range(23))
    shards = [build_dataset(source, _plain, seed=3, num_epochs=1, process_index=i, process_count=3) for i in range(3)]
    ids = [_ids(s) for s in shards]
    assert sorted(sum(ids, [])) == source  # disjoint, complete
    again = build_dataset(source, _plain, seed=3, num_epochs=1, process_index=1, process_count=3)
    assert _ids(again) == ids[1]  # deterministic
    other = build_dataset(source, _plain, seed=4, num_epochs=1, process_index=1, process_count=3)
    assert _ids(other) != ids[1] and sorted(_ids(other)) == sorted(ids[1])
    two = _ids(build_dataset(source, _plain, seed=3, num_epochs=2, process_index=0, process_count=1))
    assert sorted(two[:23]) == sorted(two[23:]) == source and two[:23] != two[23:]  # reshuffled per epoch
    with pytest.raises(ValueError, match="process_index 3 must be in"):
        build_dataset(source, _plain, seed=0, process_index=3, process_count=3)


def test_batch_iterator_skips_counts_and_resumes_exactly():
    def encode(x):
        if x % 5 == 0:
            raise RecordError(f"record {x} is broken")
        return {"x": np.asarray([x, -x])}

    ds = build_dataset(list(range(40)), encode, seed=0, num_epochs=None)
    it = BatchIterator(ds, 4, stack, num_threads=2, prefetch=4)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(5)]
    assert it.skipped > 0 and it.records == it.skipped + 4 * 8
    fresh = BatchIterator(build_dataset(list(range(40)), encode, seed=0, num_epochs=None), 4, stack)
    fresh.set_state(json.loads(json.dumps(state)))  # state survives JSON (as in the checkpoint)
    for want in expected:
        got = next(fresh)
        np.testing.assert_array_equal(got["record_id"], want["record_id"])
        np.testing.assert_array_equal(got["x"], want["x"])
        assert all(r % 5 for r in got["record_id"])
    assert fresh.skipped == it.skipped


def test_pick_bucket():
    assert pick_bucket(100, (128, 256)) == 128 and pick_bucket(129, (128, 256)) == 256
    with pytest.raises(ValueError, match="300 tokens exceeds the largest length bucket 256"):
        pick_bucket(300, (128, 256))


def _ar_setup(tmp_path, model_cfg=None, buckets=(256, 512)):
    data = write_ar_dataset(tmp_path, 7, seed=0)
    model_cfg = model_cfg or nexus_gen.tiny()
    cfg = DataConfig(path=str(data), length_buckets=buckets)
    return data, model_cfg, cfg, AREncoder(model_cfg, cfg, ByteTokenizer().encode, str(tmp_path))


def test_ar_broken_records_are_skipped_and_counted(tmp_path, caplog):
    data, model_cfg, cfg, enc = _ar_setup(tmp_path, buckets=(128, 256))
    lines = JsonlSource(data)._lines
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    und = json.loads(lines[0])
    bad = [
        json.dumps({**und, "images": ["missing.png"]}),
        json.dumps({**und, "images": ["corrupt.png"]}),
        json.dumps({**und, "messages": [und["messages"][0], {"role": "assistant", "content": "word " * 400}]}),
        "{not json",
    ]
    source = lines + bad
    ds = build_dataset(source, enc, seed=0, num_epochs=1)
    collate = ARCollator(model_cfg, cfg, grad_accum=1, micro_batch=1)
    it = BatchIterator(ds, 1, collate, num_threads=1)
    seen = [int(b["record_id"][0]) for b in it]
    assert sorted(seen) == list(range(len(lines)))
    assert it.skipped == 4
    assert set(it.skip_reasons) == {"ValueError", "RecordError"}
    text = caplog.text
    assert "missing.png" in text and "cannot decode image" in text and "over-long record" in text


def test_ar_batches_have_fixed_shapes_and_correct_slots(tmp_path):
    data, model_cfg, cfg, enc = _ar_setup(tmp_path)
    collate = ARCollator(model_cfg, cfg, grad_accum=2, micro_batch=2)
    examples = [enc(line) for line in JsonlSource(data)._lines]
    for i, e in enumerate(examples):
        e["record_id"] = np.asarray(i)
    b1, b2 = collate(examples[:4]), collate(examples[3:7])
    assert {k: v.shape for k, v in b1.items()} == {k: v.shape for k, v in b2.items()}
    ids, labels, slot = b1["input_ids"], b1["labels"], b1["slot_index"]
    assert ids.shape[:2] == (2, 2) and ids.shape[2] in cfg.length_buckets
    image_pad = model_cfg.tokens.image_pad
    for a in range(2):
        for r in range(2):
            out = labels[a, r] == image_pad
            n = int(out.sum())
            assert n in (0, model_cfg.num_slots)
            if n:
                np.testing.assert_array_equal(slot[a, r][out], np.arange(model_cfg.num_slots))
    assert b1["positions"].shape == (2, 3, 2, ids.shape[2])
    # per-example ViT inputs [grad_accum, micro, patches, patch_dim]: batch-sharded like the tokens
    assert b1["input_pixels"].shape == (2, 2, collate.input_budget.patches, model_cfg.vl.vision.patch_dim)


def test_full_size_target_image_gives_81_slots(tmp_path):
    """252x252 target -> 18x18 patches -> 81 merged slots, labelled image_pad and numbered 0..80."""
    model_cfg = nexus_gen.nexus_gen_v2()
    data = write_ar_dataset(tmp_path, 2, seed=0, image_sizes=((300, 410),))
    cfg = DataConfig(path=str(data), length_buckets=(512,))
    enc = AREncoder(model_cfg, cfg, ByteTokenizer().encode, str(tmp_path))
    ex = enc(JsonlSource(data)[1])  # generation record
    assert ex["target_grid"].tolist() == [[1, 18, 18]] and ex["target_pixels"].shape == (324, 1176)
    ex["record_id"] = np.asarray(1)
    batch = ARCollator(model_cfg, cfg, 1, 1)([ex])
    out = batch["labels"][0, 0] == model_cfg.tokens.image_pad
    assert int(out.sum()) == 81
    np.testing.assert_array_equal(batch["slot_index"][0, 0][out], np.arange(81))
    assert batch["target_pixels"].shape == (1, 1, 324, 1176)
    assert max_windows_per_image(324, 4) >= 25


def test_array_record_builder_roundtrip(tmp_path):
    from nexus_jax.data.tfds_builder import array_record_source, build_array_record_dataset

    data, model_cfg, cfg, enc = _ar_setup(tmp_path)
    lines = JsonlSource(data)._lines
    broken = json.loads(lines[0])
    broken["images"] = ["nowhere.png"]
    data.write_text("\n".join(lines + [json.dumps(broken)]) + "\n")
    out = build_array_record_dataset(data, tmp_path / "tfds")
    assert list(out.glob("*.array_record*"))
    source = array_record_source(tmp_path / "tfds")
    assert len(source) == len(lines) + 1
    collate = ARCollator(model_cfg, cfg, 1, 1)
    it = BatchIterator(build_dataset(source, enc, seed=0, num_epochs=1), 1, collate, num_threads=1)
    from_ar = {json.loads(source[int(b["record_id"][0])]["record"])["id"]: b for b in it}
    assert it.skipped == 1 and len(from_ar) == len(lines)
    for line in lines:  # identical arrays to the JSONL path
        ex = enc(line)
        ex["record_id"] = np.asarray(0)
        want = collate([ex])
        got = from_ar[json.loads(line)["id"]]
        for k in want:
            if k != "record_id":
                np.testing.assert_array_equal(got[k], want[k], err_msg=k)
