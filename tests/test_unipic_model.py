"""UniPic-1 model and LLM bridge: static-shape JAX (masked keys, fixed prefix cache) vs the torch token-dropping
reference with a cropped DynamicCache (float32, <= 1e-4), right-padded prompts of different lengths (one of 500+
tokens), batch 3, odd head counts (3 q / 1 kv in the LLM, 3 in the MAR)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import configs.unipic as unipic_configs
from configs.mar import MARConfig
from configs.unipic import UniPicConfig
from nexus_jax.models.unipic.model import abstract_unipic, create_unipic
from nexus_jax.models.unipic.projectors import project
from nexus_jax.nexus.tiny import ByteTokenizer
from nexus_jax.unipic import bridge as jbridge
from nexus_jax.unipic import prompts
from tests.helpers import unipic_torch

CFG = unipic_configs.tiny()
LENGTHS = (9, 517, 40)


@pytest.fixture(scope="module")
def parts():
    """(torch llm, torch MAR, torch proj_in, proj_out) and the JAX counterparts with the same weights."""
    tu, _, _, model, _ = unipic_torch.reference_models(CFG, vae=False)
    return (tu.llm, tu.mar, tu.proj_in, tu.proj_out), (model.llm, model.mar, model.proj_in, model.proj_out)


def _prompts(seed: int = 0):
    """Right-padded ids / mask [3, max(LENGTHS)] (pad = eos)."""
    rng = np.random.default_rng(seed)
    total = max(LENGTHS)
    ids = np.full((len(LENGTHS), total), CFG.tokens.pad, np.int64)
    mask = np.zeros((len(LENGTHS), total), np.int64)
    for i, n in enumerate(LENGTHS):
        ids[i, :n] = rng.integers(0, 256, n)
        mask[i, :n] = 1
    return ids, mask


def _masks(n: int, visible_counts, seed: int):
    """One [B, N] mask (1 = masked) per visible count, a different random subset per row, same count per row."""
    rng = np.random.default_rng(seed)
    out = []
    for k in visible_counts:
        m = np.ones((len(LENGTHS), n), np.float32)
        for row in m:
            row[rng.permutation(n)[:k]] = 0
        out.append(m)
    return out


@nnx.jit(static_argnums=(4,))
def _prefill(llm, ids, mask, _unused, segment_len):
    return jbridge.prefill_context(llm, llm.model.embed_tokens(ids), mask, segment_len)


@nnx.jit(static_argnums=(8,))
def _iteration(llm, mar, p_in, p_out, x, mask, prefix, ctx_mask, capacity=None):
    b = x.shape[0]
    x_enc = mar.forward_mae_encoder(x, mask, mar.fake_class_embedding(b))
    out = jbridge.bridge(llm, lambda v: project(p_in, v), lambda v: project(p_out, v), x_enc, 1 - mask, prefix,
                         ctx_mask, capacity)
    return out, mar.forward_mae_decoder(out, mask)


def test_bridge_static_shapes_match_torch_token_dropping(parts):
    (hf, t_mar, t_in, t_out), (llm, mar, p_in, p_out) = parts
    nb, n, c = CFG.mar.buffer_size, CFG.seq_len, CFG.mar.width
    ids, ctx_mask = _prompts()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((len(LENGTHS), n, CFG.mar.token_embed_dim)).astype(np.float32)
    prefix = _prefill(llm, jnp.asarray(ids), jnp.asarray(ctx_mask), None, n + nb)
    with torch.no_grad():
        kv = unipic_torch.prefill(hf.model, hf.model.embed_tokens(torch.tensor(ids)))
    worst_h, worst_z = 0.0, 0.0
    # iteration 0 (nothing visible), then partial, then almost all visible -- one prefix for all three; the LLM on
    # all N slots (capacity None) or on the visible rows gathered into `capacity` slots (exact count or padded)
    for (count, capacity), mask in zip(((0, None), (0, 0), (6, None), (6, 6), (6, 9), (15, 16)),
                                       _masks(n, (0, 0, 6, 6, 6, 15), seed=6), strict=True):
        out, z = _iteration(llm, mar, p_in, p_out, jnp.asarray(x), jnp.asarray(mask), prefix, jnp.asarray(ctx_mask),
                            capacity)
        assert (mask == 0).sum(-1).tolist() == [count] * len(LENGTHS)
        with torch.no_grad():
            tm = torch.tensor(mask)
            fake = t_mar.fake_latent.expand(len(LENGTHS), c)
            t_enc = t_mar.forward_mae_encoder(torch.tensor(x), tm, fake)
            t_out_enc = unipic_torch.bridge(hf.model, t_in, t_out, t_enc, kv, torch.tensor(ctx_mask), nb)
            t_z = t_mar.forward_mae_decoder(t_out_enc, tm)
        assert kv.get_seq_length() == ids.shape[1]  # cropped back to the context
        keep = np.concatenate([np.ones((len(LENGTHS), nb), bool), mask == 0], axis=1)
        got = np.asarray(out)[keep].reshape(t_out_enc.shape)
        worst_h = max(worst_h, float(np.abs(got - t_out_enc.numpy()).max()))
        worst_z = max(worst_z, float(np.abs(np.asarray(z) - t_z.numpy()).max()))
        assert np.isfinite(np.asarray(out)).all()
    print(f"bridge x_enc + proj_out(h) max abs err {worst_h:.2e}; MAR decoder z max abs err {worst_z:.2e}")
    assert worst_h <= 1e-4
    assert worst_z <= 1e-4


def test_prefix_cache_is_not_mutated_and_padding_is_ignored(parts):
    """Same rows with more right padding (and garbage pad ids) give the same bridge output; the prefix is reused."""
    _, (llm, mar, p_in, p_out) = parts
    nb, n = CFG.mar.buffer_size, CFG.seq_len
    ids, ctx_mask = _prompts()
    wide_ids = np.concatenate([ids, np.random.default_rng(1).integers(0, 256, (3, 7))], axis=1)
    wide_mask = np.concatenate([ctx_mask, np.zeros((3, 7), np.int64)], axis=1)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, n, 16)), jnp.float32)
    mask = jnp.asarray(_masks(n, (5,), seed=3)[0])
    a_prefix = _prefill(llm, jnp.asarray(ids), jnp.asarray(ctx_mask), None, n + nb)
    b_prefix = _prefill(llm, jnp.asarray(wide_ids), jnp.asarray(wide_mask), None, n + nb)
    before = np.asarray(a_prefix.layers[0].key)
    a, _ = _iteration(llm, mar, p_in, p_out, x, mask, a_prefix, jnp.asarray(ctx_mask))
    a2, _ = _iteration(llm, mar, p_in, p_out, x, mask, a_prefix, jnp.asarray(ctx_mask))
    b, _ = _iteration(llm, mar, p_in, p_out, x, mask, b_prefix, jnp.asarray(wide_mask))
    np.testing.assert_array_equal(np.asarray(a_prefix.layers[0].key), before)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))
    keep = np.concatenate([np.ones((3, nb), bool), np.asarray(mask) == 0], axis=1)
    err = float(np.abs(np.asarray(a)[keep] - np.asarray(b)[keep]).max())
    print(f"extra right padding: max abs diff {err:.2e}")
    assert err <= 1e-5


def test_segment_positions_continue_each_rows_text():
    ctx_mask = jnp.asarray([[1, 1, 1, 0], [1, 1, 1, 1]])
    visible = jnp.asarray([[0, 1, 0, 1, 1], [1, 0, 0, 0, 0]])
    pos = np.asarray(jbridge.segment_positions(ctx_mask, visible, 2))
    # row 0: T=3, visible slots 1,3,4 -> 3,4,5; masked slots are don't-care; buffers 6,7
    assert pos[0, [1, 3, 4]].tolist() == [3, 4, 5] and pos[0, 5:].tolist() == [6, 7]
    assert pos[1, 0] == 4 and pos[1, 5:].tolist() == [5, 6]


@pytest.mark.slow
def test_full_config_builds_abstractly_with_the_published_sizes():
    model = abstract_unipic(unipic_configs.full())
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    # unipic.md 2.1 (computed): LLM 1.544 B + MAR 0.794 B + class/fake 1.28 M + head 151.2 M + projectors 8.66 M
    assert abs(count - 2.4977e9) < 1e6, count
    assert model.mar.encoder_pos_embed_learned.shape == (1, 1088, 1280)
    assert model.proj_in[0].kernel.shape == (1280, 1536) and model.proj_out[2].kernel.shape == (1536, 1280)
    assert model.llm.lm_head is None  # tied


@pytest.mark.slow
def test_sharded_build_places_parameters():
    from nexus_jax import sharding

    mesh = sharding.make_mesh(data=2, fsdp=1, tensor=4)
    text = unipic_configs.tiny_text(num_heads=4, num_kv_heads=4, hidden_size=64)
    model = create_unipic(CFG.replace(text=text, mar=MARConfig.tiny(llm_hidden=64)), mesh=mesh)
    spec = model.proj_in[0].kernel.get_value().sharding.spec
    assert "tensor" in str(spec)


def test_config_validation_errors():
    with pytest.raises(ValueError, match="llm_hidden"):
        CFG.replace(text=unipic_configs.tiny_text(hidden_size=64, num_heads=4))
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        CFG.replace(text=CFG.text.replace(tie_word_embeddings=False))
    with pytest.raises(ValueError, match="multiple of vae_stride"):
        CFG.replace(resolution=72)
    with pytest.raises(ValueError, match="cfg_schedule"):
        unipic_configs.SamplingConfig(cfg_schedule="cosine")
    with pytest.raises(ValueError, match="z_channels"):
        CFG.replace(head=CFG.head.__class__.tiny(in_channels=16, out_channels=32, z_channels=40))
    assert isinstance(CFG, UniPicConfig) and CFG.image_tokens == CFG.seq_len + CFG.mar.buffer_size


def test_prompt_templates_tokenize_as_the_chat_text():
    tok = CFG.tokens
    encode = ByteTokenizer().encode
    ids = prompts.encode_instruction("Generate an image: a cat", encode, tok)
    want = [tok.im_start, *b"user\nGenerate an image: a cat", tok.im_end, *b"\n", tok.im_start, *b"assistant\n"]
    assert ids.tolist() == want
    batch = prompts.text_to_image_batch(["a cat", "a much longer prompt about a dog"], encode, tok)
    assert batch.input_ids.shape[0] == 4 and batch.lengths.tolist()[2:] == [batch.lengths[2]] * 2
    row = batch.input_ids[0]
    assert (row[batch.lengths[0]:] == tok.pad).all() and batch.attention_mask[0, batch.lengths[0]:].sum() == 0
    assert bytes(batch.input_ids[2, 6:24].tolist()) == b"Generate an image."
    edit = prompts.editing_batch(["make it red"], encode, tok, CFG.image_tokens)
    slots = prompts.image_slots(edit.input_ids, tok, CFG.image_tokens)
    assert slots[0, 0] == 1 + len(b"user\n") and np.all(np.diff(slots, axis=1) == 1)
    tail = edit.input_ids[1, slots[1, -1] + 1:edit.lengths[1]].tolist()
    assert bytes(tail[: len(b"\nRepeat this image.")]) == b"\nRepeat this image."
    with pytest.raises(ValueError, match="<image> ids"):
        prompts.image_slots(batch.input_ids, tok, CFG.image_tokens)
    with pytest.raises(ValueError, match="num_image_tokens"):
        prompts.encode_instruction("look <image>", encode, tok)
