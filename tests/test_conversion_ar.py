"""Nexus-Gen AR checkpoint conversion against transformers' Qwen2_5_VLForConditionalGeneration (tiny, random).

The torch original is written in the Nexus-Gen layout (transformers 4.49 names, several safetensors shards + index,
``vision_head.weight``, V2 ``image_prefill_embeds.weight``), imported through the CLI, compared at the output level
(logits of a padded batch with a 520-token prompt, vision_head embeddings, ViT features of a non-square image),
exported back (bit-exact per tensor, dtype kept) and the export is loaded by ``from_pretrained``.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from configs import nexus_gen
from conversion import io
from conversion.cli import main as convert
from conversion.families import nexus_hf_config
from conversion.pipeline import load_arrays, load_model

VERSIONS = ["v2", "v1"]


def torch_nexus(cfg, seed: int = 0):
    """transformers model + torch vision_head (+ V2 prefill table) with non-trivial random weights."""
    hf_cfg = Qwen2_5_VLConfig(**{k: v for k, v in nexus_hf_config(cfg).items() if k != "architectures"})
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    hf = Qwen2_5_VLForConditionalGeneration(hf_cfg).eval().float()
    h = cfg.hidden_size
    head = torch.nn.Linear(h, h, bias=False)
    prefill = torch.nn.Embedding(cfg.num_slots, h) if cfg.uses_prefill_embeds else None
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
        head.weight.normal_(0.0, 0.1)
    return hf, head, prefill


def nexus_state_dict(hf, head, prefill, dtype=torch.float32) -> dict[str, np.ndarray]:
    """The Nexus-Gen file layout: transformers 4.49 key names + Nexus additions."""
    sd = {}
    for k, v in hf.state_dict().items():
        k = k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        sd[k] = v
    sd["vision_head.weight"] = head.weight
    if prefill is not None:
        sd["image_prefill_embeds.weight"] = prefill.weight
    return {k: io.torch_to_numpy(v.detach().to(dtype)) for k, v in sd.items()}


def write_checkpoint(directory, sd: dict[str, np.ndarray], hf_config: dict, shard_bytes: int) -> None:
    directory.mkdir()
    writer = io.SafetensorsWriter(directory, [(k, v.shape, v.dtype) for k, v in sd.items()], shard_bytes)
    for k, v in sd.items():
        writer.write(k, v)
    writer.close()
    (directory / "config.json").write_text(json.dumps(hf_config))


def padded_text_batch(vocab: int, lengths=(520, 37), seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (len(lengths), max(lengths)))
    mask = np.arange(ids.shape[1])[None, :] < np.asarray(lengths)[:, None]
    return np.where(mask, ids, 0).astype(np.int32), mask


@pytest.fixture(scope="module", params=VERSIONS)
def converted(request, tmp_path_factory):
    version = request.param
    cfg = nexus_gen.tiny(version)
    hf, head, prefill = torch_nexus(cfg)
    sd = nexus_state_dict(hf, head, prefill)
    root = tmp_path_factory.mktemp(f"ar_{version}")
    write_checkpoint(root / "torch", sd, hf.config.to_dict(), shard_bytes=200_000)
    assert len(list((root / "torch").glob("*.safetensors"))) >= 3
    preset = f"tiny_{version}"
    assert convert(["import", str(root / "torch"), str(root / "jax"), "--family", "nexus_ar", "--config", preset,
                    "--no-progress"]) == 0
    return cfg, hf, head, prefill, sd, root


def test_imported_ar_matches_torch_logits_and_vision(converted):
    cfg, hf, head, prefill, _, root = converted
    model = load_model(root / "jax")
    ids, mask = padded_text_batch(cfg.vl.text.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1])[None, None], (3, *ids.shape))
    forward = nnx.jit(lambda m, i, p, s, a: m(i, positions=p, slot_index=s, attention_mask=a))
    out = forward(model, jnp.asarray(ids), positions, jnp.full(ids.shape, -1), jnp.asarray(mask))
    with torch.no_grad():
        t_ids = torch.from_numpy(ids).long()
        t_out = hf(input_ids=t_ids, attention_mask=torch.from_numpy(mask).long(), output_hidden_states=True)
        t_embeds = head(t_out.hidden_states[-1])
    logit_err = np.abs(np.asarray(out.logits)[mask] - t_out.logits.numpy()[mask]).max()
    embed_err = np.abs(np.asarray(out.image_embeds)[mask] - t_embeds.numpy()[mask]).max()

    grid = np.array([[1, 8, 12]])  # non-square 112 x 168 image
    px = np.random.default_rng(1).standard_normal((96, cfg.vl.vision.patch_dim)).astype(np.float32)
    feats = np.asarray(model.visual.encode(px, grid))
    with torch.no_grad():
        t_feats = hf.model.visual(torch.from_numpy(px), grid_thw=torch.from_numpy(grid)).pooler_output.numpy()
    vis_err = np.abs(feats - t_feats).max()
    print(f"{cfg.version}: logits max abs err {logit_err:.2e}, vision_head {embed_err:.2e}, ViT {vis_err:.2e}")
    assert logit_err <= 1e-4 and embed_err <= 1e-4 and vis_err <= 1e-4
    assert np.abs(t_out.logits.numpy()).max() > 1.0  # not a vacuous comparison
    if prefill is not None:
        np.testing.assert_array_equal(np.asarray(model.image_prefill_embeds[...]), prefill.weight.detach().numpy())
    else:
        assert model.image_prefill_embeds is None


def test_round_trip_is_bit_exact_and_from_pretrained_loads(converted):
    cfg, hf, _, _, sd, root = converted
    assert convert(["export", str(root / "jax"), str(root / "back"), "--max-shard-size", "150KB",
                    "--no-progress"]) == 0
    index = json.loads((root / "back" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    with io.open_checkpoint(root / "back") as back:
        assert set(back.shapes) == set(sd)
        for k, v in sd.items():
            got = back.read(k)
            assert got.dtype == v.dtype and got.shape == v.shape, k
            assert got.tobytes() == v.tobytes(), k

    loaded, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        root / "back", output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"], info["missing_keys"]
    ids, mask = padded_text_batch(cfg.vl.text.vocab_size, (300, 41), seed=3)
    with torch.no_grad():
        a = loaded.eval().float()(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
        b = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    err = (a.logits - b.logits).abs()[torch.from_numpy(mask)].max().item()
    print(f"{cfg.version}: from_pretrained(exported) logits max abs err {err:.2e}")
    assert err == 0.0


def test_bf16_checkpoint_round_trips_in_bf16(tmp_path):
    cfg = nexus_gen.tiny("v2", slot_grid_thw=(1, 18, 18))  # 81 slots, as --config hf assumes
    hf, head, prefill = torch_nexus(cfg, seed=4)
    sd = nexus_state_dict(hf, head, prefill, dtype=torch.bfloat16)
    assert all(v.dtype == ml_dtypes.bfloat16 for v in sd.values())
    write_checkpoint(tmp_path / "torch", sd, hf.config.to_dict(), shard_bytes=100_000)
    assert convert(["import", str(tmp_path / "torch"), str(tmp_path / "jax"), "--family", "nexus_ar",
                    "--no-progress"]) == 0  # config read from the source's config.json
    doc = json.loads((tmp_path / "jax" / "config.json").read_text())
    assert doc["family"] == "nexus_ar" and doc["scheme"] == "nexus_ar"
    assert convert(["export", str(tmp_path / "jax"), str(tmp_path / "back"), "--no-progress"]) == 0
    with io.open_checkpoint(tmp_path / "back") as back:
        for k, v in sd.items():
            got = back.read(k)
            assert got.dtype == ml_dtypes.bfloat16 and got.tobytes() == v.tobytes(), k


def test_import_sharded_over_mesh(converted, tmp_path):
    cfg, _, _, _, _, root = converted
    from nexus_jax.sharding import TRAIN_RULES, make_mesh

    mesh = make_mesh(2, 2, 2)
    sharded = load_model(root / "jax", mesh=mesh, rules=TRAIN_RULES)
    plain = load_model(root / "jax")
    emb = sharded.language_model.model.embed_tokens.embedding[...]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert not emb.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(emb), np.asarray(plain.language_model.model.embed_tokens.embedding[...]))


def test_plain_qwen2_5_vl_imports_and_round_trips(converted, tmp_path):
    """Without the Nexus-Gen heads the same files are a transformers Qwen2.5-VL checkpoint (family qwen2_5_vl)."""
    cfg, hf, _, _, sd, root = converted
    plain = {k: v for k, v in sd.items() if not k.startswith(("vision_head", "image_prefill_embeds"))}
    write_checkpoint(tmp_path / "torch", plain, hf.config.to_dict(), shard_bytes=300_000)
    assert convert(["detect", str(tmp_path / "torch")]) == 0
    assert convert(["import", str(tmp_path / "torch"), str(tmp_path / "jax"), "--family", "qwen2_5_vl",
                    "--no-progress"]) == 0
    ours = load_arrays(tmp_path / "jax")
    nexus = load_arrays(root / "jax")
    assert set(ours) == set(nexus) - {"vision_head.kernel", "image_prefill_embeds"}
    assert all(np.array_equal(v, nexus[k]) for k, v in ours.items())
    assert convert(["export", str(tmp_path / "jax"), str(tmp_path / "back"), "--no-progress"]) == 0
    with io.open_checkpoint(tmp_path / "back") as back:
        assert set(back.shapes) == set(plain)
        assert all(back.read(k).tobytes() == v.tobytes() for k, v in plain.items())
