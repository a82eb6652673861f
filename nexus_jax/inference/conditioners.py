"""Bridge from a loaded Nexus-Gen decoder model to the runner's conditioner call
``(embeds [B, N, hidden], ref [B, M, hidden] | None, ref_grid, pooled [B, P]) -> Conditioning``."""

from __future__ import annotations

from typing import Any


def conditioner_for(model: Any) -> Any:
    """The conditioning module of a decoder model (generation adapter or editing merger)."""
    raise ValueError(
        f"no conditioner for {type(model).__name__}: the Nexus-Gen decoder modules "
        "(nexus_jax.models.nexus_decoders) are not available"
    )
