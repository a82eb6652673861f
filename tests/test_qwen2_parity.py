"""Numerical parity of the Qwen2.5 text decoder with transformers (float32): modules 1e-5, whole model 1e-4."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from configs.qwen2_5 import tiny
from conversion.engine import same_names
from conversion.load import load
from conversion.state import param_shapes
from nexus_jax.models.qwen2 import Qwen2DecoderLayer, init_cache_for, rope_cos_sin
from nexus_jax.models.qwen2.attention import grouped_query_attention
from tests.helpers.qwen2_reference import reference_pair

CFG = tiny()


@nnx.jit
def _forward(model, ids, positions, mask):
    return model(ids, positions=positions, attention_mask=mask)


@nnx.jit
def _forward_cached(model, ids, positions, mask, cache):
    return model(ids, positions=positions, attention_mask=mask, cache=cache)


@pytest.fixture(scope="module")
def pair():
    return reference_pair(CFG, seed=0)


def _text_model(hf):
    return hf.model.language_model


def _padded_batch(lengths, total, vocab, seed, side):
    """ids / mask [B, total] with each row's tokens left- or right-aligned."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), total), np.int64)
    mask = np.zeros((len(lengths), total), np.int64)
    for i, n in enumerate(lengths):
        sl = slice(total - n, total) if side == "left" else slice(0, n)
        ids[i, sl] = rng.integers(0, vocab, n)
        mask[i, sl] = 1
    return ids, mask


def _mrope_positions(mask, seed):
    """[3, B, L] M-RoPE ids that are not arange: a 9x9 'image' block after some text, distinct t/h/w streams."""
    b, length = mask.shape
    rng = np.random.default_rng(seed)
    pos = np.zeros((3, b, length), np.int64)
    for i in range(b):
        idx = np.flatnonzero(mask[i])
        n = len(idx)
        start = int(rng.integers(5, max(6, n - 90)))
        t = np.arange(n)
        h, w = t.copy(), t.copy()
        grid = min(81, n - start)
        rows, cols = np.divmod(np.arange(grid), 9)
        t[start : start + grid] = start
        h[start : start + grid] = start + rows
        w[start : start + grid] = start + cols
        after = start + grid
        t[after:] = h[after:] = w[after:] = start + 9 + np.arange(n - after)
        pos[:, i, idx] = np.stack([t, h, w])
    return pos


def test_rope_matches_transformers_with_fractional_mrope_positions(pair):
    hf, _ = pair
    rotary = _text_model(hf).rotary_emb
    rng = np.random.default_rng(0)
    pos = np.cumsum(rng.uniform(0.1, 3.0, (3, 2, 37)), axis=-1)  # fractional, increasing, distinct per stream
    x = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        ref_cos, ref_sin = rotary(x, torch.tensor(pos, dtype=torch.float32))
    cos, sin = rope_cos_sin(jnp.asarray(pos, jnp.float32), CFG.head_dim, CFG.rope_theta, CFG.mrope_section)
    err = max(np.abs(np.asarray(cos) - ref_cos.numpy()).max(), np.abs(np.asarray(sin) - ref_sin.numpy()).max())
    assert cos.shape == (2, 37, CFG.head_dim)
    print(f"\nrope cos/sin max abs error {err:.3g}")
    assert err <= 1e-5, f"rope max abs error {err:.3g}"


def _layer_pair(hf):
    hf_layer = _text_model(hf).layers[1]
    layer = Qwen2DecoderLayer(CFG, rngs=nnx.Rngs(0))
    load(layer, same_names("qwen2_decoder_layer", param_shapes(layer)), hf_layer.state_dict())
    return hf_layer, layer


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_decoder_layer_matches_transformers(pair, causal):
    hf, _ = pair
    hf_layer, layer = _layer_pair(hf)
    rng = np.random.default_rng(1)
    b, length = 2, 45
    x = rng.normal(size=(b, length, CFG.hidden_size)).astype(np.float32)
    pos = np.cumsum(rng.uniform(0.2, 2.0, (3, b, length)), axis=-1).astype(np.float32)
    with torch.no_grad():
        cos_t, sin_t = _text_model(hf).rotary_emb(torch.zeros(1), torch.tensor(pos))
        bias = torch.zeros(b, 1, length, length)
        if causal:
            future = ~torch.ones(length, length, dtype=torch.bool).tril()
            bias = bias.masked_fill(future, torch.finfo(torch.float32).min)
        ref = hf_layer(torch.tensor(x), attention_mask=bias, position_embeddings=(cos_t, sin_t))
        ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()
    cos, sin = rope_cos_sin(jnp.asarray(pos), CFG.head_dim, CFG.rope_theta, CFG.mrope_section)
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None] if causal else None
    out, cache = layer(jnp.asarray(x), cos, sin, mask)
    err = np.abs(np.asarray(out) - ref).max()
    assert cache is None
    print(f"\ndecoder layer ({'causal' if causal else 'bidirectional'}) max abs error {err:.3g}")
    assert err <= 1e-5, f"decoder layer max abs error {err:.3g}"


@pytest.mark.parametrize("side", ["left", "right"])
def test_model_logits_512_tokens_padded_batch_mrope(pair, side):
    hf, model = pair
    ids, mask = _padded_batch([512, 431, 300], 512, CFG.vocab_size, seed=2, side=side)
    pos = _mrope_positions(mask, seed=3)
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
            output_hidden_states=True,
        )
    out = _forward(model, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask))
    valid = mask.astype(bool)
    err = np.abs(np.asarray(out.logits) - ref.logits.numpy())[valid].max()
    scale = float(ref.logits.abs().max())
    print(f"\n[{side} padding] 512-token logits max abs error {err:.3g} (|logits| max {scale:.2f})")
    assert err <= 1e-4, f"logits max abs error {err:.3g}"
    hidden_ref = ref.hidden_states[-1].numpy()  # after the final norm
    herr = np.abs(np.asarray(out.hidden_states) - hidden_ref)[valid].max()
    assert herr <= 1e-4, f"hidden states max abs error {herr:.3g}"


def test_inputs_embeds_equals_input_ids(pair):
    _, model = pair
    ids, mask = _padded_batch([20, 13], 20, CFG.vocab_size, seed=4, side="left")
    a = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    embeds = model.model.embed_tokens(jnp.asarray(ids))
    b = model(inputs_embeds=embeds, attention_mask=jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(a.logits), np.asarray(b.logits))


def test_kv_cache_chunked_prefill_and_decode_match_full_forward(pair):
    _, model = pair
    ids, mask = _padded_batch([50, 37, 44], 50, CFG.vocab_size, seed=5, side="left")
    pos = _mrope_positions(mask, seed=6)
    full = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask)).logits)
    cache = init_cache_for(CFG, batch_size=3, capacity=64)
    pieces = []
    for lo, hi in [(0, 30), (30, 31), (31, 45), *[(i, i + 1) for i in range(45, 50)]]:
        out = _forward_cached(
            model, jnp.asarray(ids[:, lo:hi]), jnp.asarray(pos[:, :, lo:hi]), jnp.asarray(mask[:, lo:hi]), cache
        )
        cache = out.cache
        pieces.append(np.asarray(out.logits))
    assert int(cache.index) == 50
    np.testing.assert_array_equal(np.asarray(cache.valid[:, :50]), mask.astype(bool))
    err = np.abs(np.concatenate(pieces, axis=1) - full)[mask.astype(bool)].max()
    print(f"\nKV-cache chunked vs full logits max abs error {err:.3g}")
    assert err <= 1e-5, f"cached vs full logits max abs error {err:.3g}"


def test_tied_1d_rope_model_matches_transformers_qwen2():
    cfg = tiny(mrope_section=None, tie_word_embeddings=True, num_layers=2)
    hf, model = reference_pair(cfg, seed=7)
    assert model.lm_head is None
    ids, mask = _padded_batch([96, 70], 96, cfg.vocab_size, seed=8, side="left")
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos))
    out = _forward(model, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask))
    err = np.abs(np.asarray(out.logits) - ref.logits.numpy())[mask.astype(bool)].max()
    print(f"\ntied 1-D RoPE model vs Qwen2ForCausalLM logits max abs error {err:.3g}")
    assert err <= 1e-4, f"tied 1-D RoPE logits max abs error {err:.3g}"


@pytest.mark.parametrize("per_head_mask", [False, True])
def test_grouped_query_attention_matches_torch_sdpa(per_head_mask):
    rng = np.random.default_rng(9)
    b, lq, lk, hq, hkv, d = 2, 7, 11, 9, 3, 16
    q, k, v = (rng.normal(size=s).astype(np.float32) for s in ((b, lq, hq, d), (b, lk, hkv, d), (b, lk, hkv, d)))
    mask = rng.random((b, hq if per_head_mask else 1, lq, lk)) < 0.6
    mask[..., 0] = True  # every query row sees at least one key
    out = grouped_query_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
    t = lambda x: torch.tensor(x).transpose(1, 2)  # noqa: E731  [B, L, H, D] -> [B, H, L, D]
    ref = torch.nn.functional.scaled_dot_product_attention(
        t(q), t(k), t(v), attn_mask=torch.tensor(mask), enable_gqa=True
    ).transpose(1, 2)
    err = np.abs(np.asarray(out) - ref.numpy()).max()
    print(f"\nattention vs torch SDPA max abs error {err:.3g}")
    assert err <= 1e-5, f"attention max abs error {err:.3g}"
