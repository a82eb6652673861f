"""Qwen2.5-VL chat-template rendering, ``<|image_pad|>`` expansion and batch tokenisation (left padding).

Messages follow the transformers format::

    [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What is this?"}]}]

(``content`` may also be a plain string). Without a system message the default Qwen system prompt is inserted.
Any tokenizer works that has ``encode(text)`` returning ids (transformers) or an object with ``.ids`` (tokenizers),
and that maps the Qwen special-token strings to single ids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_SYSTEM = "You are a helpful assistant."
IMAGE_PAD = "<|image_pad|>"
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"

Message = dict[str, Any]


def _content_parts(content: str | Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    parts = list(content)
    for part in parts:
        if part.get("type") not in ("text", "image"):
            raise ValueError(f"unsupported message part type {part.get('type')!r}; use 'text' or 'image'")
    return parts


def render_chat(messages: Sequence[Message], *, add_generation_prompt: bool = True) -> tuple[str, list[Any]]:
    """Render messages with the Qwen2.5-VL template. Returns (text with one <|image_pad|> per image, images)."""
    if not messages:
        raise ValueError("messages is empty")
    out, images = [], []
    if messages[0].get("role") != "system":
        out.append(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")
    for msg in messages:
        role = msg.get("role")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message role {role!r} is not one of 'system', 'user', 'assistant'")
        body = []
        for part in _content_parts(msg.get("content", "")):
            if part["type"] == "image":
                images.append(part.get("image"))
                body.append(IMAGE_PLACEHOLDER)
            else:
                body.append(part["text"])
        out.append(f"<|im_start|>{role}\n{''.join(body)}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out), images


def expand_image_pads(text: str, tokens_per_image: Sequence[int]) -> str:
    """Replace the k-th ``<|image_pad|>`` with ``tokens_per_image[k]`` copies; the counts must match."""
    pieces = text.split(IMAGE_PAD)
    if len(pieces) - 1 != len(tokens_per_image):
        raise ValueError(
            f"the text has {len(pieces) - 1} {IMAGE_PAD} placeholders but {len(tokens_per_image)} images were given"
        )
    out = [pieces[0]]
    for count, piece in zip(tokens_per_image, pieces[1:]):
        out.append(IMAGE_PAD * int(count) + piece)
    return "".join(out)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` (no special tokens added) for a transformers or tokenizers tokenizer."""
    try:
        encoded = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        encoded = tokenizer.encode(text)
    return list(getattr(encoded, "ids", encoded))


@dataclasses.dataclass(frozen=True)
class EncodedBatch:
    """Left-padded batch: input_ids / attention_mask [B, L] int32."""

    input_ids: np.ndarray
    attention_mask: np.ndarray


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, multiple: int = 1) -> EncodedBatch:
    """Left-pad id lists to a common length (rounded up to ``multiple``)."""
    length = max(len(s) for s in sequences)
    length = -(-length // multiple) * multiple
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for i, seq in enumerate(sequences):
        if len(seq):
            ids[i, length - len(seq):] = seq
            mask[i, length - len(seq):] = 1
    return EncodedBatch(ids, mask)
