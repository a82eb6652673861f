"""Parse and validate batch-inference request lines (JSONL, chat ``messages`` format).

One line is one request::

    {"id": "fox", "task": "generation", "messages": [{"role": "user", "content": "a red fox in the snow"}], "seed": 7}
    {"id": "night", "task": "editing", "images": ["street.png"],
     "messages": [{"role": "user", "content": "<image> make it night"}], "seed": 3}
    {"id": "what", "task": "understanding",
     "messages": [{"role": "user", "content": [{"type": "image", "image": "street.png"},
                                               {"type": "text", "text": "What is in the picture?"}]}]}
    {"id": "talk", "task": "chat", "messages": [{"role": "user", "content": "Draw me a lighthouse."}], "seed": 2}

``chat`` is free-form: the model answers in text and decides itself whether to add an image (it emits
``<|vision_start|>``); an image is rendered by the generation decoder.

``content`` is a string with ``<image>`` tags (the images then come from the top-level ``images`` list, in order) or
a list of ``{"type": "text"|"image", ...}`` items. Relative image paths are resolved against the requests file's
directory. A line that cannot be turned into a :class:`Request` becomes a :class:`Failure` with a readable error; it
never stops the run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

from nexus_jax import paths
from nexus_jax.nexus.templates import IMAGE_TAG, Message

TASKS: tuple[str, ...] = ("understanding", "generation", "editing", "chat")
MAX_ID_LENGTH = 128
MAX_IMAGES = 16  # largest per-request chat image limit ("max_images")


class RequestError(ValueError):
    """A request line that is not valid; the message names the offending value and the rule it breaks."""


@dataclasses.dataclass(frozen=True)
class Request:
    """A validated request. ``index`` is its 0-based line number (the order of the results); ``messages`` have
    ``<image>`` tags matching ``images`` (absolute paths) one to one; ``prompt`` is the user text without tags."""

    id: str
    index: int
    task: str
    messages: tuple[Message, ...]
    images: tuple[str, ...]
    seed: int
    prompt: str
    max_images: int | None = None  # chat only: images the answer may hold (None: the CLI's --max-images)


@dataclasses.dataclass(frozen=True)
class Failure:
    """A request that failed (at parse time or later); ``id`` falls back to ``line-<n>`` when the line has none."""

    id: str
    index: int
    task: str | None
    error: str


def default_id(index: int) -> str:
    return f"line-{index + 1:05d}"


def _content_text(content: Any, images: list[str], where: str) -> str:
    """Message content (string or typed item list) -> text with ``<image>`` tags; list images go to ``images``."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"{where}: content must be a string or a list of items, got {type(content).__name__}")
    parts = []
    for j, item in enumerate(content):
        if not isinstance(item, dict) or item.get("type") not in ("text", "image"):
            raise RequestError(f"{where}: content item {j} must be {{'type': 'text'|'image', ...}}, got {item!r}")
        if item["type"] == "text":
            if not isinstance(item.get("text"), str):
                raise RequestError(f"{where}: content item {j} of type text needs a string 'text'")
            parts.append(item["text"])
        else:
            path = item.get("image", item.get("path"))
            if not isinstance(path, str) or not path:
                raise RequestError(f"{where}: content item {j} of type image needs an 'image' path string")
            images.append(path)
            parts.append(IMAGE_TAG)
    return " ".join(p.strip() for p in parts if p.strip()) if parts else ""


def _messages(raw: Any, images: list[str]) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise RequestError(f"'messages' must be a non-empty list of {{'role', 'content'}} objects, got {raw!r}"[:300])
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RequestError(f"{where} must be an object with 'role' and 'content', got {m!r}"[:300])
        if m["role"] not in ("system", "user", "assistant"):
            raise RequestError(f"{where}: role must be system, user or assistant, got {m['role']!r}")
        if m["role"] == "assistant":
            raise RequestError(f"{where}: requests carry user/system turns only; the model writes the assistant turn")
        list_images: list[str] = []
        text = _content_text(m["content"], list_images, where)
        images.extend(list_images)
        out.append(Message(m["role"], text))
    if out[-1].role != "user":
        raise RequestError(f"the last message must be the user's, got role {out[-1].role!r}")
    return out


def parse_request(line: str, index: int, base_dir: str = ".", *, check_files: bool = True) -> Request:
    """One JSONL line -> :class:`Request`; raises :class:`RequestError` naming the bad field and value."""
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as e:
        raise RequestError(f"malformed JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(doc, dict):
        raise RequestError(f"a request must be a JSON object, got {type(doc).__name__}")
    rid = doc.get("id", default_id(index))
    bad_id = not isinstance(rid, str) or not rid or len(rid) > MAX_ID_LENGTH
    if bad_id or any(c in rid for c in "/\\\0") or rid[0] == ".":
        raise RequestError(
            f"id {rid!r} must be a non-empty string of at most {MAX_ID_LENGTH} characters without '/', '\\\\' "
            "or a leading '.' (it names the output files)"
        )
    task = doc.get("task")
    if task not in TASKS:
        raise RequestError(f"unknown task {task!r}; expected one of {TASKS}")
    seed = doc.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise RequestError(f"seed {seed!r} must be an integer in [0, 2**31)")
    max_images = doc.get("max_images")
    if max_images is not None:
        if isinstance(max_images, bool) or not isinstance(max_images, int) or not 0 <= max_images <= MAX_IMAGES:
            raise RequestError(f"max_images {max_images!r} must be an integer in [0, {MAX_IMAGES}]")
        if task != "chat":
            raise RequestError(f"max_images applies to chat requests only, not to {task}")
    top_images = doc.get("images", [])
    if not isinstance(top_images, list) or not all(isinstance(p, str) and p for p in top_images):
        raise RequestError(f"'images' must be a list of path strings, got {top_images!r}"[:300])
    list_images: list[str] = []
    messages = _messages(doc.get("messages"), list_images)
    n_tags = sum(m.content.count(IMAGE_TAG) for m in messages)
    if list_images and top_images:
        raise RequestError("images given both as typed content items and in 'images'; use one of the two")
    images = list_images or list(top_images)
    user_text = " ".join(m.content.replace(IMAGE_TAG, " ").strip() for m in messages if m.role == "user").strip()
    user_text = " ".join(user_text.split())
    if task == "editing" and n_tags == 0 and len(images) == 1:  # "make it night" + one image: tag goes first
        messages[-1] = Message("user", f"{IMAGE_TAG} {messages[-1].content}")
        n_tags = 1
    if n_tags != len(images):
        raise RequestError(f"the messages have {n_tags} <image> tags but {len(images)} images were given")
    if task == "generation" and images:
        raise RequestError(f"a generation request takes no input image, got {len(images)}")
    if task == "editing" and len(images) != 1:
        raise RequestError(f"an editing request takes exactly 1 source image, got {len(images)}")
    if task in ("understanding", "chat") and not user_text and not images:
        raise RequestError(f"an {task} request needs a question or an image" if task == "understanding" else
                           "a chat request needs a message or an image")
    if task in ("generation", "editing") and not user_text:
        raise RequestError(f"a {task} request needs a non-empty text prompt")
    resolved = tuple(paths.resolve(p, base_dir) for p in images)
    if check_files:
        for p in resolved:
            if not paths.is_file(p):
                raise RequestError(f"missing image: {p} does not exist")
    return Request(rid, index, task, tuple(messages), resolved, seed, user_text, max_images)


def parse_or_fail(line: str, index: int, base_dir: str = ".") -> Request | Failure:
    """:func:`parse_request`, with any error turned into a :class:`Failure` (id and task kept when readable)."""
    try:
        return parse_request(line, index, base_dir)
    except RequestError as e:
        task = None
        try:
            doc = json.loads(line)
            task = doc.get("task") if isinstance(doc, dict) and doc.get("task") in TASKS else None
        except json.JSONDecodeError:
            pass
        return Failure(request_id(line, index), index, task, str(e))


def request_id(line: str, index: int) -> str:
    """The id a line's outputs are recorded under, valid or not (its ``id`` string, else ``line-<n>``)."""
    try:
        doc = json.loads(line)
    except json.JSONDecodeError:
        return default_id(index)
    rid = doc.get("id") if isinstance(doc, dict) else None
    return rid if isinstance(rid, str) and rid else default_id(index)


def read_lines(path: str | os.PathLike) -> list[str]:
    """Non-blank lines of a requests file (blank lines are dropped; the line index counts the kept lines)."""
    text = paths.read_text(os.fspath(path))
    return [ln.rstrip("\r") for ln in text.split("\n") if ln.strip()]


def duplicate_ids(items: Sequence[Request | Failure]) -> dict[str, int]:
    """id -> count for ids used more than once (they would overwrite each other's outputs)."""
    seen: dict[str, int] = {}
    for it in items:
        seen[it.id] = seen.get(it.id, 0) + 1
    return {k: v for k, v in seen.items() if v > 1}
