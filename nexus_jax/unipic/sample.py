"""UniPic-1 masked-autoregressive sampling (unipic.md 3.1 text-to-image, 3.2 editing) with static shapes.

The batch is ``[cond (G rows) ; uncond (G rows)]``. The context (prompt, or source-image rows + instruction) is
prefilled once (:func:`nexus_jax.unipic.bridge.prefill_context`). Each of ``num_iter`` iterations runs one compiled
function (:func:`iteration`; the step index is traced; one compilation per LLM-segment bucket of
``SamplingConfig.visible_buckets``, at most buckets + 1):

    mask      = first remaining[k] entries of each row's order        (uncond rows share the cond orders)
    x_enc     = MAR encoder(tokens, mask) -> LLM bridge (visible rows gathered into the step's bucket) -> MAR decoder
                (mask_token, or decoder_embed(x_con)) = z
    to_pred   = mask XOR mask_next (all of mask at the last step), gathered into max_pred fixed slots per row
    tokens    = IDDPM head sample of z[to_pred] with in-head CFG (shared noise), scattered back; uncond copies cond

and the cond tokens are then decoded by the KL-16 VAE. Randomness is explicit: a PRNG key, or :class:`SampleNoise`
(orders plus the head's initial and per-step noise for every predicted slot) so a torch loop can be fed the same
numbers. A guided batch is always used (``cfg = 1`` reduces the guided eps to the cond eps).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.unipic import SamplingConfig
from nexus_jax.diffusion import gaussian, maskgit
from nexus_jax.models.vae.kl16 import decode_tokens
from nexus_jax.unipic import bridge as bridge_lib
from nexus_jax.unipic.prompts import PromptBatch
from nexus_jax.unipic.understand import image_embeds, visual_features


@dataclasses.dataclass(frozen=True)
class SampleNoise:
    """Externally supplied randomness for G images, P = the schedule's max_pred, S = head sampling steps.

    orders int [G, N]: generation order per image. init [num_iter, G, P, C]: the head's x_T for the j-th predicted
    token (raster order) of row g at step k; steps [num_iter, S, G, P, C]: its per-step noise (step i runs
    t = S - 1 - i). Slots j >= the step's count are unused.
    """

    orders: Any
    init: Any
    steps: Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepTables:
    """Per-iteration device tables [num_iter]: masked count before the step, after it, and the CFG scale."""

    remaining: jax.Array
    mask_len: jax.Array
    cfg: jax.Array


def step_tables(seq_len: int, sampling: SamplingConfig) -> tuple[StepTables, int]:
    """(tables, max_pred) of the MaskGIT cosine schedule for ``seq_len`` tokens."""
    sched = maskgit.mask_schedule(seq_len, sampling.num_iter)
    remaining = np.concatenate([[seq_len], sched.mask_len[:-1]]).astype(np.int32)
    cfg = sched.cfg_scales(sampling.cfg, sampling.cfg_schedule)
    tables = StepTables(jnp.asarray(remaining), jnp.asarray(sched.mask_len.astype(np.int32)), jnp.asarray(cfg))
    return tables, sched.max_pred


CAPACITY_MULTIPLE = 8  # LLM segment capacities are multiples of 8 image slots (TPU sublanes), capped at N


def bucket_capacities(counts: list[int], buckets: int, limit: int, multiple: int = CAPACITY_MULTIPLE) -> list[int]:
    """Per-entry capacity >= ``counts[i]`` from at most ``buckets`` distinct positive values (multiples of
    ``multiple``, at most ``limit``; a count of 0 gets 0) that minimise ``sum(capacities)``: an exact dynamic
    programme over the sorted distinct counts, O(buckets * m^2) for m distinct counts."""
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    if any(c < 0 or c > limit for c in counts):
        raise ValueError(f"counts must lie in [0, {limit}], got {counts}")
    values = sorted({c for c in counts if c > 0})
    if not values:
        return [0] * len(counts)
    size = [sum(1 for c in counts if c == v) for v in values]
    below = np.concatenate([[0], np.cumsum(size)])  # entries with counts <= values[j - 1]

    def rounded(v: int) -> int:
        return min(limit, -(-v // multiple) * multiple)

    m, inf = len(values), float("inf")
    cost = np.full((buckets + 1, m + 1), inf)  # cost[g, b]: the b smallest values served by g buckets
    cut = np.zeros((buckets + 1, m + 1), np.int64)
    cost[0, 0] = 0.0
    for g in range(1, buckets + 1):
        for b in range(1, m + 1):
            options = [cost[g - 1, a] + rounded(values[b - 1]) * (below[b] - below[a]) for a in range(b)]
            cut[g, b] = int(np.argmin(options))
            cost[g, b] = options[cut[g, b]]
    g, b, caps = int(np.argmin(cost[1:, m])) + 1, m, []
    while b > 0:
        caps.append(rounded(values[b - 1]))
        b, g = int(cut[g, b]), g - 1
    caps.sort()
    return [0 if c == 0 else next(cap for cap in caps if cap >= c) for c in counts]


def segment_capacities(seq_len: int, sampling: SamplingConfig) -> list[int | None]:
    """Per-step LLM segment capacity: None (all N image slots) with ``visible_buckets == 1``, else
    :func:`bucket_capacities` of the schedule's visible counts (at most ``visible_buckets`` shapes + the empty
    first step, the fewest image slots summed over the ``num_iter`` steps)."""
    if sampling.visible_buckets == 1:
        return [None] * sampling.num_iter
    visible = [int(v) for v in maskgit.mask_schedule(seq_len, sampling.num_iter).num_visible]
    return bucket_capacities(visible, sampling.visible_buckets, seq_len)


def _head_noise(init: jax.Array, steps: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cond-half noise init [G, P, C], steps [S, G, P, C] -> the head's [2GP, C] and [S, 2GP, C] (halves equal)."""
    g, p, c = init.shape
    noise = jnp.concatenate([init, init], axis=0).reshape(2 * g * p, c)
    step_noise = jnp.concatenate([steps, steps], axis=1).reshape(steps.shape[0], 2 * g * p, c)
    return noise, step_noise


def iteration_body(
    model: nnx.Module, tokens: jax.Array, orders: jax.Array, step: jax.Array, tables: StepTables,
    prefix: Any, ctx_mask: jax.Array, schedule: gaussian.Schedule, x_con: jax.Array | None,
    key: jax.Array | None, init_noise: jax.Array | None, step_noise: jax.Array | None,
    temperature: jax.Array | float, max_pred: int, visible_capacity: int | None = None,
) -> jax.Array:
    """One masked-AR iteration. tokens [2G, N, C] (uncond rows = cond rows), orders [2G, N] -> new tokens."""
    b, n, _ = tokens.shape
    g = b // 2
    mar = model.mar
    grid = (model.config.grid, model.config.grid)  # pos embeds resized from the trained grid (1024 px: 32 -> 64)
    if grid[0] * grid[1] != n:
        raise ValueError(f"{n} tokens do not form the config's {grid[0]}x{grid[1]} grid")
    mask = maskgit.mask_by_order(orders, tables.remaining[step])
    x_enc = mar.forward_mae_encoder(tokens, mask, mar.fake_class_embedding(b), grid, capacity=visible_capacity)
    x_enc = bridge_lib.bridge(model.llm, model.project_in, model.project_out, x_enc, ~mask, prefix, ctx_mask,
                              visible_capacity)
    z = mar.forward_mae_decoder(x_enc, mask, grid, x_con=x_con)
    mask_next = maskgit.mask_by_order(orders, tables.mask_len[step])
    last = step == tables.mask_len.shape[0] - 1
    to_pred = maskgit.tokens_to_predict(mask, mask_next, last)
    idx, valid = maskgit.gather_predicted(to_pred, max_pred)
    z_pred = maskgit.take_rows(z, idx).reshape(b * max_pred, z.shape[-1])
    if init_noise is not None:
        noise, steps_noise = _head_noise(init_noise, step_noise)
        kw = dict(noise=noise, step_noise=steps_noise)
    else:
        kw = dict(key=key)
    sampled = gaussian.sample(mar.diffloss, schedule, z_pred, temperature=temperature, cfg_scale=tables.cfg[step],
                              guided=True, **kw)
    sampled = sampled.reshape(b, max_pred, -1)[:g].astype(tokens.dtype)
    cond = maskgit.put_rows(tokens[:g], sampled, idx[:g], valid[:g])
    return jnp.concatenate([cond, cond], axis=0)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_pred", "visible_capacity"))
def iteration(graphdef, state, tokens, orders, step, tables, prefix, ctx_mask, schedule, x_con, key, init_noise,
              step_noise, temperature, *, max_pred: int, visible_capacity: int | None = None):
    """Jitted :func:`iteration_body` on a split model (one compilation per visible-capacity bucket; the step index
    is traced)."""
    return iteration_body(nnx.merge(graphdef, state), tokens, orders, step, tables, prefix, ctx_mask, schedule, x_con,
                          key, init_noise, step_noise, temperature, max_pred, visible_capacity)


@functools.partial(jax.jit, static_argnames=("graphdef", "segment_len"))
def _prefill(graphdef, state, embeds, ctx_mask, *, segment_len: int):
    return bridge_lib.prefill_context(nnx.merge(graphdef, state).llm, embeds, ctx_mask, segment_len)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _text_embeds(graphdef, state, input_ids):
    return nnx.merge(graphdef, state).llm.model.embed_tokens(input_ids)


@functools.partial(jax.jit, static_argnames=("graphdef", "vae_graphdef", "image_id"))
def _edit_context(graphdef, state, vae_graphdef, vae_state, pixels, input_ids, *, image_id: int):
    model, vae = nnx.merge(graphdef, state), nnx.merge(vae_graphdef, vae_state)
    x_con, z_src = visual_features(model, vae, pixels)
    embeds = image_embeds(model, input_ids, jnp.concatenate([z_src, z_src], axis=0), image_id)
    return embeds, jnp.concatenate([x_con, x_con], axis=0)


@functools.partial(jax.jit, static_argnames=("vae_graphdef", "grid"))
def _decode(vae_graphdef, vae_state, tokens, *, grid: int):
    return decode_tokens(nnx.merge(vae_graphdef, vae_state), tokens, grid, grid)


@dataclasses.dataclass(frozen=True)
class SampleOutput:
    """tokens [G, N, C] (scaled VAE latents, raster order) and pixels [G, R, R, 3] in about [-1, 1] (not clipped)."""

    tokens: jax.Array
    pixels: jax.Array


def sample_from_context(
    model: nnx.Module, vae: nnx.Module, embeds: jax.Array, ctx_mask: jax.Array, *, x_con: jax.Array | None = None,
    sampling: SamplingConfig | None = None, key: jax.Array | None = None, noise: SampleNoise | None = None,
) -> SampleOutput:
    """The loop of unipic.md 3.1 on a prepared context: embeds [2G, L, D] right-padded [cond ; uncond] rows,
    ctx_mask [2G, L]; x_con [2G, buffers + N, C] for editing. Pass exactly one of ``key`` and ``noise``."""
    cfg = model.config
    sampling = sampling or cfg.sampling
    if (key is None) == (noise is None):
        raise ValueError("pass exactly one of key (random sampling) or noise (externally supplied randomness)")
    b = embeds.shape[0]
    if b % 2 or embeds.shape[:2] != ctx_mask.shape:
        raise ValueError(f"need an even [cond; uncond] batch with matching mask, got {embeds.shape}, {ctx_mask.shape}")
    g, n, c = b // 2, cfg.seq_len, cfg.mar.token_embed_dim
    tables, max_pred = step_tables(n, sampling)
    capacities = segment_capacities(n, sampling)
    schedule = gaussian.make_schedule(cfg.diffusion)
    if noise is not None:
        orders = jnp.asarray(noise.orders, jnp.int32)
        want = {"orders": (g, n), "init": (sampling.num_iter, g, max_pred, c),
                "steps": (sampling.num_iter, schedule.num_steps, g, max_pred, c)}
        for name, shape in want.items():
            if tuple(np.shape(getattr(noise, name))) != shape:
                raise ValueError(f"noise.{name} must have shape {shape}, got {tuple(np.shape(getattr(noise, name)))}")
        orders = jnp.concatenate([orders, orders], axis=0)
    else:
        key, k_orders = jax.random.split(key)
        orders = maskgit.random_orders(k_orders, b, n, guided=True)
    graphdef, state = nnx.split(model)
    ctx_mask = jnp.asarray(ctx_mask, jnp.int32)
    prefix = _prefill(graphdef, state, embeds, ctx_mask, segment_len=n + cfg.mar.buffer_size)
    tokens = jnp.zeros((b, n, c), jnp.float32)
    temperature = jnp.float32(sampling.temperature)
    for k in range(sampling.num_iter):
        step = jnp.int32(k)
        if noise is not None:
            rand = (None, jnp.asarray(noise.init[k], jnp.float32), jnp.asarray(noise.steps[k], jnp.float32))
        else:
            rand = (jax.random.fold_in(key, k), None, None)
        tokens = iteration(graphdef, state, tokens, orders, step, tables, prefix, ctx_mask, schedule, x_con, *rand,
                           temperature, max_pred=max_pred, visible_capacity=capacities[k])
    vae_graphdef, vae_state = nnx.split(vae)
    pixels = _decode(vae_graphdef, vae_state, tokens[:g], grid=cfg.grid)
    return SampleOutput(tokens[:g], pixels)


def text_to_image(
    model: nnx.Module, vae: nnx.Module, batch: PromptBatch, *, sampling: SamplingConfig | None = None,
    key: jax.Array | None = None, noise: SampleNoise | None = None,
) -> SampleOutput:
    """Images for a ``prompts.text_to_image_batch`` (rows [cond ; uncond])."""
    graphdef, state = nnx.split(model)
    embeds = _text_embeds(graphdef, state, jnp.asarray(batch.input_ids))
    return sample_from_context(model, vae, embeds, jnp.asarray(batch.attention_mask), sampling=sampling, key=key,
                               noise=noise)


def edit(
    model: nnx.Module, vae: nnx.Module, batch: PromptBatch, source: jax.Array | np.ndarray, *,
    sampling: SamplingConfig | None = None, key: jax.Array | None = None, noise: SampleNoise | None = None,
) -> SampleOutput:
    """Edited images: source pixels [G, R, R, 3] in [-1, 1] (R = the config's resolution) and a
    ``prompts.editing_batch`` of 2G rows. The source conditions twice: its ``z_src`` rows fill the ``<image>`` ids
    of both halves and its unmasked MAR encoding ``x_con`` fills the decoder's masked slots."""
    cfg = model.config
    source = jnp.asarray(source, jnp.float32)
    g = batch.input_ids.shape[0] // 2
    if source.shape != (g, cfg.resolution, cfg.resolution, 3):
        raise ValueError(f"source must be [G={g}, {cfg.resolution}, {cfg.resolution}, 3], got {source.shape}")
    graphdef, state = nnx.split(model)
    vae_graphdef, vae_state = nnx.split(vae)
    embeds, x_con = _edit_context(graphdef, state, vae_graphdef, vae_state, source, jnp.asarray(batch.input_ids),
                                  image_id=cfg.tokens.image)
    return sample_from_context(model, vae, embeds, jnp.asarray(batch.attention_mask), x_con=x_con,
                               sampling=sampling, key=key, noise=noise)
