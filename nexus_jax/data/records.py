"""The Nexus-Gen training-record format (ms-swift "messages" JSONL) and task detection.

One JSON object per line::

    {"id": "...", "source": "...", "images": ["a.png", "b.png"],
     "messages": [{"role": "user", "content": "<image> Change the pan to a pot."},
                  {"role": "assistant", "content": "Here is the image: <image>"}]}

``images`` lists paths in the order their ``<image>`` placeholders occur across all messages. An image placeholder
in a user turn is an *input* image (ViT features enter the sequence); one in an assistant turn is an *output*
image (its 81 slots are regressed). Task: understanding (no output image), generation (output image, no input
image), editing (input and output images).

JSONL files and image roots may be local paths or object-store URLs (``gs://bucket/...``, see :mod:`nexus_jax.paths`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from typing import Any, Literal

from etils import epath

from nexus_jax.paths import as_path

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")
Task = Literal["understanding", "generation", "editing"]


class RecordError(ValueError):
    """A record that cannot be used for training (skipped and counted by the pipeline)."""


@dataclasses.dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclasses.dataclass(frozen=True)
class Record:
    """One conversation. ``images[i]`` is the file of the i-th ``<image>`` placeholder (all turns, in order)."""

    messages: tuple[Message, ...]
    images: tuple[str, ...] = ()
    id: str = ""
    source: str = ""

    @property
    def image_roles(self) -> tuple[str, ...]:
        """Role of the turn holding each image placeholder, in order (aligned with ``images``)."""
        return tuple(m.role for m in self.messages for _ in range(m.content.count(IMAGE_PLACEHOLDER)))

    @property
    def task(self) -> Task:
        return detect_task(self)

    def to_json(self) -> str:
        return json.dumps(
            {"id": self.id, "source": self.source, "images": list(self.images),
             "messages": [{"role": m.role, "content": m.content} for m in self.messages]},
            ensure_ascii=False,
        )


def detect_task(record: Record) -> Task:
    """understanding | generation | editing, from where the image placeholders sit."""
    roles = record.image_roles
    if "assistant" not in roles:
        return "understanding"
    return "editing" if "user" in roles else "generation"


def parse_record(obj: dict[str, Any] | str | bytes) -> Record:
    """Validate one record (dict or JSON text); raise :class:`RecordError` naming what is wrong."""
    if isinstance(obj, str | bytes):
        try:
            obj = json.loads(obj)
        except ValueError as e:
            raise RecordError(f"record is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise RecordError(f"record must be a JSON object, got {type(obj).__name__}")
    raw_messages = obj.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise RecordError(f"record {obj.get('id', '')!r}: 'messages' must be a non-empty list")
    messages = []
    for i, m in enumerate(raw_messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise RecordError(
                f"record {obj.get('id', '')!r}: message {i} must be {{'role': one of {ROLES}, 'content': str}}, "
                f"got {m!r}"
            )
        messages.append(Message(m["role"], m["content"]))
    if not any(m.role == "assistant" for m in messages):
        raise RecordError(f"record {obj.get('id', '')!r}: no assistant turn to learn from")
    images = obj.get("images") or []
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise RecordError(f"record {obj.get('id', '')!r}: 'images' must be a list of paths")
    n_placeholders = sum(m.content.count(IMAGE_PLACEHOLDER) for m in messages)
    if n_placeholders != len(images):
        raise RecordError(
            f"record {obj.get('id', '')!r}: {n_placeholders} {IMAGE_PLACEHOLDER} placeholders but "
            f"{len(images)} images"
        )
    return Record(tuple(messages), tuple(images), str(obj.get("id", "")), str(obj.get("source", "")))


def read_jsonl(path: str | os.PathLike) -> list[str]:
    """Raw lines (unparsed, so a broken line is skipped later by the pipeline, not here). ``path`` may be a URL."""
    with as_path(path).open("r", encoding="utf-8") as f:
        return [line for line in (ln.strip() for ln in f) if line]


def iter_records(path: str | os.PathLike) -> Iterator[Record]:
    """Parse every line of a JSONL file (raises on the first bad record; the pipeline skips instead)."""
    for line in read_jsonl(path):
        yield parse_record(line)


def resolve_image(path: str, image_root: str | os.PathLike | None) -> epath.Path:
    """The image file of a record entry: a relative ``path`` is taken under ``image_root``; absolute paths and URLs
    are kept. ``image_root`` may be a URL (``gs://bucket/images`` + ``a/b.png`` -> ``gs://bucket/images/a/b.png``)."""
    p = as_path(path)
    return p if p.is_absolute() or not image_root else as_path(image_root) / path


def decode_stored_example(example: dict[str, Any]) -> tuple[str, list[bytes]]:
    """(record JSON text, image bytes in ``images`` order) of one array_record example (see ``tfds_builder``)."""
    rec = example["record"]
    return (rec.decode("utf-8") if isinstance(rec, bytes) else rec), [bytes(b) for b in example["images"]]


def record_with_images(raw: str | bytes | dict[str, Any], image_root: str | os.PathLike | None
                       ) -> tuple[Record, list[Any], list[Any]]:
    """A raw training example -> (record, input image sources, output image sources).

    ``raw``: a JSONL line, a record dict, or an array_record example ``{"record", "images" (bytes)}``. Sources are
    the stored bytes or paths resolved against ``image_root`` (a missing stored image becomes a path that fails to
    load, so the record is skipped with a message). Output images are those of assistant turns.
    """
    if isinstance(raw, dict) and "record" in raw and "images" in raw:
        text, blobs = decode_stored_example(raw)
        rec = parse_record(text)
        if len(blobs) != len(rec.images):
            raise RecordError(f"record has {len(rec.images)} images but {len(blobs)} stored")
        files: list[Any] = [b if b else f"<missing image {p}>" for b, p in zip(blobs, rec.images)]
    else:
        rec = parse_record(raw)
        files = [resolve_image(p, image_root) for p in rec.images]
    roles = rec.image_roles
    inputs = [f for f, r in zip(files, roles) if r != "assistant"]
    outputs = [f for f, r in zip(files, roles) if r == "assistant"]
    return rec, inputs, outputs
