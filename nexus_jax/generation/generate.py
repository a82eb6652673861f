"""Batched text generation with a fixed-size KV cache: one jitted prefill, one jitted ``lax.while_loop`` decode.

Prompts are left-padded ([B, L] ids + [B, L] mask). Each row's next RoPE position continues from its largest prompt
position + 1 (as transformers' ``rope_deltas`` does for M-RoPE prompts). Rows that emit an EOS id are finished;
their later slots hold ``pad_token_id`` and the tokens still fed for them are marked invalid in the KV cache, so a
finished row's cache holds exactly its prompt and the tokens before its stop token (the stop token is never fed).
The loop stops when every row is finished or ``max_new_tokens`` is reached.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nexus_jax.generation.sampling import sample_next, suppress_per_row, suppress_tokens
from nexus_jax.models.qwen2.cache import KVCache, init_cache_for
from nexus_jax.models.qwen2.model import Qwen2ForCausalLM, check_token_ids


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """max_new_tokens; eos_token_ids (stop ids, may be empty); temperature 0 = greedy; top_p in (0, 1];
    cache_capacity: KV slots (default: prompt length + max_new_tokens rounded up to a multiple of 128)."""

    max_new_tokens: int = 32
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    cache_capacity: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    """tokens [B, max_new_tokens] int32 (pad after EOS); num_generated [B] (tokens up to and including EOS);
    cache: the final KV cache when ``decode(..., return_cache=True)``, else None."""

    tokens: jax.Array
    num_generated: jax.Array
    cache: KVCache | None = None


def validate_prompts(model: Qwen2ForCausalLM, ids: np.ndarray, mask: np.ndarray, config: GenerationConfig) -> int:
    """Host-side checks of left-padded prompts (ids / mask [B, L] numpy); returns the KV cache capacity to use."""
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    check_token_ids(ids, model.config.vocab_size)
    mask = mask.astype(bool)
    if not mask[:, -1].all() or (np.diff(mask.astype(np.int8), axis=1) < 0).any():
        raise ValueError("prompts must be left-padded: each attention_mask row must be 0...0 1...1 ending in a token")
    length = ids.shape[1]
    needed = length + config.max_new_tokens
    capacity = config.cache_capacity or -(-needed // 128) * 128
    if needed > capacity:
        raise ValueError(
            f"prompt of {length} tokens + max_new_tokens={config.max_new_tokens} = {needed} slots "
            f"exceeds the KV cache capacity of {capacity}"
        )
    if needed > model.config.max_position_embeddings:
        raise ValueError(
            f"prompt of {length} tokens + {config.max_new_tokens} new tokens exceeds "
            f"max_position_embeddings={model.config.max_position_embeddings}"
        )
    return capacity


_validate = validate_prompts  # old private name, still imported by callers


def next_positions(positions: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """[B]: 1 + the largest position of each row's real tokens (positions [B, L] or [3, B, L])."""
    if positions.ndim == 3:
        positions = positions.max(axis=0)
    masked = jnp.where(attention_mask.astype(bool), positions, jnp.iinfo(jnp.int32).min)
    return masked.max(axis=-1).astype(jnp.int32) + 1


@functools.partial(jax.jit, static_argnames=("graphdef", "capacity"))
def prefill(graphdef, state, input_ids, attention_mask, positions, key, temperature, top_p, *, capacity: int):
    """Run the prompt through the model into a fresh cache; returns (first token [B], cache, next positions [B])."""
    model = nnx.merge(graphdef, state)
    cache = init_cache_for(model.config, input_ids.shape[0], capacity)
    out = model(input_ids, positions=positions, attention_mask=attention_mask, cache=cache, only_last_logits=True)
    token = sample_next(out.logits[:, 0], key, temperature, top_p)
    return token, out.cache, next_positions(positions, attention_mask)


def _decode(
    graphdef,
    state,
    cache: KVCache,
    first_token,
    position,
    key,
    temperature,
    top_p,
    *,
    max_new_tokens: int,
    eos_token_ids: tuple[int, ...],
    pad_token_id: int,
    suppress_token_ids: tuple[int, ...] = (),
    return_cache: bool = False,
    active: jax.Array | None = None,
    limit: jax.Array | None = None,
    row_suppress: jax.Array | None = None,
):
    """Feed ``first_token`` and decode until every row hit EOS or ``max_new_tokens`` tokens exist.

    ``suppress_token_ids`` are never sampled (their logits are -inf); ``return_cache`` also returns the final cache
    (finished rows' entries after their stop token are invalid), e.g. to continue a row in image mode.
    Optional per-row controls (to resume a decode in rounds): ``active`` [B] bool (inactive rows are finished from
    the start: no tokens, count 0, nothing valid written to the cache); ``limit`` [B] int: a row finishes once it has
    ``limit`` tokens (default ``max_new_tokens``); ``row_suppress`` [B, K] int: ids never sampled in that row (-1 =
    none; the first token is the caller's)."""
    model = nnx.merge(graphdef, state)
    b = first_token.shape[0]
    eos = jnp.asarray(eos_token_ids or (-1,), jnp.int32)
    active = jnp.ones((b,), bool) if active is None else active.astype(bool)
    first_token = jnp.where(active, first_token, pad_token_id)
    tokens = jnp.full((b, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(first_token)
    count = active.astype(jnp.int32)
    done = ~active | jnp.isin(first_token, eos)
    if limit is not None:
        done = done | (count >= limit)

    def cond(carry):
        step, _, _, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, tokens, cache, last, done, count, key = carry
        key, sub = jax.random.split(key)
        out = model(
            last[:, None], positions=(position + step - 1)[:, None], attention_mask=~done[:, None], cache=cache,
            only_last_logits=True,
        )
        logits = suppress_per_row(suppress_tokens(out.logits[:, 0], suppress_token_ids), row_suppress)
        nxt = sample_next(logits, sub, temperature, top_p)
        nxt = jnp.where(done, pad_token_id, nxt)
        tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, step))
        count = count + (~done).astype(jnp.int32)
        done = done | jnp.isin(nxt, eos)
        if limit is not None:
            done = done | (count >= limit)
        return step + 1, tokens, out.cache, nxt, done, count, key

    carry = (jnp.ones((), jnp.int32), tokens, cache, first_token, done, count, key)
    _, tokens, cache, _, _, count, _ = jax.lax.while_loop(cond, body, carry)
    return GenerationOutput(tokens, count, cache if return_cache else None)


# XLA:CPU hands plain f32 dots (and the elementwise ops fused with them) to YNNPACK, which repacks the weight matrix
# on every call. A decode step multiplies a few rows by every weight of the model, so at batch 16 its matmuls ran at
# 25 GFLOP/s on one core of the 2-core VM (weights streamed ~3x) against 63 with XLA's Eigen dot; large-M matmuls
# (prefill, DiT, training) are 2x faster with YNNPACK. So only the decode program, and only on CPU, is compiled with
# YNNPACK's dot / elementwise fusions off (its reductions kept): batch-16 decode step 40.4 -> 22.7 ms, batch 1 equal
# (1 thread, benchmarks/text_decoder.py config).
CPU_DECODE_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


class BackendTunedJit:
    """``jax.jit(fn)`` that compiles with extra XLA ``options`` when its array arguments live on ``platform``.

    Inside another trace (tracer arguments) the plain jit is used: the outer program's options apply. If this
    jaxlib does not know an option, the plain jit is used from then on (logged once)."""

    def __init__(self, fn, *, static_argnames: tuple[str, ...], platform: str, options: dict[str, str]):
        self._plain = jax.jit(fn, static_argnames=static_argnames)
        self._tuned = jax.jit(fn, static_argnames=static_argnames, compiler_options=options)
        self._platform, self._options, self._options_ok = platform, options, True
        functools.update_wrapper(self, fn)

    def _on_platform(self, args, kwargs) -> bool:
        for leaf in jax.tree.leaves((args, kwargs)):
            if isinstance(leaf, jax.Array):
                try:
                    return next(iter(leaf.devices())).platform == self._platform
                except Exception:  # a tracer: no devices
                    return False
        return jax.default_backend() == self._platform

    def __call__(self, *args, **kwargs):
        if self._options_ok and self._on_platform(args, kwargs):
            try:
                return self._tuned(*args, **kwargs)
            except jax.errors.JaxRuntimeError as exc:
                if "compile option" not in str(exc) and "valid enum value" not in str(exc):
                    raise
                self._options_ok = False
                logging.getLogger(__name__).warning("XLA options %s rejected (%s); compiling without them",
                                                    self._options, str(exc).splitlines()[0])
        return self._plain(*args, **kwargs)

    def lower(self, *args, **kwargs):
        jitted = self._tuned if self._options_ok and self._on_platform(args, kwargs) else self._plain
        return jitted.lower(*args, **kwargs)

    def _cache_size(self) -> int:
        return self._plain._cache_size() + self._tuned._cache_size()


DECODE_STATIC_ARGNAMES = ("graphdef", "max_new_tokens", "eos_token_ids", "pad_token_id", "suppress_token_ids",
                          "return_cache")
decode = BackendTunedJit(_decode, static_argnames=DECODE_STATIC_ARGNAMES, platform="cpu",
                         options=CPU_DECODE_COMPILER_OPTIONS)


def generate(
    model: Qwen2ForCausalLM,
    input_ids: jax.Array | np.ndarray,
    attention_mask: jax.Array | np.ndarray | None = None,
    *,
    config: GenerationConfig = GenerationConfig(),
    positions: jax.Array | np.ndarray | None = None,
    rng: jax.Array | None = None,
) -> GenerationOutput:
    """Generate up to ``config.max_new_tokens`` tokens after left-padded prompts input_ids [B, L].

    positions: prompt positions [B, L] or [3, B, L] (default: count of real tokens, so padding does not shift them).
    """
    ids = np.asarray(input_ids)
    mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask)
    capacity = validate_prompts(model, ids, mask, config)
    if positions is None:
        positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    rng = jax.random.key(0) if rng is None else rng
    key_prefill, key_decode = jax.random.split(rng)
    graphdef, state = nnx.split(model)
    temperature, top_p = jnp.float32(config.temperature), jnp.float32(config.top_p)
    ids, mask, positions = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), jnp.asarray(positions)
    first, cache, position = prefill(
        graphdef, state, ids, mask, positions, key_prefill, temperature, top_p, capacity=capacity
    )
    return decode(
        graphdef,
        state,
        cache,
        first,
        position,
        key_decode,
        temperature,
        top_p,
        max_new_tokens=config.max_new_tokens,
        eos_token_ids=tuple(config.eos_token_ids),
        pad_token_id=config.pad_token_id,
    )
