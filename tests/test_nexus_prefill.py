"""Slot filling: one parallel forward == N sequential single-slot KV-cache steps; batching, editing, sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import nexus_gen
from nexus_jax import sharding
from nexus_jax.models.nexus_ar import NexusGenAR
from nexus_jax.models.qwen2 import init_cache_for
from nexus_jax.nexus import batch as B
from nexus_jax.nexus import prefill as P
from nexus_jax.nexus import templates as T
from nexus_jax.nexus.tiny import ByteTokenizer

TOK = ByteTokenizer()
LONG = ("an old lighthouse on a rocky coast under heavy storm clouds, waves crashing, " * 7).strip()


def _model(cfg, seed=0):
    model = NexusGenAR(cfg, rngs=nnx.Rngs(seed))
    # Larger-than-default weights so every layer visibly matters in the comparison.
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(state))))
    nnx.update(model, jax.tree.map(lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape, p.dtype), state))
    return model


def _requests():
    img = np.random.default_rng(0).integers(0, 256, (90, 150, 3), dtype=np.uint8)
    return P.generation_samples([LONG, "a cat"]) + P.editing_samples(["make it night"], [img])


@pytest.mark.parametrize("version,grid", [("v2", (1, 18, 18)), ("v1", (1, 6, 6))])
def test_parallel_fill_equals_sequential_kv_cache_steps(version, grid):
    cfg = nexus_gen.tiny(version, slot_grid_thw=grid)  # N = 81 / 9 slots
    model = _model(cfg)
    batch = P.slot_batch(_requests(), TOK.encode, cfg)
    assert batch.shape[1] > 500 and (~batch.attention_mask).any()
    par = P.fill_slots(model, batch)
    seq = P.fill_slots_sequential(model, batch)
    filler = P.SlotFiller(model, batch)
    cached_par = filler.parallel(filler.prompt_cache())  # one N-token forward on top of the prompt's KV cache
    assert par.shape == (3, cfg.num_slots, cfg.hidden_size)
    assert float(jnp.abs(cached_par - seq).max()) <= 1e-4
    err = float(jnp.abs(par - seq).max())
    print(f"{version}: parallel vs sequential max abs err {err:.2e} (scale {float(jnp.abs(seq).max()):.2f})")
    assert err <= 1e-4
    # Rows must differ (prompt-dependent) and slots must differ (position / prefill dependent).
    assert float(jnp.abs(par[0] - par[1]).max()) > 1e-2 and float(jnp.abs(par[0, 0] - par[0, 1]).max()) > 1e-3


def test_fill_matches_unpadded_single_requests_and_teacher_forced_forward():
    cfg = nexus_gen.tiny("v2")
    model = _model(cfg)
    reqs = _requests()
    batched = P.fill_slots(model, P.slot_batch(reqs, TOK.encode, cfg))
    alone = P.fill_slots(model, P.slot_batch(reqs[1:], TOK.encode, cfg))  # less padding, other batch shape
    assert float(jnp.abs(alone - batched[1:]).max()) <= 1e-5
    # The teacher-forced (training) forward over the full answer gives the same embeddings at shifted slots.
    full = B.make_batch(reqs[:1], TOK.encode, cfg, training=False)
    forward = nnx.jit(lambda m, ids, pos, slots, mask: m(ids, positions=pos, slot_index=slots, attention_mask=mask))
    out = forward(model, *(jnp.asarray(x) for x in (full.input_ids, full.positions, full.slot_index,
                                                     full.attention_mask)))
    sel = full.labels[0, 1:] == cfg.tokens.image_pad
    np.testing.assert_allclose(np.asarray(out.image_embeds[0, :-1][sel]), np.asarray(batched[0]), atol=1e-5)


def test_fill_from_a_decode_loop_cache_at_vision_start():
    """A decoding loop that stops when the model emits <|vision_start|> hands over its cache and next positions."""
    cfg = nexus_gen.tiny("v2")
    model = _model(cfg)
    batch = P.slot_batch(_requests(), TOK.encode, cfg)
    filler = P.SlotFiller(model, batch)
    prompt_pos = np.where(batch.attention_mask[:, : filler.start], batch.positions[0, :, : filler.start], -1)
    next_position = prompt_pos.max(axis=1) + 1
    ids, pos, _ = P.slot_phase_inputs(cfg, next_position)
    np.testing.assert_array_equal(pos, batch.positions[:, :, filler.start : -1])  # same ids as get_rope_index
    np.testing.assert_array_equal(ids, batch.input_ids[:, filler.start : -1])
    got = P.fill_slots_from_cache(model, filler.prompt_cache(), next_position)
    assert float(jnp.abs(got - P.fill_slots(model, batch)).max()) <= 1e-5
    full = init_cache_for(cfg.vl.text, 3, filler.start + 2)
    with pytest.raises(ValueError, match="has 2 free slots; the image needs 9"):
        P.fill_slots_from_cache(model, dataclasses.replace(full, index=jnp.asarray(filler.start)), next_position)


def test_editing_prompt_carries_324_reference_tokens_at_full_size():
    cfg = nexus_gen.nexus_gen_v2()
    src = np.random.default_rng(1).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    batch = P.slot_batch(P.editing_samples(["remove the tree"], [src]), TOK.encode, cfg)
    assert batch.inputs.grid_thw.tolist() == [[1, 36, 36]] and int(batch.input_mask.sum()) == 324
    assert (batch.slot_index[0, -81:] == np.arange(81)).all() and batch.grid_thw.tolist() == [[1, 36, 36], [1, 18, 18]]
    # Output slots: 9x9 merged grid on the h / w streams, one shared t index; next text would start at +9.
    pos = batch.positions[:, 0, -81:]
    assert (pos[0] == pos[0, 0]).all() and (pos[1] - pos[1, 0]).tolist() == np.repeat(np.arange(9), 9).tolist()


def test_bad_requests_raise():
    cfg = nexus_gen.tiny("v2")
    with pytest.raises(ValueError, match=r"needs \d+ positions including its 9 image slots.*max_length=300"):
        P.slot_batch(P.generation_samples([LONG]), TOK.encode, cfg.replace(max_length=300))
    with pytest.raises(ValueError, match="no assistant <image> tag"):
        P.slot_batch([B.Sample(T.understanding_messages(), input_images=[np.zeros((56, 56, 3), np.uint8)])],
                     TOK.encode, cfg)
    with pytest.raises(ValueError, match="2 edit instructions but 1 source images"):
        P.editing_samples(["a", "b"], [np.zeros((56, 56, 3), np.uint8)])
    with pytest.raises(ValueError, match="must end with its 9 image slots"):
        P.fill_slots(_model(cfg), B.make_batch(P.generation_samples(["x"]), TOK.encode, cfg, training=False))


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), pytest.param((1, 2, 4), marks=pytest.mark.slow)])
def test_sharded_fill_equals_unsharded(mesh_shape):
    cfg = nexus_gen.tiny("v2")
    ref_model = NexusGenAR(cfg, rngs=nnx.Rngs(3))
    reqs = P.generation_samples([LONG, "a dog", "two birds", "rain"])
    batch = P.slot_batch(reqs, TOK.encode, cfg)
    want = P.fill_slots(ref_model, batch)
    mesh = sharding.make_mesh(*mesh_shape)
    rules = sharding.INFERENCE_RULES
    model = sharding.create_sharded(lambda: NexusGenAR(cfg, rngs=nnx.Rngs(3)), mesh, rules)
    head = model.vision_head.kernel[...].sharding.spec
    assert "tensor" in str(head), head
    q = model.language_model.model.layers[0].self_attn.q_proj.kernel[...]
    assert len(q.sharding.device_set) == 8 and not q.sharding.is_fully_replicated
    with sharding.sharding_context(mesh, rules):
        got = P.fill_slots(model, batch)
    err = float(jnp.abs(got - want).max())
    print(f"mesh {mesh_shape}: sharded vs unsharded max abs err {err:.2e}")
    assert err <= 1e-5
