"""Bad input raises clear errors naming the value and the limit; config checks; remat keeps gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.qwen2_5 import Qwen2TextConfig, qwen2_5_1_5b, qwen2_5_vl_7b, tiny
from nexus_jax.generation import GenerationConfig, generate
from nexus_jax.models.qwen2 import Qwen2ForCausalLM, init_cache_for
from nexus_jax.models.qwen2.build import create_model, param_count

CFG = tiny(num_layers=1)


@pytest.fixture(scope="module")
def model():
    return create_model(CFG, seed=0)


def test_token_id_at_or_above_vocab_raises(model):
    ids = np.array([[1, 2, CFG.vocab_size]])
    with pytest.raises(ValueError, match=rf"token id {CFG.vocab_size} .*vocab_size={CFG.vocab_size}"):
        model(jnp.asarray(ids))
    with pytest.raises(ValueError, match=rf"token id {CFG.vocab_size + 5} .*vocab_size={CFG.vocab_size}"):
        generate(model, ids + 5, config=GenerationConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match=r"token id -1 "):
        model(jnp.asarray([[-1, 3]]))


def test_prompt_longer_than_cache_raises(model):
    ids = np.ones((1, 20), np.int32)
    msg = r"prompt of 20 tokens \+ max_new_tokens=4 = 24 slots exceeds the KV cache capacity of 16"
    with pytest.raises(ValueError, match=msg):
        generate(model, ids, config=GenerationConfig(max_new_tokens=4, cache_capacity=16))
    with pytest.raises(ValueError, match=r"20 new tokens do not fit the KV cache capacity of 16"):
        model(jnp.asarray(ids), cache=init_cache_for(CFG, 1, 16))


def test_truncated_cache_gives_the_same_continuation(model):
    """A cache cut to the slots a continuation needs attends over fewer keys and gives the same numbers."""
    rng = np.random.default_rng(0)
    prompt, more = rng.integers(1, CFG.vocab_size, (2, 10)), rng.integers(1, CFG.vocab_size, (2, 5))
    cache = model(jnp.asarray(prompt), cache=init_cache_for(CFG, 2, 40)).cache
    full = model(jnp.asarray(more), cache=cache)
    short_cache = cache.truncated(15)
    short = model(jnp.asarray(more), cache=short_cache)
    assert short_cache.capacity == 15 and short.cache.capacity == 15 and cache.truncated(40) is cache
    np.testing.assert_allclose(np.asarray(short.logits), np.asarray(full.logits), rtol=0, atol=1e-6)
    for bad in (0, 41):
        with pytest.raises(ValueError, match=rf"truncated capacity must be in \[1, 40\], got {bad}"):
            cache.truncated(bad)


def test_bad_shapes_raise(model):
    msg = rf"inputs_embeds must be \[B, L, hidden_size={CFG.hidden_size}\], got \(1, 4, 8\)"
    with pytest.raises(ValueError, match=msg):
        model(inputs_embeds=jnp.zeros((1, 4, 8)))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match=r"positions must have shape \[B, L\] or \[3, B, L\], got \(2, 1, 4\)"):
        model(jnp.ones((1, 4), jnp.int32), positions=jnp.zeros((2, 1, 4), jnp.int32))


def test_prompt_beyond_max_positions_and_right_padding_raise(model):
    short = tiny(num_layers=1, max_position_embeddings=32)
    with pytest.raises(ValueError, match=r"exceeds max_position_embeddings=32"):
        generate(create_model(short), np.ones((1, 30), np.int32), config=GenerationConfig(max_new_tokens=4))
    mask = np.array([[1, 1, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, np.ones((1, 3), np.int32), mask)


def test_config_errors_name_value_and_limit():
    with pytest.raises(ValueError, match=r"mrope_section \(2, 3, 4\) sums to 9; it must sum to head_dim // 2 = 8"):
        tiny(mrope_section=(2, 3, 4))
    with pytest.raises(ValueError, match=r"num_heads=10 must be a multiple of num_kv_heads=3"):
        tiny(num_heads=10)
    with pytest.raises(ValueError, match=r"remat='some'"):
        tiny(remat="some")
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5"):
        GenerationConfig(top_p=1.5)


def test_presets_have_the_documented_shapes():
    big = qwen2_5_vl_7b()
    assert (big.hidden_size, big.num_layers, big.num_heads, big.num_kv_heads, big.head_dim) == (3584, 28, 28, 4, 128)
    assert (big.intermediate_size, big.vocab_size, big.mrope_section, big.tie_word_embeddings) == (
        18944, 152064, (16, 24, 24), False)
    abstract = nnx.eval_shape(lambda: Qwen2ForCausalLM(big, rngs=nnx.Rngs(0)))
    assert param_count(abstract) == 7_615_616_512  # Qwen2.5-VL-7B language model incl. untied lm_head
    small = qwen2_5_1_5b()
    assert small.tie_word_embeddings and small.mrope_section is None
    assert isinstance(small, Qwen2TextConfig)


def test_remat_gives_same_loss_and_gradients():
    ids = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 16)))

    def loss(m):
        return jnp.mean(jax.nn.logsumexp(m(ids).logits, axis=-1))

    plain = create_model(CFG, seed=1)
    remat = create_model(CFG.replace(remat="full"), seed=1)
    step = nnx.jit(nnx.value_and_grad(loss))
    l0, g0 = step(plain)
    l1, g1 = step(remat)
    assert abs(float(l0) - float(l1)) < 1e-6
    err = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), g0, g1)))
    assert err < 1e-6


def test_bf16_compute_with_fp32_params_tracks_fp32():
    ids = jnp.asarray(np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 24)))
    fp32 = create_model(CFG, seed=4)
    bf16 = create_model(CFG.replace(dtype="bfloat16"), seed=4)
    assert bf16.model.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.float32
    out16, out32 = nnx.jit(lambda m: m(ids))(bf16), nnx.jit(lambda m: m(ids))(fp32)
    assert out16.hidden_states.dtype == jnp.bfloat16 and out16.logits.dtype == jnp.float32
    err = float(jnp.abs(out16.logits - out32.logits).max())
    scale = float(jnp.abs(out32.logits).max())
    assert 0 < err <= 0.05 * scale, f"bf16 vs fp32 logits error {err:.3g} (scale {scale:.3g})"
