"""The embedded default checkpoint: a small Nexus-Gen-shaped model with random weights in the UPSTREAM PyTorch
layout (real weights cannot be downloaded here). Deterministic for a given seed.

Directory written by :func:`build` (names as in ``DiffSynth-Studio/Nexus-GenV2`` + FLUX.1-dev)::

    ar/model-0000k-of-0000n.safetensors     AR model, transformers 4.49 Qwen2.5-VL names + vision_head
    ar/model.safetensors.index.json         (+ image_prefill_embeds.weight, V2)
    ar/config.json                          transformers Qwen2.5-VL config (flat 4.49 style)
    ar/nexus_gen_config.json                the exact NexusGenConfig (slot grid, context length...)
    generation_decoder.bin                  torch pickle: adapter.{0,1,3,4}.* + pipe.dit.<DiffSynth FluxDiT keys>
    edit_decoder.bin                        torch pickle: embedding_merger.* + pipe.dit.<DiffSynth FluxDiT keys>
    ae.safetensors                          FLUX VAE, BFL names (encoder.down.*, decoder.up.*)
    empty_prompt.safetensors                precomputed CLIP("") pooled [pooled_dim] and T5("") [Lt, context_dim]
    *_config.json                           configs of the decoders (DiT, adapter / merger, sampler) and the VAE
    nexus_jax_tokenizer.json                {"type": "bytes"}: the tiny model uses the byte tokenizer

The torch names come from the converter's own mapping tables run in the export direction (``conversion.engine``),
plus the adapter / merger keys of the V2 ``.bin`` files (nexus-gen.md 5.3), written here by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_SEED = 1234
EMPTY_PROMPT_LENGTH = 16  # T5("") is padded to 512 tokens upstream; the tiny stand-in keeps 16


def default_configs() -> dict[str, Any]:
    """The tiny V2 AR config and the decoder configs of the default checkpoint."""
    from configs import nexus_gen
    from configs.nexus_decoders import NexusDecoderConfig
    from configs.vae import FluxVAEConfig

    ar = nexus_gen.tiny("v2")
    gen = NexusDecoderConfig.tiny(cfg_scale=3.0, num_steps=4, height=32, width=48)
    edit = NexusDecoderConfig.tiny(cfg_scale=1.0, num_steps=4, height=32, width=48)
    return {"ar": ar, "generation": gen, "editing": edit, "vae": FluxVAEConfig.tiny()}


def _torch_arrays(module: Any, mapping: Any) -> dict[str, np.ndarray]:
    """JAX module parameters -> upstream torch names/layouts via a converter mapping table (export direction)."""
    from conversion import engine
    from conversion.state import module_arrays

    arrays = module_arrays(module)
    steps = engine.plan(mapping, {k: v.shape for k, v in arrays.items()}, None, "to_torch",
                        source_name="the default model")
    return dict(engine.execute(steps, arrays.__getitem__))


def randomize_params(module: Any, seed: int, scale: float = 0.05) -> Any:
    """Give every parameter random values (norm scales around 1), so no weight is at its zero / one init. Works on
    an abstract (``nnx.eval_shape``) module too. Returns the module."""
    import jax.numpy as jnp

    from conversion.state import flat_variables

    rng = np.random.default_rng(seed)
    for name, var in sorted(flat_variables(module).items()):
        shape, dtype = var.get_value().shape, var.get_value().dtype
        if name.endswith(("scale", "norm.weight")) or "layernorm" in name or name.endswith("norm_q_a.weight"):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            value = scale * rng.standard_normal(shape)
        var.set_value(jnp.asarray(value, dtype))
    return module


def _linear(rng: np.random.Generator, out_dim: int, in_dim: int, prefix: str, bias: bool = True) -> dict:
    d = {f"{prefix}.weight": 0.05 * rng.standard_normal((out_dim, in_dim))}
    if bias:
        d[f"{prefix}.bias"] = 0.05 * rng.standard_normal(out_dim)
    return d


def _norm(rng: np.random.Generator, dim: int, prefix: str, bias: bool) -> dict:
    d = {f"{prefix}.weight": 1.0 + 0.1 * rng.standard_normal(dim)}
    if bias:
        d[f"{prefix}.bias"] = 0.05 * rng.standard_normal(dim)
    return d


def adapter_state(cfg: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """V2 generation adapter keys: Linear(0) -> LayerNorm(1) -> ReLU -> Linear(3) -> LayerNorm(4)."""
    a = cfg.adapter
    d = _linear(rng, a.out_dim, a.in_dim, "adapter.0")
    d |= _norm(rng, a.out_dim, "adapter.1", bias=True)
    d |= _linear(rng, a.out_dim, a.out_dim, "adapter.3")
    d |= _norm(rng, a.out_dim, "adapter.4", bias=True)
    return d


def merger_state(cfg: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """V2 editing merger keys: Qwen2.5 decoder layer(s) + RMSNorm-MLP projector (0, 1, 2, [3 = SiLU], 4, 5)."""
    m = cfg.merger
    t = m.layer
    h, q, kv = t.hidden_size, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    d: dict[str, np.ndarray] = {}
    for i in range(m.num_layers):
        p = f"embedding_merger.layers.{i}"
        d |= _linear(rng, q, h, f"{p}.self_attn.q_proj")
        d |= _linear(rng, kv, h, f"{p}.self_attn.k_proj")
        d |= _linear(rng, kv, h, f"{p}.self_attn.v_proj")
        d |= _linear(rng, h, q, f"{p}.self_attn.o_proj", bias=False)
        d |= _linear(rng, t.intermediate_size, h, f"{p}.mlp.gate_proj", bias=False)
        d |= _linear(rng, t.intermediate_size, h, f"{p}.mlp.up_proj", bias=False)
        d |= _linear(rng, h, t.intermediate_size, f"{p}.mlp.down_proj", bias=False)
        d |= _norm(rng, h, f"{p}.input_layernorm", bias=False)
        d |= _norm(rng, h, f"{p}.post_attention_layernorm", bias=False)
    pr = "embedding_merger.projector"
    d |= _norm(rng, h, f"{pr}.0", bias=False)
    d |= _linear(rng, m.projector_dim, h, f"{pr}.1")
    d |= _norm(rng, m.projector_dim, f"{pr}.2", bias=False)
    d |= _linear(rng, m.out_dim, m.projector_dim, f"{pr}.4")
    d |= _norm(rng, m.out_dim, f"{pr}.5", bias=False)
    return d


def _dit_state(cfg: Any, seed: int, own_init: bool = False) -> dict[str, np.ndarray]:
    from flax import nnx

    from conversion.tables.flux_dit import diffsynth_mapping
    from nexus_jax.models.flux import FluxDiT

    if own_init:
        dit = FluxDiT(cfg.dit, rngs=nnx.Rngs(seed))
    else:
        dit = randomize_params(nnx.eval_shape(lambda: FluxDiT(cfg.dit, rngs=nnx.Rngs(0))), seed)
    return {f"pipe.dit.{k}": v for k, v in _torch_arrays(dit, diffsynth_mapping(cfg.dit)).items()}


def _save_bin(path: Path, state: dict[str, np.ndarray]) -> None:
    import collections

    import torch

    sd = collections.OrderedDict((k, torch.from_numpy(np.array(v, np.float32, copy=True))) for k, v in state.items())
    torch.save(sd, path)


def _hf_ar_config(cfg: Any) -> dict:
    """Flat transformers-4.49-style Qwen2.5-VL config.json (what the Nexus-Gen repo ships)."""
    t, v, tok = cfg.vl.text, cfg.vl.vision, cfg.vl.tokens
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads, "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_theta,
        "max_position_embeddings": t.max_position_embeddings, "tie_word_embeddings": t.tie_word_embeddings,
        "rope_scaling": {"type": "default", "mrope_section": list(t.mrope_section)},
        "image_token_id": tok.image_pad, "video_token_id": tok.video_pad,
        "vision_start_token_id": tok.vision_start, "vision_end_token_id": tok.vision_end,
        "bos_token_id": tok.endoftext, "eos_token_id": tok.im_end, "torch_dtype": "float32",
        "vision_config": v.to_hf_dict(),
    }


def build(out: str | os.PathLike, seed: int = DEFAULT_SEED, max_shard_bytes: int = 256 * 2**10,
          configs: dict[str, Any] | None = None, own_init: bool = False, ar_module: Any = None) -> dict[str, Any]:
    """Write a random-weight checkpoint to ``out`` (created; must not exist). ``configs``: as
    :func:`default_configs` returns (its default). ``own_init``: the AR model and the DiTs take the modules' own
    initialisers (what training from scratch starts from; a ViT whose features tell images apart) instead of
    :func:`randomize_params`. ``ar_module``: write this :class:`NexusGenAR` (of ``configs["ar"]``) instead of a
    new one (e.g. one whose vision tower was pre-trained). Returns a short description."""
    from flax import nnx

    from conversion import config_io, io
    from conversion.tables.qwen2_5_vl import nexus_ar_mapping
    from conversion.tables.vae import bfl_mapping
    from nexus_jax.inference.loading import TOKENIZER
    from nexus_jax.models.nexus_ar import NexusGenAR
    from nexus_jax.models.vae import FluxVAE

    cfgs = configs or default_configs()
    root = Path(out)
    with io.atomic_output_dir(root) as tmp:
        # AR model: sharded safetensors + index, 4.49 names
        if ar_module is not None:
            ar = ar_module
        elif own_init:
            ar = NexusGenAR(cfgs["ar"], rngs=nnx.Rngs(seed))
        else:
            ar = randomize_params(nnx.eval_shape(lambda: NexusGenAR(cfgs["ar"], rngs=nnx.Rngs(0))), seed)
        state = _torch_arrays(ar, nexus_ar_mapping(cfgs["ar"]))
        (tmp / "ar").mkdir()
        entries = [(k, v.shape, v.dtype) for k, v in state.items()]
        writer = io.SafetensorsWriter(tmp / "ar", entries, max_shard_bytes, prefix="model")
        for k, v in state.items():
            writer.write(k, v)
        writer.close()
        io.write_json(tmp / "ar" / "config.json", _hf_ar_config(cfgs["ar"]))
        io.write_json(tmp / "ar" / "nexus_gen_config.json", config_io.to_dict(cfgs["ar"]))
        # decoders: torch pickles with the V2 key schemes
        rng = np.random.default_rng(seed + 1)
        _save_bin(tmp / "generation_decoder.bin", adapter_state(cfgs["generation"], rng) | _dit_state(
            cfgs["generation"], seed + 2, own_init))
        _save_bin(tmp / "edit_decoder.bin", merger_state(cfgs["editing"], rng) | _dit_state(cfgs["editing"], seed + 3,
                                                                                          own_init))
        # VAE in BFL ae.safetensors names
        vae = randomize_params(nnx.eval_shape(lambda: FluxVAE(cfgs["vae"], rngs=nnx.Rngs(0))), seed + 4, scale=0.1)
        vstate = _torch_arrays(vae, bfl_mapping(cfgs["vae"]))
        vw = io.SafetensorsWriter(tmp, [(k, v.shape, v.dtype) for k, v in vstate.items()], 2**62, prefix="ae")
        for k, v in vstate.items():
            vw.write(k, v)
        vw.close()
        # empty-prompt conditioning (stand-in for CLIP("") / T5(""))
        dit = cfgs["generation"].dit
        empty = {"pooled": rng.standard_normal(dit.pooled_dim).astype(np.float32),
                 "t5": (0.5 * rng.standard_normal((EMPTY_PROMPT_LENGTH, dit.context_dim))).astype(np.float32)}
        ew = io.SafetensorsWriter(tmp, [(k, v.shape, v.dtype) for k, v in empty.items()], 2**62,
                                  prefix="empty_prompt")
        for k, v in empty.items():
            ew.write(k, v)
        ew.close()
        for name, key in (("generation_decoder", "generation"), ("edit_decoder", "editing"), ("ae", "vae")):
            io.write_json(tmp / f"{name}_config.json", config_io.to_dict(cfgs[key]))
        io.write_json(tmp / TOKENIZER, {"type": "bytes"})
        io.write_json(tmp / "README.json", {"seed": seed, "note": "random weights: outputs are noise",
                                            "layout": "upstream PyTorch (Nexus-GenV2 + FLUX.1-dev names)"})
    return {"path": str(root), "seed": seed, "ar_tensors": len(state), "files": sorted(os.listdir(root))}


# --- the trained default (nexus_jax/assets/default_model, written by scripts/train_default_model.py) -------------
TRAINED = Path(__file__).resolve().parent / "assets" / "default_model"
# converted component -> (file the export writes, its upstream name, upstream config file name)
_EXPORTS = (
    ("ar", None, "ar", None),
    ("generation_decoder", "generation_decoder.bin", "generation_decoder.bin", "generation_decoder_config.json"),
    ("edit_decoder", "edit_decoder.bin", "edit_decoder.bin", "edit_decoder_config.json"),
    ("vae", "diffusion_pytorch_model.safetensors", "ae.safetensors", "ae_config.json"),
)
_COPIED = ("empty_prompt.safetensors", "nexus_jax_tokenizer.json")


def export_converted(converted: str | os.PathLike, out: str | os.PathLike, note: dict | None = None) -> dict[str, Any]:
    """A converted checkpoint (``ar/``, ``generation_decoder/``, ``edit_decoder/``, ``vae/``, empty prompt, tokenizer
    pointer) -> the upstream PyTorch layout :func:`build` writes, through ``nexus-jax convert export`` (AR in one
    safetensors file). ``note`` goes to ``README.json``. Returns the file sizes."""
    import shutil
    import tempfile

    from conversion import cli as convert_cli
    from conversion import io
    from conversion import orbax as orbax_io

    src, root = Path(converted), Path(out)
    with io.atomic_output_dir(root) as tmp, tempfile.TemporaryDirectory() as scratch:
        for sub, exported, name, config in _EXPORTS:
            dest = tmp / name if exported is None else Path(scratch) / sub
            fmt = "bin" if exported and exported.endswith(".bin") else "safetensors"
            rc = convert_cli.main(["export", str(src / sub), str(dest), "--format", fmt, "--no-progress"])
            if rc != 0:
                raise RuntimeError(f"convert export {src / sub} failed with status {rc}")
            if exported is not None:
                shutil.move(str(dest / exported), str(tmp / name))
                io.write_json(tmp / config, orbax_io.read_config(src / sub)["config"])
        for name in _COPIED:
            shutil.copyfile(src / name, tmp / name)
        io.write_json(tmp / "README.json", {"layout": "upstream PyTorch (Nexus-GenV2 + FLUX.1-dev names)",
                                            **(note or {})})
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def unpack_trained(out: str | os.PathLike, source: str | os.PathLike = TRAINED) -> dict[str, Any]:
    """Copy the shipped trained default (upstream PyTorch layout) to ``out`` (created; must not exist)."""
    import shutil

    from conversion import io

    src = Path(source)
    if not (src / "ar" / "nexus_gen_config.json").is_file():
        raise FileNotFoundError(f"the trained default model is missing: {src} has no ar/nexus_gen_config.json "
                                "(rebuild it with scripts/train_default_model.py)")
    with io.atomic_output_dir(Path(out)) as tmp:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                (tmp / p.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, tmp / p.relative_to(src))
    return {"path": str(out), "source": str(src), "files": sorted(os.listdir(out))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nexus_jax.default_checkpoint", description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = p.parse_args(argv)
    print(json.dumps(build(args.out, args.seed), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
