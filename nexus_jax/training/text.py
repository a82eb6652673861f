"""The text encoder of a training run: text -> token ids (no special tokens)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from configs.training import TrainConfig


def text_encoder(cfg: TrainConfig, tokenizer_dir: str) -> Callable[[str], Sequence[int]]:
    """The byte tokenizer for ``tiny*`` model presets, else the Hugging Face tokenizer in ``tokenizer_dir``."""
    if cfg.model_preset.startswith("tiny"):
        from nexus_jax.nexus.tiny import ByteTokenizer

        return ByteTokenizer().encode
    if not tokenizer_dir:
        raise ValueError(f"model preset {cfg.model_preset!r} needs --tokenizer (a Qwen2 tokenizer directory)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return lambda text: tok.encode(text, add_special_tokens=False)
