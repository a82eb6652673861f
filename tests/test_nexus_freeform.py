"""Free-form text-then-image generation (``Runner.text_then_image``), the reference ``_sample`` state machine batched.

A tiny random V2 model. Its "<|vision_start|>" id is set to a byte token that greedy decoding emits at different
steps in two rows of a left-padded batch (one prompt of 500+ tokens), so both paths run in one batch: rows that stop
there fill their N slots from the decode's KV cache, and this must equal one uncached causal forward over
prompt + generated text + <|vision_start|> + slots (float32, 1e-5). The text before the stop token equals plain greedy
decoding; <|vision_end|> is never generated.
"""

from __future__ import annotations

import dataclasses
import json

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
from nexus_jax.inference.requests import parse_request
from nexus_jax.inference.runner import EmptyPrompt, ImageDecoder, Runner
from nexus_jax.models.nexus_ar import NexusGenAR
from nexus_jax.models.nexus_decoders import GenerationDecoder
from nexus_jax.models.vae import FluxVAE
from nexus_jax.nexus.prefill import slot_phase_inputs
from nexus_jax.nexus.tiny import ByteTokenizer
from nexus_jax.sharding import make_mesh

MAX_NEW = 12
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
    # A byte id first emitted at different steps >= 1 in two or more rows, and never at step 0 (deterministic:
    # fixed weights). Rows without it run to max_new_tokens with no image.
    first = [{int(t): j for j, t in reversed(list(enumerate(row)))} for row in tokens]

    def usable(t: int) -> bool:
        steps = [f[t] for f in first if t in f]
        return t < 256 and min(steps) >= 1 and len(set(steps)) >= 2

    choice = next((t for t in sorted({t for f in first for t in f}) if usable(t)), None)
    assert choice is not None, f"no byte token first emitted at different steps: {tokens.tolist()}"
    return cfg, nb, tokens, choice, batch


def reference_embeds(ar: NexusGenAR, nb, row: int, text: np.ndarray) -> np.ndarray:
    """Uncached forward over the row's real prompt tokens + ``text`` + <|vision_start|> + N - 1 slots -> [N, hidden]."""
    cfg = ar.config
    real = nb.attention_mask[row].astype(bool)
    ids_p, pos_p = nb.input_ids[row, real], nb.positions[:, row, real]
    start = int(pos_p.max()) + 1
    pos_t = np.broadcast_to(start + np.arange(len(text)), (3, len(text)))
    ids_s, pos_s, slots_s = slot_phase_inputs(cfg, np.asarray([start + len(text)]))
    ids = np.concatenate([ids_p, text, ids_s[0]])
    pos = np.concatenate([pos_p, pos_t, pos_s[:, 0]], axis=1)
    slots = np.concatenate([np.full(len(ids_p) + len(text), -1), slots_s[0]])
    out = ar(jnp.asarray(ids[None], jnp.int32), positions=jnp.asarray(pos[:, None], jnp.int32),
             slot_index=jnp.asarray(slots[None], jnp.int32), with_logits=False)
    return np.asarray(out.image_embeds[0, -cfg.num_slots:])


def test_text_then_image_matches_uncached_forward(setup):
    cfg, nb, greedy, t, _ = setup
    runner = build(with_tokens(cfg, vision_start=t))
    out = runner.text_then_image(nb)
    n, hidden = cfg.num_slots, cfg.vl.text.hidden_size
    assert out.image_embeds.shape == (len(PROMPTS), n, hidden)
    errors = []
    for r, row in enumerate(greedy):
        hits = np.flatnonzero(row == t)
        if hits.size == 0:  # never reaches the stop token: all text, no image, zero embeddings
            assert not out.has_image[r] and out.num_text[r] == MAX_NEW
            np.testing.assert_array_equal(out.tokens[r], row)
            assert not np.asarray(out.image_embeds[r]).any()
            continue
        k = int(hits[0])
        assert out.has_image[r] and out.num_text[r] == k
        np.testing.assert_array_equal(out.tokens[r, : k + 1], row[: k + 1])  # same text, then the stop token
        assert (out.tokens[r, k + 1 :] == cfg.tokens.endoftext).all()
        want = reference_embeds(runner.ar, nb, r, row[:k])
        errors.append(float(np.abs(np.asarray(out.image_embeds[r]) - want).max()))
    assert len(set(out.num_text[out.has_image].tolist())) >= 2  # image rows stopped at different steps
    print(f"free-form slot fill vs uncached forward: max abs err {max(errors):.2e}")
    assert max(errors) <= 1e-5


def test_sharded_equals_unsharded(setup):
    """(data, fsdp, tensor) = (2, 2, 2) over 8 devices: same tokens, image rows and embeddings (1e-5)."""
    cfg, nb, _, t, _ = setup
    cfg = with_tokens(cfg, vision_start=t)
    ref = build(cfg).text_then_image(nb)
    runner = build(cfg, mesh=make_mesh(2, 2, 2))
    assert len(runner.ar.language_model.model.layers[0].mlp.gate_proj.kernel.sharding.device_set) == 8
    out = runner.text_then_image(nb)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.has_image, ref.has_image)
    err = float(np.abs(np.asarray(out.image_embeds) - np.asarray(ref.image_embeds)).max())
    print(f"free-form sharded vs unsharded: max abs err {err:.2e}")
    assert err <= 1e-5


def test_vision_end_is_never_generated(setup):
    cfg, nb, greedy, _, _ = setup
    banned = int(greedy[0, 0])  # what greedy decoding picks first in row 0 (with <|vision_start|> unchanged)
    out = build(with_tokens(cfg, vision_end=banned)).text_then_image(nb)
    assert out.tokens[0, 0] != banned
    produced = out.tokens[np.arange(out.tokens.shape[1])[None] < out.num_text[:, None]]
    assert banned not in produced


def test_chat_job_records_text_and_renders_opened_images(setup, tmp_path):
    """The batch CLI's ``chat`` task: text for every row; a PNG (generation decoder, the request's seed) for rows
    that opened an image, the same pixels as decoding the free-form embeddings directly."""
    cfg, _, _, t, batch = setup
    runner = build(with_tokens(cfg, vision_start=t), with_decoder=True)
    chat_batch = dataclasses.replace(batch, task="chat")
    ckpt = type("Ckpt", (), {"ar": runner.ar, "codec": ByteTokenizer()})()
    job = InferenceJob(runner, ckpt, OutputDir(str(tmp_path)), Progress(1, enabled=False))
    results = job.compute(chat_batch)
    free = runner.text_then_image(collate(chat_batch, runner.ar.config))
    seeds = np.asarray([p.request.seed for p in chat_batch.rows()], np.uint32)
    pixels = runner.decode_images("generation", free.image_embeds, seeds)
    assert [("image" in r) for r in results] == free.has_image.tolist() and free.has_image.any()
    for i, res in enumerate(results):
        assert res["text"] == ByteTokenizer().decode(free.tokens[i, : free.num_text[i]].tolist())
        if free.has_image[i]:
            png = np.asarray(Image.open(tmp_path / res["image"]))
            np.testing.assert_array_equal(png, to_uint8(pixels[i]))
