"""NexusGenAR vs a PyTorch implementation of the Nexus-Gen objective on the transformers tiny Qwen2.5-VL (fp32).

The torch side is written here from the specification (nexus-gen.md 1.7): transformers' own embedding, ViT,
``get_rope_index`` and language model, plus a torch ``vision_head`` and ``image_prefill_embeds`` with the same weights.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from configs import nexus_gen
from conversion import load
from nexus_jax.models.nexus_ar import NexusGenAR
from nexus_jax.nexus import batch as B
from nexus_jax.nexus import templates as T
from nexus_jax.nexus.loss import model_loss
from nexus_jax.nexus.tiny import ByteTokenizer
from tests.helpers.qwen2_5_vl_reference import build_hf_vl, zeros_like_module
from tests.helpers.qwen2_reference import hf_state_dict_numpy

TOK = ByteTokenizer()
LONG = ("a tiny red fox sleeping under a crooked apple tree at dusk, " * 10).strip()  # ~590 bytes -> tokens


def build_pair(cfg, seed=0, std=0.08):
    """(torch model, torch vision_head, torch prefill or None, JAX NexusGenAR) with identical weights."""
    hf = build_hf_vl(cfg.vl, seed=seed, std=std, attn_implementation="eager")
    h = cfg.hidden_size
    torch.manual_seed(seed)
    head = torch.nn.Linear(h, h, bias=False)
    prefill = torch.nn.Parameter(torch.randn(cfg.num_slots, h)) if cfg.uses_prefill_embeds else None
    with torch.no_grad():
        head.weight.normal_(0.0, std)
    model = zeros_like_module(lambda: NexusGenAR(cfg, rngs=nnx.Rngs(seed)))
    sd = {**hf_state_dict_numpy(hf), "vision_head.weight": head.weight.detach().numpy()}
    if prefill is not None:
        sd["image_prefill_embeds.weight"] = prefill.detach().numpy()
    load.nexus_ar(model, sd)
    return hf, head, prefill, model


def image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def training_samples():
    """Generation (long prompt), editing (non-square source) and understanding (no output image)."""
    return [
        B.Sample(T.generation_messages(LONG), target_images=[image(100, 70, 1)]),
        B.Sample(T.editing_messages("make the sky purple", "en"), input_images=[image(90, 130, 2)],
                 target_images=[image(64, 96, 3)]),
        B.Sample(T.understanding_messages() + [T.Message("assistant", "A noisy picture.")],
                 input_images=[image(120, 60, 4)]),
    ]


def torch_objective(hf, head, prefill, batch, cfg):
    """Spec 1.7: embed, ViT features into input slots, prefill (V2) into output slots, HF get_rope_index positions,
    LLM, lm_head / vision_head, CE on shifted labels (image labels ignored) + 0.5 MSE + 0.5 (1 - cos)."""
    img = cfg.tokens.image_pad
    ids = torch.from_numpy(batch.input_ids).long()
    labels = torch.from_numpy(batch.labels).long()
    mask = torch.from_numpy(batch.attention_mask).long()
    lm = hf.model.language_model
    emb = lm.embed_tokens(ids)
    out_slots = labels == img
    in_slots = (ids == img) & ~out_slots
    if batch.inputs is not None:
        px = torch.from_numpy(batch.inputs.pixels[: batch.inputs.layout.num_patches])
        feats = hf.model.visual(px, grid_thw=torch.from_numpy(batch.inputs.grid_thw)).pooler_output
        emb = emb.masked_scatter(in_slots[..., None].expand_as(emb), feats)
    if prefill is not None:
        reps = int(out_slots.sum()) // cfg.num_slots
        emb = emb.masked_scatter(out_slots[..., None].expand_as(emb), prefill.repeat(reps, 1))
    with torch.no_grad():
        px = torch.from_numpy(batch.targets.pixels[: batch.targets.layout.num_patches])
        targets = hf.model.visual(px, grid_thw=torch.from_numpy(batch.targets.grid_thw)).pooler_output
    pos, _ = hf.model.get_rope_index(ids, mm_token_type_ids=(ids == img).int(),
                                     image_grid_thw=torch.from_numpy(batch.grid_thw), attention_mask=mask)
    hidden = lm(inputs_embeds=emb, position_ids=pos, attention_mask=mask).last_hidden_state
    logits, embeds = hf.lm_head(hidden).float(), head(hidden)
    ce_labels = labels.masked_fill(out_slots, -100)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ce_labels[:, 1:].reshape(-1))
    pred = embeds[:, :-1][labels[:, 1:] == img]
    img_loss = 0.5 * F.mse_loss(pred, targets) + 0.5 * (1 - F.cosine_similarity(pred, targets, dim=-1)).mean()
    return cfg.token_loss_weight * ce + cfg.image_loss_weight * img_loss, pos


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_loss_and_grads_match_torch(version):
    cfg = nexus_gen.tiny(version)
    hf, head, prefill, model = build_pair(cfg)
    batch = B.make_batch(training_samples(), TOK.encode, cfg)
    assert batch.shape[1] > 500 and (~batch.attention_mask).any()
    want, hf_pos = torch_objective(hf, head, prefill, batch, cfg)
    want.backward()
    np.testing.assert_array_equal(batch.positions, hf_pos.numpy())

    arrays, static = B.device_arrays(batch)
    grad_fn = nnx.jit(nnx.value_and_grad(lambda m, a: model_loss(m, a, **static), has_aux=True))
    (loss, metrics), grads = grad_fn(model, jax.tree.map(jnp.asarray, arrays))
    err = abs(float(loss) - want.item())
    print(f"{version}: loss {float(loss):.6f} torch {want.item():.6f} abs err {err:.2e}; metrics "
          f"{ {k: float(v) for k, v in metrics.items()} }")
    assert err <= 1e-5
    assert int(metrics["num_slots"]) == 2 * cfg.num_slots and float(metrics["image_loss"]) > 0

    checks = {
        "vision_head": (grads.vision_head.kernel[...], head.weight.grad.T),
        "layers.1.q_proj": (grads.language_model.model.layers[1].self_attn.q_proj.kernel[...],
                            hf.model.language_model.layers[1].self_attn.q_proj.weight.grad.T),
        "layers.1.down_proj": (grads.language_model.model.layers[1].mlp.down_proj.kernel[...],
                               hf.model.language_model.layers[1].mlp.down_proj.weight.grad.T),
        "embed_tokens": (grads.language_model.model.embed_tokens.embedding[...],
                         hf.model.language_model.embed_tokens.weight.grad),
    }
    if prefill is not None:
        checks["image_prefill_embeds"] = (grads.image_prefill_embeds[...], prefill.grad)
    for name, (g, tg) in checks.items():
        gerr = float(np.abs(np.asarray(g) - tg.numpy()).max())
        print(f"  grad {name}: max abs err {gerr:.2e} (scale {float(tg.abs().max()):.2e})")
        assert gerr <= 1e-4, name
        assert float(tg.abs().max()) > 1e-4, f"{name} gradient is ~0: the check would be vacuous"


def test_missing_target_image_and_overlong_prompt_raise():
    cfg = nexus_gen.tiny("v2")
    sample = B.Sample(T.generation_messages("a cat"))
    with pytest.raises(ValueError, match="1 output <image> tags but 0 target images"):
        B.make_batch([sample], TOK.encode, cfg)
    short = cfg.replace(max_length=200)
    with pytest.raises(ValueError, match=r"needs \d+ positions including its 9 image slots.*max_length=200"):
        B.make_batch([B.Sample(T.generation_messages(LONG))], TOK.encode, short, training=False,
                     stop_after_slots=True)
    model = NexusGenAR(cfg, rngs=nnx.Rngs(0))
    batch = B.make_batch([sample], TOK.encode, cfg, training=False)
    arrays, static = B.device_arrays(batch)
    with pytest.raises(ValueError, match="9 output-image slots but no target image"):
        model_loss(model, arrays, **static)
