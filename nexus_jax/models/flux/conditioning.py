"""What conditions the FLUX DiT in place of its text encoders (built by the Nexus-Gen decoders, used by the sampler)."""

from __future__ import annotations

from typing import NamedTuple

import jax


class Conditioning(NamedTuple):
    """What replaces FLUX's text encoders. context [B, Lt, context_dim]; pooled [B, pooled_dim];
    txt_ids [Lt, 3] or [B, Lt, 3] (RoPE ids of the context tokens)."""

    context: jax.Array
    pooled: jax.Array
    txt_ids: jax.Array
