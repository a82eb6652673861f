"""UniPic-1 prompt templates (unipic.md 2.2) and right-padded batch tokenisation (host side, numpy).

Every prompt is one user turn with no system turn::

    <|im_start|>user\\n{input}<|im_end|>\\n<|im_start|>assistant\\n

Text-to-image uses ``"Generate an image: {prompt}"`` (CFG: ``"Generate an image."``); editing and understanding put
``num_image_tokens`` ``<image>`` ids (``grid + buffer_size``) before ``"\\n" + instruction`` (editing CFG:
``"Repeat this image."``). Padding is on the right with the eos id (``<|im_end|>``). ``encode`` is any
``text -> ids`` callable for plain text (no special tokens), e.g. a transformers tokenizer's ``encode`` wrapped by
:func:`nexus_jax.processing.chat.encode_text`, or the byte tokenizer of ``nexus_jax.nexus.tiny`` for tiny models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from configs.unipic import UniPicTokens
from nexus_jax.nexus.loss import IGNORE_INDEX
from nexus_jax.nexus.templates import EncodedChat, pad_batch

Encode = Callable[[str], Sequence[int]]

INSTRUCTION = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
T2I_PROMPT = "Generate an image: {}"
T2I_UNCOND = "Generate an image."
EDIT_UNCOND = "Repeat this image."
IMAGE_TAG = "<image>"


def encode_instruction(user_text: str, encode: Encode, tokens: UniPicTokens, num_image_tokens: int = 0) -> np.ndarray:
    """ids [L] of ``INSTRUCTION`` around ``"<image>" * num_image_tokens + ("\\n" if images) + user_text``.

    Special tokens are inserted as ids; the text pieces between them are encoded whole, as the Qwen tokenizer splits
    at special tokens.
    """
    if num_image_tokens < 0:
        raise ValueError(f"num_image_tokens must be >= 0, got {num_image_tokens}")
    if IMAGE_TAG in user_text:
        raise ValueError(f"pass images through num_image_tokens, not as {IMAGE_TAG} text: {user_text[:60]!r}")
    ids: list[int] = [tokens.im_start]
    if num_image_tokens:
        ids += list(encode("user\n")) + [tokens.image] * num_image_tokens + list(encode("\n" + user_text))
    else:
        ids += list(encode("user\n" + user_text))
    ids += [tokens.im_end] + list(encode("\n")) + [tokens.im_start] + list(encode("assistant\n"))
    return np.asarray(ids, np.int32)


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """Right-padded prompts: input_ids int32 [B, L] (pad = eos), attention_mask int32 [B, L], lengths int32 [B]."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    lengths: np.ndarray


def right_pad(sequences: Sequence[np.ndarray], pad_id: int, *, length: int | None = None) -> PromptBatch:
    """Stack id arrays into a right-padded batch of ``length`` columns (default: the longest)."""
    chats = [EncodedChat(np.asarray(s, np.int32), np.full(len(s), IGNORE_INDEX, np.int32), ()) for s in sequences]
    padded = pad_batch(chats, pad_id, length=length, side="right")
    return PromptBatch(padded.input_ids, padded.attention_mask.astype(np.int32), padded.lengths)


def text_to_image_batch(
    prompts: Sequence[str], encode: Encode, tokens: UniPicTokens, *, length: int | None = None
) -> PromptBatch:
    """The CFG batch [cond prompts; as many unconditional prompts] (2 * len(prompts) rows)."""
    if not prompts:
        raise ValueError("text_to_image_batch needs at least one prompt")
    cond = [encode_instruction(T2I_PROMPT.format(p), encode, tokens) for p in prompts]
    uncond = [encode_instruction(T2I_UNCOND, encode, tokens)] * len(prompts)
    return right_pad(cond + uncond, tokens.pad, length=length)


def _image_rows(
    texts: Sequence[str], encode: Encode, tokens: UniPicTokens, num_image_tokens: int, what: str
) -> list[np.ndarray]:
    if not texts:
        raise ValueError(f"{what} needs at least one text")
    if num_image_tokens < 1:
        raise ValueError(f"{what} needs num_image_tokens >= 1, got {num_image_tokens}")
    return [encode_instruction(t, encode, tokens, num_image_tokens) for t in texts]


def editing_batch(
    instructions: Sequence[str], encode: Encode, tokens: UniPicTokens, num_image_tokens: int,
    *, length: int | None = None,
) -> PromptBatch:
    """The CFG batch [edit instructions; "Repeat this image." per row], each with ``num_image_tokens`` image ids."""
    cond = _image_rows(instructions, encode, tokens, num_image_tokens, "editing_batch")
    uncond = _image_rows([EDIT_UNCOND], encode, tokens, num_image_tokens, "editing_batch") * len(cond)
    return right_pad(cond + uncond, tokens.pad, length=length)


def understanding_batch(
    questions: Sequence[str], encode: Encode, tokens: UniPicTokens, num_image_tokens: int,
    *, length: int | None = None,
) -> PromptBatch:
    """One row per question: ``"<image>" * num_image_tokens + "\n" + question`` in the user turn."""
    rows = _image_rows(questions, encode, tokens, num_image_tokens, "understanding_batch")
    return right_pad(rows, tokens.pad, length=length)


def image_slots(input_ids: np.ndarray, tokens: UniPicTokens, num_image_tokens: int) -> np.ndarray:
    """Index [B, num_image_tokens] of each row's ``<image>`` ids (raises unless every row has exactly that many)."""
    ids = np.asarray(input_ids)
    counts = (ids == tokens.image).sum(-1)
    if not np.all(counts == num_image_tokens):
        raise ValueError(f"every row needs {num_image_tokens} <image> ids, got counts {counts.tolist()}")
    return np.stack([np.flatnonzero(row == tokens.image) for row in ids]).astype(np.int32)
