"""Request parsing / validation, output-directory bookkeeping and batching (host side, no model)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import nexus_gen
from nexus_jax.inference import outputs
from nexus_jax.inference.batching import Batcher, collate, group_batches
from nexus_jax.inference.reader import Done, Prepared, iterate, prepare_request, request_dataset
from nexus_jax.inference.requests import Failure, Request, RequestError, parse_or_fail, parse_request
from nexus_jax.nexus.tiny import ByteTokenizer


@pytest.fixture()
def image_dir(tmp_path):
    Image.fromarray(np.full((40, 70, 3), 120, np.uint8)).save(tmp_path / "a.png")
    return tmp_path


def line(**kw) -> str:
    return json.dumps(kw)


def test_generation_request_parses_with_defaults(image_dir):
    r = parse_request(line(task="generation", messages=[{"role": "user", "content": " a  red fox "}]), 4, image_dir)
    assert (r.id, r.index, r.task, r.seed, r.prompt, r.images) == ("line-00005", 4, "generation", 0, "a red fox", ())


def test_typed_content_and_tag_forms_give_the_same_request(image_dir):
    typed = line(id="x", task="understanding", messages=[{"role": "user", "content": [
        {"type": "image", "image": "a.png"}, {"type": "text", "text": "What is it?"}]}])
    tagged = line(id="x", task="understanding", images=["a.png"],
                  messages=[{"role": "user", "content": "<image> What is it?"}])
    a, b = parse_request(typed, 0, image_dir), parse_request(tagged, 0, image_dir)
    assert a == b
    assert a.images == (os.path.join(str(image_dir), "a.png"),)


def test_edit_without_tag_gets_the_tag_prepended(image_dir):
    r = parse_request(line(task="editing", images=["a.png"], seed=9,
                           messages=[{"role": "user", "content": "make it blue"}]), 0, image_dir)
    assert r.messages[-1].content == "<image> make it blue" and r.seed == 9 and r.prompt == "make it blue"


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ("{not json", "malformed JSON"),
        ("[1, 2]", "must be a JSON object, got list"),
        (line(task="painting", messages=[{"role": "user", "content": "x"}]), "unknown task 'painting'"),
        (line(task="generation"), "'messages' must be a non-empty list"),
        (line(task="generation", messages=[{"role": "user", "content": "x"}], seed=-1), "seed -1"),
        (line(task="generation", messages=[{"role": "user", "content": "x"}], seed=2**31), "seed 2147483648"),
        (line(task="editing", images=["nope.png"], messages=[{"role": "user", "content": "x"}]),
         "missing image: "),
        (line(task="editing", messages=[{"role": "user", "content": "x"}]), "exactly 1 source image, got 0"),
        (line(task="generation", images=["a.png"], messages=[{"role": "user", "content": "<image> x"}]),
         "takes no input image, got 1"),
        (line(task="understanding", images=["a.png", "a.png"], messages=[{"role": "user", "content": "<image>"}]),
         "1 <image> tags but 2 images"),
        (line(task="generation", messages=[{"role": "assistant", "content": "x"}]), "assistant"),
        (line(task="generation", messages=[{"role": "user", "content": "  "}]), "non-empty text prompt"),
        (line(id="../x", task="generation", messages=[{"role": "user", "content": "x"}]), "id '../x'"),
        (line(task="generation", messages=[{"role": "user", "content": 3}]), "content must be a string"),
    ],
)
def test_bad_requests_raise_naming_the_problem(image_dir, raw, needle):
    with pytest.raises(RequestError, match=None) as info:
        parse_request(raw, 0, image_dir)
    assert needle in str(info.value)
    failure = parse_or_fail(raw, 3, image_dir)
    assert isinstance(failure, Failure) and needle in failure.error and failure.index == 3


def test_failure_keeps_id_and_task_when_readable(image_dir):
    f = parse_or_fail(line(id="e1", task="editing", images=["gone.png"],
                           messages=[{"role": "user", "content": "x"}]), 0, image_dir)
    assert (f.id, f.task) == ("e1", "editing") and "gone.png" in f.error


# ------------------------------------------------------------------------------------------------------ outputs
def test_output_dir_resume_checks_record_and_image_hash(tmp_path):
    out = outputs.OutputDir(tmp_path)
    img = np.linspace(-1, 1, 4 * 6 * 3, dtype=np.float32).reshape(4, 6, 3)
    path, digest = out.write_image("a", img)
    out.record({"id": "a", "status": "ok", "image": path, "image_sha256": digest})
    out.record({"id": "b", "status": "error", "error": "boom"})
    out.record({"id": "c", "status": "ok", "text": "hi", "image": None})
    out.close()
    with open(tmp_path / outputs.JOURNAL, "a") as f:  # a torn line from a killed run
        f.write('{"id": "d", "stat')
    again = outputs.OutputDir(tmp_path)
    assert again.is_complete("a") and again.is_complete("c")
    assert not again.is_complete("b") and not again.is_complete("d")
    (tmp_path / path).write_bytes(b"corrupt")
    assert not again.is_complete("a")
    assert not [p for p in os.listdir(tmp_path / outputs.IMAGES_DIR) if p.startswith(".tmp")]
    again.finalize(["c", "a", "b"], {"n": 3})
    ids = [json.loads(x)["id"] for x in (tmp_path / outputs.RESULTS).read_text().splitlines()]
    assert ids == ["c", "a", "b"]
    again.close()


def test_png_encoding_maps_minus_one_to_one_onto_0_255():
    px = np.array([[[-1.0, 0.0, 1.0], [-2.0, 0.5, 3.0]]], np.float32)
    assert outputs.to_uint8(px).tolist() == [[[0, 128, 255], [0, 191, 255]]]
    with pytest.raises(ValueError, match=r"\[H, W, 3\] image, got shape \(2, 2\)"):
        outputs.to_uint8(np.zeros((2, 2)))


def test_progress_line_reports_rate_and_eta():
    import io

    buf = io.StringIO()
    p = outputs.Progress(10, stream=buf)
    p.update(4, failed=1)
    assert "4/10 requests (1 failed)" in p.line() and "req/s" in p.line() and "ETA" in p.line()


# ------------------------------------------------------------------------------------------- reader + batching
def _prepared(cfg, tok, image_dir, lines, **kw):
    ds = request_dataset(lines, str(image_dir), lambda r: prepare_request(r, cfg, tok.encode, 8),
                         **kw)
    return list(iterate(ds, num_threads=2))


def test_reader_prepares_in_order_and_records_failures(image_dir):
    cfg, tok = nexus_gen.tiny("v2"), ByteTokenizer()
    lines = [
        line(id="g", task="generation", messages=[{"role": "user", "content": "fox"}]),
        "{bad",
        line(id="u", task="understanding", images=["a.png"], messages=[{"role": "user", "content": "<image> hi"}]),
        line(id="long", task="generation", messages=[{"role": "user", "content": "y" * 3000}]),
        line(id="done", task="generation", messages=[{"role": "user", "content": "z"}]),
    ]
    items = _prepared(cfg, tok, image_dir, lines, is_complete=lambda i: i == "done")
    assert [type(x).__name__ for x in items] == ["Prepared", "Failure", "Prepared", "Failure", "Done"]
    assert "over-long prompt" in items[3].error and "2048" in items[3].error and "3" in items[3].error
    g, u = items[0], items[2]
    assert g.chat.input_ids[-1] == cfg.tokens.image_pad and len(g.chat.output_images) == 1
    assert u.chat.output_images == () and u.grid.shape == (1, 3) and u.pixels.shape[0] == int(np.prod(u.grid))
    half = _prepared(cfg, tok, image_dir, lines, process_index=1, process_count=2)
    assert [x.index for x in half] == [1, 3]
    assert isinstance(items[4], Done)


def test_batcher_groups_by_task_and_shape_and_pads_to_fixed_size(image_dir):
    cfg, tok = nexus_gen.tiny("v2"), ByteTokenizer()
    prompts = ["a", "bb", "c" * 200, "dd", "e"]
    lines = [line(id=f"g{i}", task="generation", messages=[{"role": "user", "content": p}])
             for i, p in enumerate(prompts)]
    lines.append(line(id="u", task="understanding", images=["a.png"],
                      messages=[{"role": "user", "content": "<image> hi"}]))
    items = [x for x in _prepared(cfg, tok, image_dir, lines) if isinstance(x, Prepared)]
    batches = group_batches(items, batch_size=2, length_multiple=64)
    keys = sorted((b.task, b.length, tuple(p.request.id for p in b.items)) for b in batches)
    short, long_, und = (-(-items[i].length // 64) * 64 for i in (0, 2, 5))
    assert items[0].length < short <= items[0].length + 64 and long_ > short
    assert keys == sorted([("generation", short, ("g0", "g1")), ("generation", short, ("g3", "g4")),
                           ("generation", long_, ("g2",)), ("understanding", und, ("u",))])
    for b in batches:
        nb = collate(b, cfg)
        assert nb.input_ids.shape == (2, b.length) and nb.positions.shape == (3, 2, b.length)
        if b.task == "generation":
            assert np.all(nb.slot_index[:, -cfg.num_slots:] == np.arange(cfg.num_slots))
        else:
            assert nb.inputs.grid_thw.shape == (2, 3) and nb.input_mask.sum() == 2 * nb.inputs.num_merged // 2
        if b.num_real == 1:  # padding row copies the real one
            assert np.array_equal(nb.input_ids[0], nb.input_ids[1])
    with pytest.raises(ValueError, match="batch_size=0"):
        Batcher(0)


def test_request_dataclass_is_hashable_and_frozen():
    r = Request("a", 0, "generation", (), (), 0, "p")
    with pytest.raises(AttributeError):
        r.id = "b"  # type: ignore[misc]


def test_chat_request_is_a_prompt_with_room_for_text_and_an_image(image_dir):
    """``chat``: the prompt ends with the assistant turn (the model writes the answer and may open an image); the
    length limit keeps max_new_tokens plus the N image slots free; an empty chat is refused."""
    cfg, tok = nexus_gen.tiny("v2"), ByteTokenizer()
    req = parse_request(line(id="c", task="chat", messages=[{"role": "user", "content": "draw a boat"}]), 0, image_dir)
    p = prepare_request(req, cfg, tok.encode, 8)
    ids = list(p.chat.input_ids)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n") and cfg.tokens.vision_start not in ids
    same = parse_request(line(id="c", task="understanding", messages=[{"role": "user", "content": "draw a boat"}]), 0,
                         image_dir)
    assert ids == list(prepare_request(same, cfg, tok.encode, 8).chat.input_ids)  # prepared as an understanding prompt
    room = cfg.max_length - 8 - cfg.num_slots
    long = parse_request(line(task="chat", messages=[{"role": "user", "content": "x" * room}]), 1, image_dir)
    with pytest.raises(ValueError, match=f"over-long prompt.*{room}.*image slots"):
        prepare_request(long, cfg, tok.encode, 8)
    with pytest.raises(RequestError, match="chat request needs a message"):
        parse_request(line(task="chat", messages=[{"role": "user", "content": "  "}]), 2, image_dir)
