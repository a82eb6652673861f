"""Generation: greedy parity with transformers ``generate``, EOS handling, top-p sampling, no recompiles."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs.qwen2_5 import tiny
from nexus_jax.generation import GenerationConfig, generate, sample_next, top_p_filter
from nexus_jax.generation.generate import decode, prefill
from tests.helpers.qwen2_reference import reference_pair

CFG = tiny()
LENGTHS = (61, 40, 52)


@pytest.fixture(scope="module")
def pair():
    return reference_pair(CFG, seed=11)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(12)
    rows = [rng.integers(0, CFG.vocab_size, n) for n in LENGTHS]
    total = max(LENGTHS)
    ids = np.zeros((len(rows), total), np.int64)
    mask = np.zeros((len(rows), total), np.int64)
    for i, row in enumerate(rows):
        ids[i, total - len(row) :] = row
        mask[i, total - len(row) :] = 1
    return rows, ids, mask


def test_greedy_32_tokens_equal_transformers_generate(pair, prompts):
    hf, model = pair
    rows, ids, mask = prompts
    out = generate(model, ids, mask, config=GenerationConfig(max_new_tokens=32))
    tokens = np.asarray(out.tokens)
    assert tokens.shape == (3, 32)
    np.testing.assert_array_equal(np.asarray(out.num_generated), [32, 32, 32])
    with torch.no_grad():
        batch_ref = hf.generate(
            torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=32, min_new_tokens=32,
            do_sample=False,
        )[:, ids.shape[1] :].numpy()
    np.testing.assert_array_equal(tokens, batch_ref)  # left-padded batch, as transformers runs it
    for i, row in enumerate(rows):  # and each prompt alone, unpadded
        with torch.no_grad():
            ref = hf.generate(torch.tensor(row[None]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
        np.testing.assert_array_equal(tokens[i], ref[0, len(row) :].numpy(), err_msg=f"row {i}")


def test_eos_stops_row_and_pads(pair, prompts):
    _, model = pair
    _, ids, mask = prompts
    free = np.asarray(generate(model, ids, mask, config=GenerationConfig(max_new_tokens=12)).tokens)
    eos = int(free[1, 4])  # row 1 emits this id at step 4 (maybe earlier too)
    first = [int(np.flatnonzero(r == eos)[0]) if (r == eos).any() else None for r in free]
    out = generate(model, ids, mask, config=GenerationConfig(max_new_tokens=12, eos_token_ids=(eos,), pad_token_id=7))
    tokens, count = np.asarray(out.tokens), np.asarray(out.num_generated)
    for i, stop in enumerate(first):
        if stop is None:
            np.testing.assert_array_equal(tokens[i], free[i])
            assert count[i] == 12
        else:
            np.testing.assert_array_equal(tokens[i, : stop + 1], free[i, : stop + 1])
            assert (tokens[i, stop + 1 :] == 7).all()
            assert count[i] == stop + 1


def test_top_p_filter_keeps_smallest_nucleus():
    probs = np.array([[0.5, 0.05, 0.3, 0.15], [0.25, 0.25, 0.25, 0.25]], np.float32)
    kept = np.isfinite(np.asarray(top_p_filter(jnp.log(jnp.asarray(probs)), 0.7)))
    np.testing.assert_array_equal(kept[0], [True, False, True, False])  # 0.5 + 0.3 >= 0.7
    assert kept[1].all()  # ties at the threshold are kept
    kept = np.isfinite(np.asarray(top_p_filter(jnp.log(jnp.asarray(probs)), 1e-6)))
    np.testing.assert_array_equal(kept[0], [True, False, False, False])


def test_sampling_stays_in_nucleus_and_follows_probabilities():
    probs = jnp.asarray([[0.5, 0.05, 0.3, 0.15]], jnp.float32)
    keys = jax.random.split(jax.random.key(0), 4000)
    draw = jax.jit(jax.vmap(lambda k: sample_next(jnp.log(probs), k, 1.0, 0.7)[0]))(keys)
    counts = np.bincount(np.asarray(draw), minlength=4) / 4000
    assert counts[1] == 0 and counts[3] == 0
    np.testing.assert_allclose(counts[[0, 2]], [0.5 / 0.8, 0.3 / 0.8], atol=0.03)
    greedy = sample_next(jnp.log(probs), keys[0], 0.0, 0.7)
    assert int(greedy[0]) == 0


def test_sampling_reproducible_and_no_recompile(pair, prompts):
    _, model = pair
    _, ids, mask = prompts
    cfg = GenerationConfig(max_new_tokens=10, temperature=0.9, top_p=0.9)
    a = generate(model, ids, mask, config=cfg, rng=jax.random.key(5))
    sizes = prefill._cache_size(), decode._cache_size()
    b = generate(model, ids, mask, config=cfg, rng=jax.random.key(5))
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    other = GenerationConfig(max_new_tokens=10, temperature=0.5, top_p=0.8)
    c = generate(model, (ids + 1) % CFG.vocab_size, mask, config=other, rng=jax.random.key(6))
    assert (prefill._cache_size(), decode._cache_size()) == sizes  # new prompts / temperature: no recompilation
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def test_argmax_first_equals_jnp_argmax_including_ties():
    from nexus_jax.generation.sampling import argmax_first

    x = jax.random.normal(jax.random.key(0), (6, 1000))
    x = x.at[2, 7].set(9.0).at[2, 500].set(9.0).at[4].set(-jnp.inf).at[4, 999].set(0.0).at[5].set(1.0)
    got = argmax_first(x)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(x, axis=-1)))
    assert got.tolist()[2] == 7 and got.tolist()[4] == 999 and got.tolist()[5] == 0


def test_cpu_decode_compiles_with_its_options_and_matches_the_plain_program(pair, prompts, monkeypatch):
    """On CPU ``decode`` is compiled with CPU_DECODE_COMPILER_OPTIONS (Eigen dots instead of YNNPACK's); it returns
    what the program without the options returns."""
    gen = importlib.import_module("nexus_jax.generation.generate")  # the module (the package exports the function)
    _, model = pair
    _, ids, mask = prompts
    cfg = GenerationConfig(max_new_tokens=13)  # a length no other test compiles
    before = decode._tuned._cache_size(), decode._plain._cache_size()
    tuned = generate(model, ids, mask, config=cfg)
    assert (decode._tuned._cache_size(), decode._plain._cache_size()) == (before[0] + 1, before[1])
    plain_decode = gen.BackendTunedJit(gen._decode, static_argnames=gen.DECODE_STATIC_ARGNAMES, platform="tpu",
                                       options={})
    monkeypatch.setattr(gen, "decode", plain_decode)
    plain = generate(model, ids, mask, config=cfg)
    assert plain_decode._plain._cache_size() == 1
    np.testing.assert_array_equal(np.asarray(tuned.tokens), np.asarray(plain.tokens))


def test_backend_tuned_jit_falls_back_when_an_option_is_unknown(caplog):
    gen = importlib.import_module("nexus_jax.generation.generate")
    f = gen.BackendTunedJit(lambda x, *, k: x * k, static_argnames=("k",), platform="cpu",
                            options={"xla_cpu_no_such_option_here": "1"})
    with caplog.at_level("WARNING"):
        out = f(jnp.arange(3.0), k=2)
    np.testing.assert_array_equal(np.asarray(out), [0.0, 2.0, 4.0])
    assert "rejected" in caplog.text and not f._options_ok
    assert f(jnp.ones(2), k=3).tolist() == [3.0, 3.0]  # the plain program from then on
