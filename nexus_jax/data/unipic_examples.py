"""UniPic-1 training examples: Nexus-Gen records (``messages`` + ``images``, :mod:`nexus_jax.data.records`) mapped
onto UniPic's three tasks, and the fixed-shape collator.

* generation (an image in the assistant turn, none in the user turns) -> text-to-image: ``input_ids`` =
  ``INSTR("Generate an image: " + user text)``, ``null_ids`` = ``INSTR("Generate an image.")`` (prompt dropout),
  ``pixels`` = the output image centre-cropped and resized to ``image_size``.
* editing (one image in a user turn and one in the assistant turn) -> ``source`` / ``target`` (centre crop),
  ``input_ids`` = ``INSTR("<image>" * K + "\\n" + instruction)`` (the inference layout, see docs/unipic.md),
  ``null_ids`` the same with "Edit this image."; K = (image_size / 16)^2 + buffer_size slots.
* understanding (one image in a user turn, none in the assistant turn) -> ``pixels`` (gray-padded square),
  ``input_ids`` = ``INSTR("<image>" * K + "\\n" + question)`` + answer + ``<|im_end|>``, ``labels`` the answer ids and
  ``<|im_end|>`` (-100 elsewhere).

System turns are ignored and the user turns joined with newlines (UniPic's template is one user turn), as in
``nexus-jax infer``. A record of another task, with other image counts, or longer than the largest length bucket
raises :class:`~nexus_jax.data.records.RecordError` (the pipeline skips it and puts a zero-weight filler row in its
place). Every example has ``weight`` 1 (0 for a filler).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from configs.unipic import UniPicTokens
from nexus_jax.data.pipeline import Batch, Example, pad_to, pick_bucket
from nexus_jax.data.records import IMAGE_PLACEHOLDER, RecordError, record_with_images
from nexus_jax.nexus.loss import IGNORE_INDEX
from nexus_jax.processing.image_processor import load_image
from nexus_jax.unipic import prompts
from nexus_jax.unipic.understand import preprocess_image

Encode = Callable[[str], Sequence[int]]
RECORD_TASKS = ("generation", "editing", "understanding")
EDIT_NULL = "Edit this image."  # upstream's editing prompt dropout text (unipic.md 4.1)
TEXT_KEYS = ("input_ids", "null_ids", "labels")
IMAGE_KEYS = {"generation": ("pixels",), "editing": ("source", "target"), "understanding": ("pixels",)}


@dataclasses.dataclass(frozen=True)
class UniPicEncoder:
    """Raw JSONL line / record dict / array_record example -> one example of ``task`` (see the module docstring)."""

    task: str  # one of RECORD_TASKS
    tokens: UniPicTokens
    encode_text: Encode
    image_size: int
    image_tokens: int  # <image> slots per source image (editing / understanding)
    max_length: int  # the largest length bucket
    image_root: str = ""

    def __post_init__(self) -> None:
        if self.task not in RECORD_TASKS:
            raise ValueError(f"UniPic record task must be one of {RECORD_TASKS}, got {self.task!r}")

    def filler(self) -> Example:
        """Zero-weight stand-in for a broken record: same image shapes, a prompt of only the source image's
        ``<image>`` slots (editing / understanding: every row must hold them) or one pad token, no labels."""
        img = np.zeros((self.image_size, self.image_size, 3), np.float32)
        out: Example = {k: img for k in IMAGE_KEYS[self.task]}
        ids = np.full(self.image_tokens, self.tokens.image, np.int32) if self.task != "generation" else \
            np.asarray([self.tokens.pad], np.int32)
        out["input_ids"] = ids
        if self.task == "understanding":
            out["labels"] = np.full(len(ids), IGNORE_INDEX, np.int32)
        else:
            out["null_ids"] = ids
        out["weight"] = np.asarray(0.0, np.float32)
        return out

    def _pixels(self, image, square: str) -> np.ndarray:
        try:
            rgb = np.asarray(load_image(image).convert("RGB"), np.uint8)
        except (ValueError, TypeError, OSError) as e:
            raise RecordError(str(e)) from e
        return preprocess_image(rgb, self.image_size, square)

    def __call__(self, raw: str | bytes | dict) -> Example:
        rec, inputs, outputs = record_with_images(raw, self.image_root)
        if rec.task != self.task:
            raise RecordError(f"record {rec.id!r} is a {rec.task} record; this run trains on {self.task} records")
        want = {"generation": (0, 1), "editing": (1, 1), "understanding": (1, 0)}[self.task]
        if (len(inputs), len(outputs)) != want:
            raise RecordError(f"record {rec.id!r}: UniPic {self.task} needs {want[0]} input and {want[1]} output "
                              f"image(s), got {len(inputs)} and {len(outputs)}")
        user = "\n".join(m.content.replace(IMAGE_PLACEHOLDER, "").strip() for m in rec.messages if m.role == "user")
        user = user.strip()
        enc, tok, k = self.encode_text, self.tokens, self.image_tokens
        if self.task == "generation":
            out = {"pixels": self._pixels(outputs[0], "crop"),
                   "input_ids": prompts.encode_instruction(prompts.T2I_PROMPT.format(user), enc, tok),
                   "null_ids": prompts.encode_instruction(prompts.T2I_UNCOND, enc, tok)}
        elif self.task == "editing":
            out = {"source": self._pixels(inputs[0], "crop"), "target": self._pixels(outputs[0], "crop"),
                   "input_ids": prompts.encode_instruction(user, enc, tok, k),
                   "null_ids": prompts.encode_instruction(EDIT_NULL, enc, tok, k)}
        else:
            answer = "\n".join(m.content.strip() for m in rec.messages if m.role == "assistant").strip()
            prompt = prompts.encode_instruction(user, enc, tok, k)
            target = np.asarray(list(enc(answer)) + [tok.im_end], np.int32)
            out = {"pixels": self._pixels(inputs[0], "pad"), "input_ids": np.concatenate([prompt, target]),
                   "labels": np.concatenate([np.full(len(prompt), IGNORE_INDEX, np.int32), target])}
        if len(out["input_ids"]) > self.max_length:
            raise RecordError(f"over-long record {rec.id!r}: {len(out['input_ids'])} tokens exceed the largest "
                              f"length bucket {self.max_length}")
        out["weight"] = np.asarray(1.0, np.float32)
        return out


@dataclasses.dataclass(frozen=True)
class UniPicCollator:
    """Examples -> a batch padded to the smallest length bucket holding the longest prompt (``agree_length``: the
    maximum over processes, so every process pads alike). Token arrays [B, L] (pad = eos, labels -100),
    ``attention_mask`` / ``null_mask`` [B, L] int32, images [B, R, R, 3], ``weight`` [B], ``record_id`` [B]."""

    buckets: tuple[int, ...]
    pad_id: int
    agree_length: Callable[[int], int] | None = None

    def __call__(self, examples: list[Example]) -> Batch:
        longest = max(len(e[k]) for e in examples for k in ("input_ids", "null_ids") if k in e)
        if self.agree_length is not None:
            longest = self.agree_length(longest)
        length = pick_bucket(longest, self.buckets)
        out: Batch = {}
        for k in TEXT_KEYS:
            if k in examples[0]:
                pad = IGNORE_INDEX if k == "labels" else self.pad_id
                out[k] = np.stack([pad_to(np.asarray(e[k], np.int32), length, pad) for e in examples])
        for k, m in (("input_ids", "attention_mask"), ("null_ids", "null_mask")):
            if k in examples[0]:
                out[m] = np.stack([pad_to(np.ones(len(e[k]), np.int32), length, 0) for e in examples])
        for k in examples[0]:
            if k not in out and k not in TEXT_KEYS:
                out[k] = np.stack([np.asarray(e[k]) for e in examples])
        return out


def count_tokens(batch: Batch) -> int:
    """Real prompt / answer tokens of a batch (image tokens not counted)."""
    return int(np.asarray(batch["attention_mask"]).sum())
