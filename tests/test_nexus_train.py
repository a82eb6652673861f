"""Training: trainable-parameter filters, learning end to end on a synthetic set, sharded loss/grads == unsharded."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import nexus_gen
from nexus_jax import sharding
from nexus_jax.models.nexus_ar import NexusGenAR
from nexus_jax.nexus import batch as B
from nexus_jax.nexus import prefill as P
from nexus_jax.nexus import trainable as TR
from nexus_jax.nexus.loss import model_loss
from nexus_jax.nexus.tiny import ByteTokenizer

TOK = ByteTokenizer()
PROMPTS = ["a red square", "two blue circles on grass", "a snowy mountain at noon", "an empty desert road"]


def _synthetic_batch(cfg, seed=0):
    """Generation chats with a fixed random target embedding block per prompt (precomputed ``target_rows``)."""
    batch = B.make_batch(P.generation_samples(PROMPTS), TOK.encode, cfg, training=False)
    arrays, _ = B.device_arrays(batch)
    rows = np.random.default_rng(seed).standard_normal((len(PROMPTS) * cfg.num_slots, cfg.hidden_size))
    arrays["target_rows"] = rows.astype(np.float32)
    return jax.tree.map(jnp.asarray, arrays)


def _train_step(filt):
    @nnx.jit
    def step(model, opt, arrays):
        grad_fn = nnx.value_and_grad(lambda m: model_loss(m, arrays), argnums=nnx.DiffState(0, filt), has_aux=True)
        (loss, metrics), grads = grad_fn(model)
        opt.update(model, grads)
        return loss, metrics

    return step


def test_optimizer_holds_state_only_for_trainable_params():
    cfg = nexus_gen.tiny("v2")
    model = NexusGenAR(cfg, rngs=nnx.Rngs(0))
    counts = TR.parameter_counts(model, cfg.trainable)
    assert counts["vision_tower"] > 0 and counts["vision_merger"] > 0 and counts["prefill_embeds"] == 9 * 48
    assert counts["frozen"] == counts["vision_tower"] + counts["vision_merger"]
    opt = TR.make_optimizer(model, optax.adam(1e-3), cfg.trainable)
    assert TR.optimizer_state_size(opt) == 2 * counts["trainable"] + 1  # mu, nu, step count
    opt_paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(opt.opt_state))}
    assert not any("visual" in p for p in opt_paths) and any("vision_head" in p for p in opt_paths)

    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    _train_step(TR.trainable_filter(cfg.trainable))(model, opt, _synthetic_batch(cfg))
    after = nnx.state(model, nnx.Param)
    np.testing.assert_array_equal(before["visual"]["merger"]["mlp_0"]["kernel"][...],
                                  after["visual"]["merger"]["mlp_0"]["kernel"][...])
    assert not np.array_equal(before["vision_head"]["kernel"][...], after["vision_head"]["kernel"][...])

    only_heads = dataclasses.replace(cfg.trainable, llm=False, lm_head=False)
    assert TR.parameter_counts(model, only_heads)["trainable"] == 48 * 48 + 9 * 48
    with pytest.raises(ValueError, match="belongs to no trainable group"):
        TR.parameter_group(("extra_module", "kernel"))


def test_learning_drives_image_loss_below_ten_percent():
    cfg = nexus_gen.tiny("v2")
    model = NexusGenAR(cfg, rngs=nnx.Rngs(1))
    opt = TR.make_optimizer(model, optax.adam(3e-3), cfg.trainable)
    arrays = _synthetic_batch(cfg, seed=1)
    step = _train_step(TR.trainable_filter(cfg.trainable))
    history = [float(step(model, opt, arrays)[1]["image_loss"]) for _ in range(200)]
    print(f"image loss: start {history[0]:.4f}, step 50 {history[50]:.4f}, end {history[-1]:.4f} "
          f"({history[-1] / history[0]:.1%} of start)")
    assert history[-1] < 0.1 * history[0]
    # The learned embeddings come out of the inference path (one parallel forward) too.
    pred = P.fill_slots(model, P.slot_batch(P.generation_samples(PROMPTS), TOK.encode, cfg))
    target = np.asarray(arrays["target_rows"]).reshape(pred.shape)
    cos = np.sum(pred * target, -1) / (np.linalg.norm(pred, axis=-1) * np.linalg.norm(target, axis=-1))
    assert cos.mean() > 0.9, cos.mean()


def test_sharded_loss_and_grads_equal_unsharded():
    cfg = nexus_gen.tiny("v2")
    img = np.random.default_rng(2).integers(0, 256, (70, 110, 3), dtype=np.uint8)
    samples = P.editing_samples(["add a moon", "make it blue"], [img, img[:, ::-1]])
    samples += P.generation_samples(["a big tree", "stars"])
    batch = B.make_batch(samples, TOK.encode, cfg, training=False)  # input images through the ViT
    arrays, static = B.device_arrays(batch)
    rows = np.random.default_rng(3).standard_normal((4 * cfg.num_slots, cfg.hidden_size)).astype(np.float32)
    arrays = jax.tree.map(jnp.asarray, {**arrays, "target_rows": rows})  # targets precomputed (ViT run above)
    filt = TR.trainable_filter(cfg.trainable)
    grad_fn = nnx.jit(nnx.value_and_grad(lambda m, a: model_loss(m, a, **static)[0], argnums=nnx.DiffState(0, filt)))

    ref = NexusGenAR(cfg, rngs=nnx.Rngs(4))
    want_loss, want_grads = grad_fn(ref, arrays)
    mesh = sharding.make_mesh(2, 2, 2)
    model = sharding.create_sharded(lambda: NexusGenAR(cfg, rngs=nnx.Rngs(4)), mesh, sharding.TRAIN_RULES)
    up = model.language_model.model.layers[0].mlp.up_proj.kernel[...]
    assert up.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor"), up.sharding.spec
    with sharding.sharding_context(mesh, sharding.TRAIN_RULES):
        batch_major = {"input_ids", "labels", "attention_mask", "slot_index", "input_mask"}
        data = {k: jax.device_put(v, sharding.data_sharding(mesh, 2)) if k in batch_major else v
                for k, v in arrays.items()}
        assert len(data["input_ids"].sharding.device_set) == 8
        loss, grads = grad_fn(model, data)
    err = abs(float(loss) - float(want_loss))
    assert len(jax.tree.leaves(grads)) == len(jax.tree.leaves(want_grads)) > 10
    gerr = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)))
    print(f"sharded loss err {err:.2e}, max grad err {gerr:.2e}")
    assert err <= 1e-5 and gerr <= 1e-5
