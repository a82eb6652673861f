"""Free-form chat answers with several images (``Runner.text_then_image``), the reference ``_sample`` state machine
batched.

A tiny random V2 model. Its "<|vision_start|>" id is set to a byte token that greedy decoding emits (the random model
never emits the real one): the first byte, in id order, of the plain greedy answers for which a left-padded batch (one
prompt of 500+ tokens) with an image limit of 2 has rows opening 0, 1 and 2 images. After an image, decoding goes
on after <|vision_end|>. Each image must equal one uncached forward over prompt + text + <|vision_start|> + N slots
+ <|vision_end|> + text + ... with ``get_rope_index`` positions (float32, 1e-5), every generated token must be that
forward's greedy choice, and the (2, 2, 2)-sharded run must equal the unsharded one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs import nexus_gen
from configs.nexus_decoders import NexusDecoderConfig
from configs.vae import FluxVAEConfig
from nexus_jax.default_checkpoint import randomize_params
from nexus_jax.inference.batching import collate, group_batches
from nexus_jax.inference.cli import InferenceJob
from nexus_jax.inference.outputs import OutputDir, Progress, to_uint8
from nexus_jax.inference.reader import prepare_request
from nexus_jax.inference.requests import RequestError, parse_request
from nexus_jax.inference.runner import EmptyPrompt, ImageDecoder, Runner
from nexus_jax.models.nexus_ar import NexusGenAR
from nexus_jax.models.nexus_decoders import GenerationDecoder
from nexus_jax.models.vae import FluxVAE
from nexus_jax.nexus.tiny import ByteTokenizer
from nexus_jax.processing.rope_index import get_rope_index
from nexus_jax.sharding import make_mesh

MAX_NEW = 12
LIMIT = 2  # images per answer
PROMPTS = ("draw " + "a quiet harbour at dawn with fishing boats, " * 12, "a fox", "cat?", "a small red boat")


def with_tokens(cfg, **ids):
    return dataclasses.replace(cfg, vl=dataclasses.replace(cfg.vl, tokens=dataclasses.replace(cfg.vl.tokens, **ids)))


def build(cfg, with_decoder: bool = False, mesh=None) -> Runner:
    ar = NexusGenAR(cfg, rngs=nnx.Rngs(0))
    randomize_params(ar, 1)  # same weights for any token-id choice (ids are not parameters)
    if not with_decoder:
        return Runner(ar, max_new_tokens=MAX_NEW, mesh=mesh)
    dec_cfg = NexusDecoderConfig.tiny(num_steps=2, height=32, width=48, cfg_scale=3.0)
    gen, vae = GenerationDecoder(dec_cfg, rngs=nnx.Rngs(2)), FluxVAE(FluxVAEConfig.tiny(), rngs=nnx.Rngs(4))
    randomize_params(gen, 10)
    randomize_params(vae, 11)
    rng = np.random.default_rng(0)
    empty = EmptyPrompt(rng.standard_normal(dec_cfg.dit.pooled_dim).astype(np.float32),
                        rng.standard_normal((5, dec_cfg.dit.context_dim)).astype(np.float32))
    return Runner(ar, vae=vae, generation=ImageDecoder(gen, dec_cfg.sampler), empty=empty, max_new_tokens=MAX_NEW)


@pytest.fixture(scope="module")
def setup():
    cfg, tok = nexus_gen.tiny("v2"), ByteTokenizer()
    items = [
        prepare_request(
            parse_request(json.dumps({"id": f"u{i}", "task": "understanding", "messages": [
                {"role": "user", "content": p}]}), i, "."), cfg, tok.encode, MAX_NEW, None)
        for i, p in enumerate(PROMPTS)
    ]
    (batch,) = group_batches(items, batch_size=len(PROMPTS), length_multiple=640)  # one length bucket
    nb = collate(batch, cfg)
    assert nb.input_ids.shape[1] >= 500 and not nb.attention_mask.all()  # long prompt, left padding
    tokens, counts = build(cfg).understand(nb)
    assert (counts == MAX_NEW).all(), "the greedy baseline should run the full length"
    # Byte ids the greedy answers emit, never at step 0, in id order (deterministic: fixed weights); the first one
    # whose two-image answers have rows with 0, 1 and 2 images becomes <|vision_start|>.
    candidates = sorted({int(t) for row in tokens for t in row[1:] if t < 256} - {int(t) for t in tokens[:, 0]})
    for t in candidates:
        out = build(with_tokens(cfg, vision_start=t)).text_then_image(nb, LIMIT)
        if {0, 1, 2} <= set(out.num_images.tolist()):
            return cfg, nb, tokens, t, batch, out
    raise AssertionError(f"no byte token opens 0, 1 and 2 images in different rows: {tokens.tolist()}")


def reference_forward(ar: NexusGenAR, nb, row: int, segments, bans_after: int | None = None):
    """One uncached forward over the row's real prompt + segments[0] + image + segments[1] + ... (positions from
    ``get_rope_index`` on the whole sequence, as in training). Returns (image embeddings [num_images, N, hidden],
    whether every generated token is the forward's greedy choice: <|vision_end|> never, <|vision_start|> not after
    ``bans_after`` images)."""
    cfg, tok = ar.config, ar.config.tokens
    n = cfg.num_slots
    real = nb.attention_mask[row].astype(bool)
    ids, slots, starts, generated = list(nb.input_ids[row, real]), [-1] * int(real.sum()), [], []
    for j, seg in enumerate(segments):
        generated += [(len(ids) + i, j) for i in range(len(seg))]
        ids += seg.tolist()
        slots += [-1] * len(seg)
        if j < len(segments) - 1:
            generated.append((len(ids), j))
            starts.append(len(ids))
            ids += [tok.vision_start] + [tok.image_pad] * n + [tok.vision_end]
            slots += [-1, *range(n), -1]
    grids = np.asarray([cfg.slot_grid_thw] * len(starts)).reshape(-1, 3)
    pos, _ = get_rope_index(np.asarray([ids]), grids, image_token_id=tok.image_pad,
                            spatial_merge_size=cfg.vl.vision.spatial_merge_size)
    out = ar(jnp.asarray([ids], jnp.int32), positions=jnp.asarray(pos, jnp.int32),
             slot_index=jnp.asarray([slots], jnp.int32))
    logits = np.array(out.logits[0], np.float32)
    logits[:, tok.vision_end] = -np.inf
    greedy_ok = True
    for i, images_before in generated:
        row_logits = logits[i - 1].copy()
        if bans_after is not None and images_before >= bans_after:
            row_logits[tok.vision_start] = -np.inf
        greedy_ok &= int(np.argmax(row_logits)) == ids[i]
    embeds = np.stack([np.asarray(out.image_embeds[0, s : s + n]) for s in starts]) if starts else None
    return embeds, greedy_ok


def check_against_uncached(runner: Runner, nb, out, limits) -> float:
    """Every row of ``out`` against :func:`reference_forward`; returns the largest embedding error."""
    errors = [0.0]
    for r in range(nb.input_ids.shape[0]):
        k = int(out.num_images[r])
        assert len(out.segments[r]) == k + 1 and k <= limits[r]
        assert not np.asarray(out.image_embeds[r, k:]).any()  # no image j >= k: zeros
        want, greedy_ok = reference_forward(runner.ar, nb, r, out.segments[r], int(limits[r]))
        assert greedy_ok, f"row {r}: a generated token is not the uncached forward's greedy choice"
        if k:
            errors.append(float(np.abs(np.asarray(out.image_embeds[r, :k]) - want).max()))
    return max(errors)


def test_several_images_match_uncached_forward(setup):
    cfg, nb, greedy, t, _, out = setup
    runner = build(with_tokens(cfg, vision_start=t))
    n, hidden = cfg.num_slots, cfg.vl.text.hidden_size
    assert out.image_embeds.shape == (len(PROMPTS), LIMIT, n, hidden)
    for r, row in enumerate(greedy):  # the text before the first <|vision_start|> is plain greedy decoding
        first = out.segments[r][0]
        np.testing.assert_array_equal(first, row[: len(first)])
        if out.num_images[r] == 0:
            assert len(first) == MAX_NEW and t not in row
    assert any(len(s[-1]) for s, k in zip(out.segments, out.num_images) if k)  # text after an image
    err = check_against_uncached(runner, nb, out, [LIMIT] * len(PROMPTS))
    print(f"free-form images {out.num_images.tolist()} (segments {[[len(x) for x in s] for s in out.segments]}) vs "
          f"uncached forward: max abs err {err:.2e}")
    assert err <= 1e-5


def test_per_row_image_limits(setup):
    """A row at its limit never opens another image (it writes text instead); limit 0 = text only."""
    cfg, nb, _, t, _, ref = setup
    runner = build(with_tokens(cfg, vision_start=t))
    two, one = int(np.flatnonzero(ref.num_images == 2)[0]), int(np.flatnonzero(ref.num_images == 1)[0])
    limits = np.full(len(PROMPTS), LIMIT)
    limits[two], limits[one] = 1, 0
    out = runner.text_then_image(nb, limits)
    assert out.num_images[two] == 1 and out.num_images[one] == 0
    assert t not in out.text_tokens(two) and t not in out.text_tokens(one)
    err = check_against_uncached(runner, nb, out, limits)
    print(f"free-form per-row limits {limits.tolist()} -> images {out.num_images.tolist()}: max abs err {err:.2e}")
    assert err <= 1e-5
    with pytest.raises(ValueError, match="max_images must be >= 0"):
        runner.text_then_image(nb, -1)


def test_sharded_equals_unsharded(setup):
    """(data, fsdp, tensor) = (2, 2, 2) over 8 devices: same text, image counts and embeddings (1e-5)."""
    cfg, nb, _, t, _, ref = setup
    runner = build(with_tokens(cfg, vision_start=t), mesh=make_mesh(2, 2, 2))
    assert len(runner.ar.language_model.model.layers[0].mlp.gate_proj.kernel.sharding.device_set) == 8
    out = runner.text_then_image(nb, LIMIT)
    np.testing.assert_array_equal(out.num_images, ref.num_images)
    for a, b in zip(out.segments, ref.segments):
        assert [x.tolist() for x in a] == [x.tolist() for x in b]
    err = float(np.abs(np.asarray(out.image_embeds) - np.asarray(ref.image_embeds)).max())
    print(f"free-form sharded vs unsharded ({ref.num_images.tolist()} images): max abs err {err:.2e}")
    assert err <= 1e-5


def test_vision_end_is_never_generated(setup):
    cfg, nb, greedy, _, _, _ = setup
    banned = int(greedy[0, 0])  # what greedy decoding picks first in row 0 (with <|vision_start|> unchanged)
    out = build(with_tokens(cfg, vision_end=banned)).text_then_image(nb)
    assert out.segments[0][0][0] != banned
    assert all(banned not in out.text_tokens(r) for r in range(len(PROMPTS)))


@pytest.mark.slow
def test_chat_job_writes_one_png_per_image(setup, tmp_path):
    """The batch CLI's ``chat`` task with "max_images": 2: the record's text and segments; one PNG per image (the
    generation decoder, image j with seed + j), the same pixels as decoding the free-form embeddings directly; the
    first image keeps the single-image fields; a record with a missing second PNG is not complete (resume)."""
    cfg, _, _, t, batch, free = setup
    runner = build(with_tokens(cfg, vision_start=t), with_decoder=True)
    rows = tuple(dataclasses.replace(p, request=dataclasses.replace(p.request, task="chat", max_images=LIMIT))
                 for p in batch.items)
    chat_batch = dataclasses.replace(batch, task="chat", items=rows)
    ckpt = type("Ckpt", (), {"ar": runner.ar, "codec": ByteTokenizer()})()
    job = InferenceJob(runner, ckpt, OutputDir(str(tmp_path)), Progress(1, enabled=False))
    job.run(chat_batch)
    records = OutputDir(str(tmp_path)).records
    seeds = np.asarray([p.request.seed for p in chat_batch.rows()], np.uint32)
    pixels = [runner.decode_images("generation", free.image_embeds[:, j], seeds + np.uint32(j)) for j in range(LIMIT)]
    for i, p in enumerate(rows):
        rec, k = records[p.request.id], int(free.num_images[i])
        assert rec["status"] == "ok", rec
        assert rec["segments"] == [ByteTokenizer().decode(s.tolist()) for s in free.segments[i]]
        assert rec["text"] == ByteTokenizer().decode(free.text_tokens(i).tolist())
        assert len(rec.get("images") or []) == k and rec.get("image") == (rec["images"][0] if k else None)
        for j, name in enumerate(rec.get("images") or []):
            np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / name)), to_uint8(pixels[j][i]))
    two = rows[int(np.flatnonzero(free.num_images == 2)[0])].request.id
    assert records[two]["images"] == [f"images/{two}.png", f"images/{two}.more/1.png"]
    assert OutputDir(str(tmp_path)).is_complete(two)
    (tmp_path / records[two]["images"][1]).unlink()
    assert not OutputDir(str(tmp_path)).is_complete(two)


def swap_lm_head_rows(upstream_ar: Path, a: int, b: int) -> None:
    """Swap the lm_head rows (torch layout [vocab, hidden]) of ids ``a`` and ``b`` in an upstream-layout checkpoint."""
    from safetensors.torch import load_file, save_file

    index = json.loads((upstream_ar / "model.safetensors.index.json").read_text())
    path = upstream_ar / index["weight_map"]["lm_head.weight"]
    tensors = load_file(str(path))
    w = tensors["lm_head.weight"]
    w[[a, b]] = w[[b, a]].clone()
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.slow
def test_cli_chat_request_with_two_images(tmp_path):
    """``nexus-jax infer`` on the tiny default checkpoint (built, converted): a ``chat`` request with "max_images": 2
    writes two PNGs. The random model never emits <|vision_start|> by itself, so its lm_head row is swapped with the
    row of a byte its greedy answer writes: the model then opens an image wherever it would have written that byte.
    The byte is the first (in id order) for which the answer opens two images (searched with the runner on the
    converted weights, rows swapped in memory); the swap is then made in the upstream checkpoint, which is converted
    again, and the CLI's record must match the runner's answer."""
    from nexus_jax import main_job
    from nexus_jax.inference import cli as infer_cli
    from nexus_jax.inference import loading

    upstream, ckpt = tmp_path / "default_checkpoint", tmp_path / "converted"
    main_job.build_checkpoint(upstream, seed=1234)
    assert main_job.convert(upstream, ckpt) == 0
    line = json.dumps({"id": "talk", "task": "chat", "max_images": 2, "seed": 5,
                       "messages": [{"role": "user", "content": "Draw me a lighthouse."}]})
    (tmp_path / "requests.jsonl").write_text(line + "\n")
    ck = loading.load(ckpt)
    vs = ck.ar.config.tokens.vision_start
    p = prepare_request(parse_request(line, 0, str(tmp_path)), ck.ar.config, ck.codec.encode, 16, None)
    nb = collate(group_batches([p], 1)[0], ck.ar.config)
    runner = Runner(ck.ar, max_new_tokens=16)
    tokens, _ = runner.understand(nb)
    kernel = ck.ar.language_model.lm_head.kernel  # [hidden, vocab]
    original = np.asarray(kernel.get_value())
    for t in sorted({int(x) for x in tokens[0, 1:]} - {int(tokens[0, 0])}):
        w = original.copy()
        w[:, [t, vs]] = w[:, [vs, t]]
        kernel.set_value(jnp.asarray(w))
        free = runner.text_then_image(nb, 2)
        if free.num_images[0] == 2:
            break
    else:
        raise AssertionError(f"no token of the greedy answer {tokens.tolist()} opens two images")
    swap_lm_head_rows(upstream / "ar", t, vs)
    shutil.rmtree(ckpt / "ar")
    assert main_job.convert(upstream, ckpt) == 0
    out = tmp_path / "out"
    assert infer_cli.main(["--checkpoint", str(ckpt), "--input", str(tmp_path / "requests.jsonl"), "--output",
                           str(out), "--batch-size", "1", "--max-new-tokens", "16", "--no-progress"]) == 0
    (rec,) = map(json.loads, (out / "results.jsonl").read_text().splitlines())
    assert rec["status"] == "ok" and rec["images"] == ["images/talk.png", "images/talk.more/1.png"]
    assert rec["image"] == rec["images"][0] and rec["image_sha256"] == rec["images_sha256"][0]
    assert rec["segments"] == [ck.codec.decode(s.tolist()) for s in free.segments[0]]
    for name, digest in zip(rec["images"], rec["images_sha256"]):
        data = (out / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest and Image.open(out / name).size == (48, 32)
    print(f"CLI chat: lm_head rows of token {t} and <|vision_start|> swapped, segments {rec['segments']!r}, 2 PNGs")


@pytest.mark.parametrize("value, message", [
    (-1, r"max_images -1 must be an integer in \[0, 16\]"), (17, "must be an integer"), (True, "must be an integer"),
    ("2", "must be an integer"),
])
def test_max_images_request_field_is_validated(value, message):
    with pytest.raises(RequestError, match=message):
        parse_request(json.dumps({"task": "chat", "max_images": value, "messages": [
            {"role": "user", "content": "hi"}]}), 0, ".")
    with pytest.raises(RequestError, match="max_images applies to chat requests only, not to understanding"):
        parse_request(json.dumps({"task": "understanding", "max_images": 1, "messages": [
            {"role": "user", "content": "hi"}]}), 0, ".")
    assert parse_request(json.dumps({"task": "chat", "max_images": 0, "messages": [
        {"role": "user", "content": "hi"}]}), 0, ".").max_images == 0


def test_max_images_cli_flag_is_validated(tmp_path, capsys):
    from nexus_jax.inference import cli as infer_cli

    for bad in ("-1", "17"):
        assert infer_cli.main(["--checkpoint", str(tmp_path), "--input", str(tmp_path), "--output",
                               str(tmp_path / "out"), "--max-images", bad]) == 2
        assert f"--max-images ({bad}) must be in [0, 16]" in capsys.readouterr().err
