"""Nexus-Gen chat templates and image-slot bookkeeping (numpy, host side).

Conversations use the Qwen2.5-VL chat format unchanged::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n{user}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>

An ``<image>`` tag in a message becomes ``<|vision_start|>`` + n x ``<|image_pad|>`` + ``<|vision_end|>``. Images in
user turns are inputs (their ViT features fill the pads); images in assistant turns are outputs: their pads are the
``num_slots`` prefilled slots, labelled ``image_pad`` so the loss can find them. Labels cover the assistant turns
(answer text, vision markers, ``<|im_end|>``); everything else is ``-100``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from configs.qwen2_5_vl import Qwen25VLTokens
from nexus_jax.nexus.loss import IGNORE_INDEX

Role = Literal["system", "user", "assistant"]
Language = Literal["en", "zh"]
Encode = Callable[[str], Sequence[int]]

IMAGE_TAG = "<image>"
SYSTEM_PROMPT = "You are a helpful assistant."

GENERATION_PROMPT = {
    "en": "Generate an image according to the following description: {}",
    "zh": "根据以下描述生成一张图像：{}",
}
GENERATION_ANSWER = {
    "en": "Here is an image based on the description: <image>",
    "zh": "这是根据您的描述生成的图像：<image>",
}
EDIT_ANSWER = {"en": "Here is the image: <image>", "zh": "以下为编辑后的图像：<image>"}
UNDERSTANDING_PROMPT = "Please give a brief description of the image."

_SPECIAL_TEXT = {
    "endoftext": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "image_pad": "<|image_pad|>",
}


@dataclasses.dataclass(frozen=True)
class Message:
    """One chat turn; ``content`` may hold ``<image>`` tags (in the order of the conversation's images)."""

    role: Role
    content: str

    def __post_init__(self) -> None:
        if self.role not in ("system", "user", "assistant"):
            raise ValueError(f"role must be system, user or assistant, got {self.role!r}")


def _check_language(language: str) -> None:
    if language not in GENERATION_PROMPT:
        raise ValueError(f"language must be one of {tuple(GENERATION_PROMPT)}, got {language!r}")


def generation_messages(prompt: str, language: Language = "en", with_answer: bool = True) -> list[Message]:
    """Text-to-image: the user asks for an image; the assistant answers with one output image."""
    _check_language(language)
    msgs = [Message("user", GENERATION_PROMPT[language].format(prompt))]
    if with_answer:
        msgs.append(Message("assistant", GENERATION_ANSWER[language]))
    return msgs


def editing_messages(instruction: str, language: Language = "en", with_answer: bool = True) -> list[Message]:
    """Image editing: ``<image> instruction`` (the source image first, as Nexus-Gen prepends it) -> output image."""
    _check_language(language)
    content = instruction if IMAGE_TAG in instruction else f"{IMAGE_TAG} {instruction}"
    if content.count(IMAGE_TAG) != 1:
        raise ValueError(f"an edit instruction takes exactly one {IMAGE_TAG} tag, got {content.count(IMAGE_TAG)}")
    msgs = [Message("user", content)]
    if with_answer:
        msgs.append(Message("assistant", EDIT_ANSWER[language]))
    return msgs


def understanding_messages(instruction: str = UNDERSTANDING_PROMPT) -> list[Message]:
    """Image understanding: the image, then the question (text answer, no output image)."""
    content = instruction if IMAGE_TAG in instruction else f"{IMAGE_TAG}\n{instruction}"
    return [Message("user", content)]


def _with_system(messages: Sequence[Message], system: str | None) -> list[Message]:
    msgs = list(messages)
    if system is not None and not (msgs and msgs[0].role == "system"):
        msgs.insert(0, Message("system", system))
    return msgs


def render_chat(
    messages: Sequence[Message], *, system: str | None = SYSTEM_PROMPT, add_generation_prompt: bool = False
) -> str:
    """The chat as text with each ``<image>`` written ``<|vision_start|><|image_pad|><|vision_end|>`` (unexpanded)."""
    image = _SPECIAL_TEXT["vision_start"] + _SPECIAL_TEXT["image_pad"] + _SPECIAL_TEXT["vision_end"]
    parts = [
        f"<|im_start|>{m.role}\n{m.content.replace(IMAGE_TAG, image)}<|im_end|>\n"
        for m in _with_system(messages, system)
    ]
    text = "".join(parts)
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    return text


@dataclasses.dataclass(frozen=True)
class ImageSpan:
    """The pads of one image in an encoded chat: ``input_ids[start:start+length]``; ``role`` says input/output."""

    start: int
    length: int
    role: Role

    @property
    def is_output(self) -> bool:
        return self.role == "assistant"


@dataclasses.dataclass(frozen=True)
class EncodedChat:
    """One tokenized conversation. input_ids/labels int32 [L]; images in conversation order."""

    input_ids: np.ndarray
    labels: np.ndarray
    images: tuple[ImageSpan, ...]

    @property
    def output_images(self) -> tuple[ImageSpan, ...]:
        return tuple(s for s in self.images if s.is_output)

    @property
    def input_images(self) -> tuple[ImageSpan, ...]:
        return tuple(s for s in self.images if not s.is_output)


def encode_chat(
    messages: Sequence[Message],
    encode: Encode,
    tokens: Qwen25VLTokens,
    *,
    input_image_tokens: Sequence[int] = (),
    num_slots: int,
    system: str | None = SYSTEM_PROMPT,
    add_generation_prompt: bool = False,
    stop_after_slots: bool = False,
) -> EncodedChat:
    """Tokenize a chat; ``encode`` handles plain text (no special tokens) and returns ids.

    ``input_image_tokens[i]`` is the merged-token count of the i-th *user* image; every assistant image gets
    ``num_slots`` slots. ``stop_after_slots`` ends the sequence right after the first output image's last slot
    (what the slot-filling forward needs). Raises when the tag count and the image counts disagree.
    """
    msgs = _with_system(messages, system)
    n_user_tags = sum(m.content.count(IMAGE_TAG) for m in msgs if m.role != "assistant")
    if n_user_tags != len(input_image_tokens):
        raise ValueError(
            f"the chat has {n_user_tags} input {IMAGE_TAG} tags but {len(input_image_tokens)} input images were given"
        )
    if any(n < 1 for n in input_image_tokens):
        raise ValueError(f"input image token counts must be >= 1, got {list(input_image_tokens)}")
    ids: list[int] = []
    labels: list[int] = []
    spans: list[ImageSpan] = []
    user_images = iter(input_image_tokens)

    def put(new_ids: Sequence[int], train: bool, label: int | None = None) -> None:
        ids.extend(int(i) for i in new_ids)
        if train:
            labels.extend(int(i) if label is None else label for i in new_ids)
        else:
            labels.extend([IGNORE_INDEX] * len(new_ids))

    def text(s: str, train: bool) -> None:
        if s:
            put(encode(s), train)

    for turn, m in enumerate(msgs):
        train = m.role == "assistant"
        put([tokens.im_start], False)
        text(f"{m.role}\n", False)
        pieces = m.content.split(IMAGE_TAG)
        for k, piece in enumerate(pieces):
            text(piece, train)
            if k == len(pieces) - 1:
                break
            n = num_slots if train else next(user_images)
            put([tokens.vision_start], train)
            spans.append(ImageSpan(len(ids), n, m.role))
            put([tokens.image_pad] * n, train, label=tokens.image_pad)
            if train and stop_after_slots:
                return _finish(ids, labels, spans)
            put([tokens.vision_end], train)
        put([tokens.im_end], train)
        if turn < len(msgs) - 1:
            text("\n", False)
    if add_generation_prompt:
        text("\n", False)
        put([tokens.im_start], False)
        text("assistant\n", False)
    return _finish(ids, labels, spans)


def _finish(ids: list[int], labels: list[int], spans: list[ImageSpan]) -> EncodedChat:
    return EncodedChat(np.asarray(ids, np.int32), np.asarray(labels, np.int32), tuple(spans))


@dataclasses.dataclass(frozen=True)
class PaddedBatch:
    """Left-padded batch. input_ids/labels int32 [B, L]; attention_mask bool [B, L]; lengths [B]."""

    input_ids: np.ndarray
    labels: np.ndarray
    attention_mask: np.ndarray
    lengths: np.ndarray


def pad_batch(
    chats: Sequence[EncodedChat], pad_id: int, *, length: int | None = None, side: str = "left"
) -> PaddedBatch:
    """Stack chats into one batch, padding on ``side`` to ``length`` (default: the longest chat)."""
    if not chats:
        raise ValueError("pad_batch needs at least one chat")
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    longest = max(len(c.input_ids) for c in chats)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"a chat has {longest} tokens, more than the padded length {length}")
    b = len(chats)
    ids = np.full((b, length), pad_id, np.int32)
    labels = np.full((b, length), IGNORE_INDEX, np.int32)
    mask = np.zeros((b, length), bool)
    for i, c in enumerate(chats):
        n = len(c.input_ids)
        sl = slice(length - n, length) if side == "left" else slice(0, n)
        ids[i, sl], labels[i, sl], mask[i, sl] = c.input_ids, c.labels, True
    return PaddedBatch(ids, labels, mask, np.asarray([len(c.input_ids) for c in chats], np.int32))


_SPECIAL_RE = re.compile("|".join(re.escape(v) for v in _SPECIAL_TEXT.values()))


def split_special(text: str) -> list[str]:
    """Split rendered chat text into plain-text pieces and special-token strings (keeps both)."""
    out, pos = [], 0
    for m in _SPECIAL_RE.finditer(text):
        if m.start() > pos:
            out.append(text[pos : m.start()])
        out.append(m.group())
        pos = m.end()
    if pos < len(text):
        out.append(text[pos:])
    return out


def special_text_ids(tokens: Qwen25VLTokens) -> dict[str, int]:
    """Special-token string -> id, for the tokens a Nexus-Gen chat uses."""
    return {text: getattr(tokens, name) for name, text in _SPECIAL_TEXT.items()}
