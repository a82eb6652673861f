"""Batch inference runner: a batch gives the same results as its requests run one by one (same seeds), before PNG
encoding; sharded over 8 devices (data, fsdp, tensor) = unsharded; tiny random models (no checkpoint files)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs import nexus_gen
from configs.nexus_decoders import NexusDecoderConfig
from configs.vae import FluxVAEConfig
from nexus_jax.default_checkpoint import randomize_params
from nexus_jax.inference.batching import collate, collate_references, group_batches
from nexus_jax.inference.reader import prepare_request
from nexus_jax.inference.requests import parse_request
from nexus_jax.inference.runner import EmptyPrompt, ImageDecoder, Runner
from nexus_jax.models.nexus_ar import NexusGenAR
from nexus_jax.models.nexus_decoders import EditingDecoder, GenerationDecoder
from nexus_jax.models.vae import FluxVAE
from nexus_jax.nexus.tiny import ByteTokenizer
from nexus_jax.sharding import make_mesh

MAX_NEW = 6


def build_runner(mesh=None) -> Runner:
    """Same weights on every call (fixed seeds)."""
    ar = NexusGenAR(nexus_gen.tiny("v2"), rngs=nnx.Rngs(0))
    randomize_params(ar, 1)
    gen_cfg = NexusDecoderConfig.tiny(num_steps=2, height=32, width=48, cfg_scale=3.0)
    edit_cfg = NexusDecoderConfig.tiny(num_steps=2, height=32, width=48, cfg_scale=1.0)
    gen, edit = GenerationDecoder(gen_cfg, rngs=nnx.Rngs(2)), EditingDecoder(edit_cfg, rngs=nnx.Rngs(3))
    vae = FluxVAE(FluxVAEConfig.tiny(), rngs=nnx.Rngs(4))
    for i, m in enumerate((gen, edit, vae)):
        randomize_params(m, 10 + i)
    rng = np.random.default_rng(0)
    empty = EmptyPrompt(rng.standard_normal(gen_cfg.dit.pooled_dim).astype(np.float32),
                        rng.standard_normal((5, gen_cfg.dit.context_dim)).astype(np.float32))
    return Runner(ar, vae=vae, generation=ImageDecoder(gen, gen_cfg.sampler),
                  editing=ImageDecoder(edit, edit_cfg.sampler), empty=empty, max_new_tokens=MAX_NEW, mesh=mesh)


@pytest.fixture(scope="module")
def requests(tmp_path_factory):
    d = tmp_path_factory.mktemp("req")
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):  # same size (one shape group), different content; non-square
        Image.fromarray(rng.integers(0, 255, (60, 100, 3), dtype=np.uint8)).save(d / f"{name}.png")
    lines = [
        {"id": "g1", "task": "generation", "seed": 5, "messages": [{"role": "user", "content": "a fox"}]},
        {"id": "g2", "task": "generation", "seed": 6,
         "messages": [{"role": "user", "content": "a red fox in snow!!"}]},
        {"id": "g3", "task": "generation", "seed": 5, "messages": [{"role": "user", "content": "cat"}]},
        {"id": "e1", "task": "editing", "seed": 1, "images": ["a.png"],
         "messages": [{"role": "user", "content": "x"}]},
        {"id": "e2", "task": "editing", "seed": 2, "images": ["b.png"],
         "messages": [{"role": "user", "content": "make it much darker"}]},
        {"id": "u1", "task": "understanding", "images": ["a.png"],
         "messages": [{"role": "user", "content": "<image>?"}]},
        {"id": "u2", "task": "understanding", "images": ["c.png"],
         "messages": [{"role": "user", "content": "<image> describe it"}]},
    ]
    cfg, tok = nexus_gen.tiny("v2"), ByteTokenizer()
    ref_grid = NexusDecoderConfig.tiny().merger.ref_grid
    return [prepare_request(parse_request(json.dumps(x), i, str(d)), cfg, tok.encode, MAX_NEW, ref_grid)
            for i, x in enumerate(lines)]


def run_all(runner: Runner, items, batch_size: int, length_multiple: int) -> dict:
    cfg = runner.ar.config
    out = {}
    for b in group_batches(items, batch_size, length_multiple):
        nb = collate(b, cfg)
        if b.task == "understanding":
            tokens, counts = runner.understand(nb)
            res = [tokens[i, : counts[i]] for i in range(b.num_real)]
        else:
            seeds = np.asarray([p.request.seed for p in b.rows()])
            pixels = runner.images(b.task, nb, seeds, collate_references(b, cfg) if b.task == "editing" else None)
            embeds = np.asarray(runner.slot_embeddings(nb))
            res = [(pixels[i], embeds[i]) for i in range(b.num_real)]
        out.update({p.request.id: r for p, r in zip(b.items, res)})
    return out


@pytest.fixture(scope="module")
def one_by_one(requests):
    """Every request alone (batch 1), and g1 / u1 also without any length padding."""
    runner = build_runner()
    alone = run_all(runner, requests, batch_size=1, length_multiple=64)
    unpadded = run_all(runner, [p for p in requests if p.request.id in ("g1", "u1")], batch_size=1,
                       length_multiple=1)
    return alone, unpadded


@pytest.mark.slow  # ~65 s of CPU (compiles AR, decoders and VAE for batch 1 and 4); ~3 min wall on a busy machine
def test_batch_equals_one_by_one(requests, one_by_one):
    one_by_one, unpadded = one_by_one
    batched = run_all(build_runner(), requests, batch_size=4, length_multiple=64)
    # left padding does not change a result
    assert np.array_equal(unpadded["u1"], one_by_one["u1"])
    pad_err = [float(np.max(np.abs(a - b))) for a, b in zip(unpadded["g1"], one_by_one["g1"])]
    print("unpadded vs padded g1 max abs error (pixels, embeddings):", pad_err)
    assert max(pad_err) < 1e-5
    assert set(batched) == set(one_by_one) == {p.request.id for p in requests}
    pix, emb = {}, {}
    for rid, ref in one_by_one.items():
        if rid.startswith("u"):
            assert np.array_equal(batched[rid], ref), rid
            assert 1 <= len(ref) <= MAX_NEW
        else:
            assert ref[0].shape == (32, 48, 3) and ref[1].shape == (9, 48)
            pix[rid] = float(np.max(np.abs(batched[rid][0] - ref[0])))
            emb[rid] = float(np.max(np.abs(batched[rid][1] - ref[1])))
    print("batch vs one-by-one max abs error: pixels", pix, "slot embeddings", emb)
    assert max(pix.values()) < 1e-5 and max(emb.values()) < 1e-5
    # rows are really different: other prompt -> other AR embeddings; other seed -> other image
    assert np.max(np.abs(one_by_one["g1"][1] - one_by_one["g3"][1])) > 1e-2
    assert np.max(np.abs(one_by_one["e1"][1] - one_by_one["e2"][1])) > 1e-2
    assert np.max(np.abs(one_by_one["g1"][0] - one_by_one["g2"][0])) > 1e-2
    assert np.max(np.abs(one_by_one["e1"][0] - one_by_one["e2"][0])) > 1e-2


@pytest.mark.slow
def test_sharded_equals_unsharded(requests, one_by_one):
    one_by_one = one_by_one[0]
    mesh = make_mesh(2, 2, 2)
    runner = build_runner(mesh)
    kernel = runner.ar.language_model.model.layers[0].mlp.gate_proj.kernel
    assert "tensor" in str(kernel.sharding.spec) and len(kernel.sharding.device_set) == 8
    dit_kernel = runner.decoders["generation"].model.dit.x_embedder.kernel
    assert len(dit_kernel.sharding.device_set) == 8
    sharded = run_all(runner, requests, batch_size=4, length_multiple=64)
    errs = {rid: max(float(np.max(np.abs(a - b))) for a, b in zip(sharded[rid], ref))
            for rid, ref in one_by_one.items() if rid[0] != "u"}
    print("sharded vs unsharded max abs error:", errs)
    assert max(errs.values()) < 1e-5
    for rid in ("u1", "u2"):
        assert np.array_equal(sharded[rid], one_by_one[rid])


@pytest.mark.slow  # ~40 s of compiles; keeps the default run under 15 min on 2 cores
def test_runner_rejects_bad_calls(requests):
    runner = build_runner()
    runner.decoders["generation"] = None
    b = group_batches(requests[:1], 1, 64)[0]
    nb = collate(b, runner.ar.config)
    with pytest.raises(ValueError, match="no generation decoder"):
        runner.images("generation", nb, np.zeros(1))
    with pytest.raises(ValueError, match=r"one seed per row: seeds shape \(2,\), batch 1"):
        runner.images("editing", nb, np.zeros(2))
    assert jax.device_count() == 8
