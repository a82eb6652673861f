"""Text generation for the Qwen2.5 decoder: jitted prefill + while_loop decode over a fixed KV cache."""

from nexus_jax.generation.generate import (
    GenerationConfig,
    GenerationOutput,
    decode,
    generate,
    next_positions,
    prefill,
    validate_prompts,
)
from nexus_jax.generation.sampling import sample_next, top_p_filter

__all__ = [
    "GenerationConfig",
    "GenerationOutput",
    "decode",
    "generate",
    "next_positions",
    "prefill",
    "sample_next",
    "top_p_filter",
    "validate_prompts",
]
