"""One-command release import (``nexus-jax convert nexus-gen`` / ``unipic``): tiny random CLIP / T5 / tokenizers
saved with ``save_pretrained`` in FLUX.1-dev's folder layout, the empty prompt against diffusers'
``FluxPipeline.encode_prompt``, the tokenizer pointer (new name, old pointers, a real HF ``tokenizer.json``)."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import torch

from conversion.cli import main as convert
from conversion.text_encoders import encode_empty_prompt

WORDS = ["a", "red", "fox", "in", "the", "snow", "make", "it", "night", "what", "is", "picture", "?", "."]
PIECES = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "▁abcdefghijklmnopqrstuvwxyz"]


def tiny_qwen_tokenizer(directory) -> None:
    """A WordLevel tokenizer (ids < 64, so the tiny AR vocab covers them) saved with ``save_pretrained``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(directory))


def tiny_flux_text_encoders(flux, pooled_dim: int, context_dim: int, seed: int = 0) -> None:
    """FLUX.1-dev's text_encoder/ (CLIP), tokenizer/ (CLIP BPE), text_encoder_2/ (T5), tokenizer_2/ (T5 unigram)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)} | {c + "</w>": 26 + i for i, c in enumerate(letters)}
    vocab |= {"<|startoftext|>": 52, "<|endoftext|>": 53}
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77).save_pretrained(str(flux / "tokenizer"))
    T5Tokenizer(vocab=PIECES, extra_ids=0).save_pretrained(str(flux / "tokenizer_2"))
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=pooled_dim, intermediate_size=2 * pooled_dim, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=52, eos_token_id=53, pad_token_id=53))
    clip.save_pretrained(str(flux / "text_encoder"))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(PIECES), d_model=context_dim, d_kv=8, d_ff=2 * context_dim, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, relative_attention_max_distance=16))
    t5.save_pretrained(str(flux / "text_encoder_2"))


def reference_empty_prompt(flux, max_sequence_length: int = 512) -> dict[str, np.ndarray]:
    """diffusers' FluxPipeline.encode_prompt("") with the saved encoders (fp32)."""
    from diffusers import FluxPipeline
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    pipe = FluxPipeline(
        scheduler=None, vae=None, transformer=None,
        text_encoder=CLIPTextModel.from_pretrained(str(flux / "text_encoder")),
        tokenizer=AutoTokenizer.from_pretrained(str(flux / "tokenizer")),
        text_encoder_2=T5EncoderModel.from_pretrained(str(flux / "text_encoder_2")),
        tokenizer_2=AutoTokenizer.from_pretrained(str(flux / "tokenizer_2")),
    )
    with torch.no_grad():
        t5, pooled, _ = pipe.encode_prompt("", prompt_2=None, max_sequence_length=max_sequence_length)
    return {"pooled": pooled[0].float().numpy(), "t5": t5[0].float().numpy()}


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    flux = tmp_path_factory.mktemp("flux") / "FLUX.1-dev"
    tiny_flux_text_encoders(flux, pooled_dim=24, context_dim=32)  # = FluxDiTConfig.tiny()
    return flux


def test_empty_prompt_equals_flux_pipeline_encode_prompt(flux_dir):
    got = encode_empty_prompt(flux_dir)
    want = reference_empty_prompt(flux_dir)
    assert got["pooled"].shape == (24,) and got["t5"].shape == (512, 32)
    assert got["pooled"].dtype == np.float32 and got["t5"].dtype == np.float32
    for k in ("pooled", "t5"):
        err = float(np.abs(got[k] - want[k]).max())
        print(f"empty prompt {k}: max abs error {err:.2e}")
        assert err <= 1e-5, k
    assert float(np.abs(got["t5"]).max()) > 1e-3  # not all zeros
    short = encode_empty_prompt(flux_dir, max_sequence_length=16, dtype="bfloat16")  # bf16 compute, f32 stored
    assert short["t5"].shape == (16, 32) and short["t5"].dtype == np.float32
    assert float(np.abs(short["pooled"] - got["pooled"]).max()) < 0.1
    assert not np.array_equal(short["pooled"], got["pooled"])


def test_flux_dir_missing_folders_are_named(tmp_path):
    from conversion.errors import ConversionError

    (tmp_path / "text_encoder").mkdir()
    with pytest.raises(ConversionError, match=r"tokenizer.*text_encoder_2.*tokenizer_2"):
        encode_empty_prompt(tmp_path)


# ---------------------------------------------------------------------------------------------- tokenizer pointer
def test_tokenizer_pointer_new_name_old_pointer_and_real_hf_file(tmp_path):
    from nexus_jax.inference.loading import TOKENIZER, load_codec
    from nexus_jax.nexus.tiny import TINY_TOKENS

    hf = tmp_path / "hf_root"
    tiny_qwen_tokenizer(hf)  # a real HF tokenizer.json at the top level, no pointer: used as the tokenizer
    assert TOKENIZER != "tokenizer.json" and json.loads((hf / "tokenizer.json").read_text()).get("model")
    want = [WORDS.index(w) + 1 for w in ("a", "red", "fox")]
    assert list(load_codec(hf, TINY_TOKENS).encode("a red fox")) == want
    old = tmp_path / "old"
    old.mkdir()
    shutil.copytree(hf, old / "tok")
    (old / "tokenizer.json").write_text(json.dumps({"type": "hf", "path": "tok"}))  # an old-style pointer
    assert list(load_codec(old, TINY_TOKENS).encode("a red fox")) == want
    (old / TOKENIZER).write_text(json.dumps({"type": "bytes"}))  # the new name wins
    assert list(load_codec(old, TINY_TOKENS).encode("ab")) == [97, 98]
    assert list(load_codec(tmp_path, TINY_TOKENS).encode("ab")) == [97, 98]  # nothing: bytes


def test_release_without_flux_fails_naming_what_is_missing(tmp_path, capsys):
    src = tmp_path / "Nexus-GenV2"
    src.mkdir()
    (src / "generation_decoder.bin").write_bytes(b"")
    assert convert(["nexus-gen", str(src), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "--flux" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


# ------------------------------------------------------------------------------------------ whole-release imports
def _same_params(a, b) -> None:
    from conversion import orbax as orbax_io

    ma, mb = orbax_io.metadata(a / "params"), orbax_io.metadata(b / "params")
    assert sorted(ma) == sorted(mb)
    la, lb = orbax_io.load(a / "params", list(ma)), orbax_io.load(b / "params", list(mb))
    for k in ma:
        assert np.asarray(la[k]).tobytes() == np.asarray(lb[k]).tobytes(), k


@pytest.mark.slow
def test_nexus_gen_release_imports_in_one_command_and_runs(tmp_path, flux_dir):
    from nexus_jax import default_checkpoint
    from nexus_jax.inference import cli as infer_cli
    from nexus_jax.inference import loading

    dc = tmp_path / "dc"
    default_checkpoint.build(dc)
    # the released layout: AR files at the top with the HF tokenizer files, decoders beside, no VAE / empty prompt
    src = tmp_path / "Nexus-GenV2"
    shutil.copytree(dc / "ar", src)
    for f in ("generation_decoder.bin", "edit_decoder.bin", "generation_decoder_config.json",
              "edit_decoder_config.json"):
        shutil.copyfile(dc / f, src / f)
    tiny_qwen_tokenizer(src)
    flux = tmp_path / "FLUX.1-dev"
    shutil.copytree(flux_dir, flux)
    shutil.copyfile(dc / "ae.safetensors", flux / "ae.safetensors")
    shutil.copyfile(dc / "ae_config.json", flux / "ae_config.json")

    out = tmp_path / "ckpt"
    t = time.perf_counter()
    assert convert(["nexus-gen", str(src), "--flux", str(flux), str(out), "--no-progress"]) == 0
    print(f"release import: {time.perf_counter() - t:.1f}s")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["ar", "generation_decoder", "edit_decoder", "vae", "empty_prompt.safetensors", "tokenizer",
         loading.TOKENIZER, "release.json"])
    # each model equals its own `convert import`
    for name, source, family, config in (
        ("ar", dc / "ar", "nexus_ar", dc / "ar" / "nexus_gen_config.json"),
        ("generation_decoder", dc / "generation_decoder.bin", "generation_decoder",
         dc / "generation_decoder_config.json"),
        ("edit_decoder", dc / "edit_decoder.bin", "editing_decoder", dc / "edit_decoder_config.json"),
        ("vae", dc / "ae.safetensors", "vae", dc / "ae_config.json"),
    ):
        assert convert(["import", str(source), str(tmp_path / "single" / name), "--family", family, "--config",
                        str(config), "--no-progress"]) == 0
        _same_params(out / name, tmp_path / "single" / name)
    ck = loading.load(out)
    want = reference_empty_prompt(flux)
    assert ck.empty.pooled.shape == (1, 24) and ck.empty.t5.shape == (1, 512, 32)
    assert float(np.abs(ck.empty.pooled[0] - want["pooled"]).max()) <= 1e-5
    assert float(np.abs(ck.empty.t5[0] - want["t5"]).max()) <= 1e-5
    assert list(ck.codec.encode("a red fox")) == [1, 2, 3]
    assert ck.generation is not None and ck.editing is not None and ck.vae is not None
    # and the imported directory runs: one generation, one understanding request
    req = tmp_path / "requests.jsonl"
    req.write_text("\n".join(json.dumps(r) for r in (
        {"id": "fox", "task": "generation", "seed": 1, "messages": [{"role": "user", "content": "a red fox"}]},
        {"id": "what", "task": "understanding", "messages": [{"role": "user", "content": "what is it ?"}]},
    )) + "\n")
    assert infer_cli.main(["--checkpoint", str(out), "--input", str(req), "--output", str(tmp_path / "run"),
                           "--max-new-tokens", "4", "--no-progress"]) == 0
    results = [json.loads(x) for x in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in results] == ["ok", "ok"], results
    assert (tmp_path / "run" / "images" / "fox.png").is_file()


@pytest.mark.slow
def test_unipic_release_imports_in_one_command(tmp_path):
    from flax import nnx
    from transformers import AutoTokenizer

    from configs import unipic
    from configs.vae import FluxVAEConfig
    from conversion import config_io
    from conversion.tables.kl16_vae import kl16_mapping
    from nexus_jax.default_checkpoint import _torch_arrays, randomize_params
    from nexus_jax.models.vae import FluxVAE
    from nexus_jax.unipic import loading as unipic_loading
    from tests.test_unipic_conversion import published_state_dict, siglip_junk

    cfg, vcfg = unipic.tiny(), FluxVAEConfig.kl16_tiny()
    src = tmp_path / "Skywork-UniPic-1.5B"
    src.mkdir()
    torch.save({**published_state_dict(cfg), **siglip_junk()}, str(src / "pytorch_model.bin"))
    vae = randomize_params(nnx.eval_shape(lambda: FluxVAE(vcfg, rngs=nnx.Rngs(0))), 5)
    vsd = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in _torch_arrays(vae, kl16_mapping(vcfg)).items()}
    torch.save({"model": vsd}, str(src / "kl16.ckpt"))
    (src / "unipic_config.json").write_text(json.dumps(config_io.to_dict(cfg)))
    (src / "kl16_config.json").write_text(json.dumps(config_io.to_dict(vcfg)))
    tiny_qwen_tokenizer(src / "Qwen2.5-1.5B-Instruct")

    out = tmp_path / "ckpt"
    assert convert(["unipic", str(src), str(out), "--no-progress"]) == 0
    single = tmp_path / "single"
    assert convert(["import", str(src / "pytorch_model.bin"), str(single), "--family", "unipic", "--config",
                    "tiny", "--no-progress"]) == 0
    assert convert(["import", str(src / "kl16.ckpt"), str(single / "vae"), "--family", "kl16_vae", "--config",
                    "tiny", "--no-progress"]) == 0
    _same_params(out, single)
    _same_params(out / "vae", single / "vae")
    ck = unipic_loading.load(out)
    assert ck.vae.config == vcfg
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert "<image>" in tok.get_vocab()
    assert list(ck.codec.encode("a red fox")) == [1, 2, 3]
