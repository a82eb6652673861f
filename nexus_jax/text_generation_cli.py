"""``nexus-jax generate``: generate token ids (and text) with a Qwen2.5 text decoder.

The model is random unless ``--hf-checkpoint`` names a directory of transformers ``*.safetensors`` (Qwen2 or
Qwen2.5-VL layout). Prompts are token ids (``--prompt-ids 1,2,3``, repeatable) or text (``--prompt``, repeatable),
encoded with ``--tokenizer DIR`` (a local transformers tokenizer) or, without one, as UTF-8 bytes (a toy tokenizer
for random models; needs vocab_size >= 256). Prints one JSON object per prompt.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from configs import qwen2_5
from configs.qwen2_5 import Qwen2TextConfig

PRESETS = {"tiny": qwen2_5.tiny, "bench": qwen2_5.bench, "qwen2_5_vl_7b": qwen2_5.qwen2_5_vl_7b,
           "qwen2_5_1_5b": qwen2_5.qwen2_5_1_5b}


def load_config(preset: str, config_json: str | None = None) -> Qwen2TextConfig:
    """A preset, optionally overridden by the fields of a JSON object (file path)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown config preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[preset]()
    if config_json:
        with open(config_json) as f:
            fields = json.load(f)
        unknown = set(fields) - {f.name for f in dataclasses.fields(Qwen2TextConfig)}
        if unknown:
            raise ValueError(f"unknown Qwen2TextConfig fields in {config_json}: {sorted(unknown)}")
        if fields.get("mrope_section") is not None:
            fields["mrope_section"] = tuple(fields["mrope_section"])
        cfg = cfg.replace(**fields)
    return cfg


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 (toy tokenizer for random models)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def load_tokenizer(path: str | None, vocab_size: int):
    """A transformers tokenizer from a local directory, or the byte tokenizer."""
    if path:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    if vocab_size < 256:
        raise ValueError(f"the byte tokenizer needs vocab_size >= 256, the model has {vocab_size}; pass --prompt-ids")
    return ByteTokenizer()


def load_hf_checkpoint(model, directory: str) -> None:
    """Fill ``model`` from the ``*.safetensors`` files of a transformers checkpoint directory."""
    from safetensors import safe_open

    from conversion.load import qwen2_text

    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    state = {}
    for path in files:
        with safe_open(path, framework="flax") as f:
            for key in f.keys():
                if not key.startswith(("visual.", "model.visual.")):
                    state[key] = np.asarray(f.get_tensor(key), np.float32)
    qwen2_text(model, state)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> left-padded ids and mask [B, max_len]."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    length = max(len(p) for p in prompts)
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = p
        mask[i, length - len(p) :] = 1
    return ids, mask


def run(
    config: Qwen2TextConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_ids: Sequence[int] = (),
    seed: int = 0,
    hf_checkpoint: str | None = None,
    tokenizer: Any = None,
) -> list[dict[str, Any]]:
    """Build the model, generate for every prompt; returns one dict per prompt (prompt_ids, generated_ids[, text])."""
    import jax

    from nexus_jax.generation import GenerationConfig, generate
    from nexus_jax.models.qwen2.build import create_model

    model = create_model(config, seed=seed)
    if hf_checkpoint:
        load_hf_checkpoint(model, hf_checkpoint)
    ids, mask = left_pad(prompts, pad_id=0)
    gen = GenerationConfig(
        max_new_tokens=max_new_tokens, eos_token_ids=tuple(eos_token_ids), temperature=temperature, top_p=top_p
    )
    out = generate(model, ids, mask, config=gen, rng=jax.random.key(seed))
    tokens, counts = np.asarray(out.tokens), np.asarray(out.num_generated)
    results = []
    for prompt, row, n in zip(prompts, tokens, counts, strict=True):
        item: dict[str, Any] = {"prompt_ids": list(map(int, prompt)), "generated_ids": row[:n].tolist()}
        if tokenizer is not None:
            item["text"] = tokenizer.decode(item["generated_ids"])
        results.append(item)
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nexus-jax generate", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny", choices=sorted(PRESETS), help="config preset (default tiny)")
    p.add_argument("--config-json", help="JSON file of Qwen2TextConfig fields overriding the preset")
    p.add_argument("--hf-checkpoint", help="directory of transformers *.safetensors to load")
    p.add_argument("--tokenizer", help="local transformers tokenizer directory (default: UTF-8 bytes)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompt-ids", action="append", default=[], help="comma-separated token ids (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--eos-id", type=int, action="append", default=[], help="stop token id (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, args.config_json)
        tokenizer = load_tokenizer(args.tokenizer, config.vocab_size) if args.prompt or args.tokenizer else None
        prompts = [[int(t) for t in s.split(",") if t.strip()] for s in args.prompt_ids]
        prompts += [tokenizer.encode(text) for text in args.prompt]
        if not prompts:
            raise ValueError("give at least one --prompt or --prompt-ids")
        results = run(
            config, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
            eos_token_ids=args.eos_id, seed=args.seed, hf_checkpoint=args.hf_checkpoint, tokenizer=tokenizer,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for item in results:
        print(json.dumps(item))
    return 0


if __name__ == "__main__":
    sys.exit(main())
