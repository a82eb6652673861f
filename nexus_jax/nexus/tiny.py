"""A byte-level tokenizer for tiny test/benchmark models (no tokenizer files are needed).

Plain text maps to its UTF-8 bytes (ids 0..255); the chat's special tokens use the ids of
:data:`configs.nexus_gen.TINY_TOKENS` (256..263). Real checkpoints use the Qwen2 tokenizer instead; the templates only
need an ``encode(text) -> ids`` callable for plain text either way.
"""

from __future__ import annotations

from collections.abc import Sequence

from configs.nexus_gen import TINY_TOKENS
from configs.qwen2_5_vl import Qwen25VLTokens
from nexus_jax.nexus.templates import special_text_ids, split_special


class ByteTokenizer:
    """UTF-8 bytes + special tokens. ``encode`` handles plain text; ``encode_with_special`` parses special strings."""

    def __init__(self, tokens: Qwen25VLTokens = TINY_TOKENS):
        self.tokens = tokens
        self.special = special_text_ids(tokens)
        self.inverse = {v: k for k, v in self.special.items()}
        if min(self.special.values()) < 256:
            raise ValueError(f"special token ids {sorted(self.special.values())} collide with the byte ids 0..255")

    def encode(self, text: str) -> list[int]:
        """Plain text -> byte ids (special-token strings are *not* parsed)."""
        return list(text.encode("utf-8"))

    def encode_with_special(self, text: str) -> list[int]:
        """Rendered chat text -> ids, parsing ``<|...|>`` special tokens."""
        out: list[int] = []
        for piece in split_special(text):
            out.extend([self.special[piece]] if piece in self.special else self.encode(piece))
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """ids -> text (special ids back to their strings)."""
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            out.append(self.inverse.get(i, f"<|{i}|>"))
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)
