"""MAR / MaskGIT iterative-decoding schedule (UniPic-1 ``sample``) and MAR training masks, as pure functions.

Sampling: start fully masked; after step k (of ``num_iter``) ``mask_len_k = floor(N cos(pi/2 (k+1)/num_iter))``
tokens stay masked, clipped to [1, remaining - 1]; the masked set is always the first ``mask_len`` entries of a
per-sample random order (the uncond CFG half copies the cond orders). Step k predicts ``mask XOR mask_next`` (all
remaining tokens at the last step). Every count depends only on (N, num_iter), so the tables are host numpy.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from configs.unipic import CFG_SCHEDULES  # noqa: F401  (one definition, in the plain-data config)
from nexus_jax.models.rows import gather_predicted, put_rows, take_rows  # noqa: F401  (pure row helpers)


@dataclasses.dataclass(frozen=True)
class MaskSchedule:
    """Per-step host tables for N tokens and ``num_iter`` steps (each int64 [num_iter]).

    ``mask_len[k]``: tokens still masked after step k (upstream's clipped ``mask_len``; also at the last step);
    ``num_pred[k]``: tokens predicted at step k; ``num_visible[k]``: tokens visible to the encoder at step k.
    """

    seq_len: int
    num_iter: int
    mask_len: np.ndarray
    num_pred: np.ndarray
    num_visible: np.ndarray

    @property
    def max_pred(self) -> int:
        return int(self.num_pred.max())

    def cfg_scales(self, cfg: float, schedule: str = "constant") -> np.ndarray:
        """Per-step guidance scales [num_iter] float32 (see :func:`cfg_scale`)."""
        return np.array([cfg_scale(cfg, schedule, int(m), self.seq_len) for m in self.mask_len], dtype=np.float32)


def mask_schedule(seq_len: int, num_iter: int) -> MaskSchedule:
    """The MaskGIT cosine schedule's counts (UniPic ``sample``: N=4096, 32 iters -> 5, 15, 25, ..., max 201)."""
    if seq_len < 1 or num_iter < 1:
        raise ValueError(f"seq_len and num_iter must be >= 1, got {seq_len}, {num_iter}")
    remaining, lens, preds, visible = seq_len, [], [], []
    for step in range(num_iter):
        ml = int(np.floor(seq_len * np.cos(math.pi / 2.0 * (step + 1) / num_iter)))
        ml = max(1, min(remaining - 1, ml))
        visible.append(seq_len - remaining)
        preds.append(remaining if step == num_iter - 1 else remaining - ml)
        lens.append(ml)
        remaining = ml
    return MaskSchedule(seq_len, num_iter, np.array(lens, np.int64), np.array(preds, np.int64),
                        np.array(visible, np.int64))


def cfg_scale(cfg: float, schedule: str, mask_len: int, seq_len: int) -> float:
    """Guidance at a step: ``"constant"`` -> cfg; ``"linear"`` (Muse) -> ``1 + (cfg - 1)(N - mask_len) / N``.

    Computed in float32 in upstream's operation order.
    """
    if schedule == "constant":
        return float(cfg)
    if schedule == "linear":
        m, n = np.float32(mask_len), np.float32(seq_len)
        return float(np.float32(1) + np.float32(cfg - 1) * (n - m) / n)
    raise ValueError(f"cfg_schedule={schedule!r} is not implemented (upstream raises for it too); use one of "
                     f"{CFG_SCHEDULES}")


def random_orders(key: jax.Array, batch: int, seq_len: int, *, guided: bool = False) -> jax.Array:
    """Per-sample random permutations [batch, N] int32; ``guided``: rows [cond; uncond], uncond copies cond."""
    if guided and batch % 2:
        raise ValueError(f"a guided batch stacks [cond; uncond] halves: need an even batch, got {batch}")
    n = batch // 2 if guided else batch
    orders = jax.vmap(lambda k: jax.random.permutation(k, seq_len))(jax.random.split(key, n)).astype(jnp.int32)
    return jnp.concatenate([orders, orders], axis=0) if guided else orders


def mask_by_order(orders: jax.Array, mask_len: jax.Array | int) -> jax.Array:
    """True where a token is among the first ``mask_len`` entries of its row's order. orders [B, N] -> bool [B, N].

    ``mask_len`` may be traced.
    """
    ranks = jnp.argsort(orders, axis=-1)  # ranks[b, p] = index of position p in the order
    return ranks < mask_len


def tokens_to_predict(mask: jax.Array, mask_next: jax.Array, last: jax.Array | bool) -> jax.Array:
    """bool [B, N]: ``mask & ~mask_next`` (the newly revealed tokens), or all of ``mask`` at the last step."""
    mask, mask_next = mask.astype(bool), mask_next.astype(bool)
    return jnp.where(last, mask, jnp.logical_xor(mask, mask_next))


def sample_mask_ratio(key: jax.Array, min_ratio: float = 0.7, std: float = 0.25) -> jax.Array:
    """MAR training mask ratio: normal(1.0, std) truncated to [min_ratio, 1.0]. Scalar float32."""
    if not 0.0 <= min_ratio < 1.0:
        raise ValueError(f"min_ratio must be in [0, 1), got {min_ratio}")
    return 1.0 + std * jax.random.truncated_normal(key, (min_ratio - 1.0) / std, 0.0, (), jnp.float32)


def training_mask(key: jax.Array, batch: int, seq_len: int, min_ratio: float = 0.7) -> tuple[jax.Array, jax.Array]:
    """MAR ``random_masking``: one ratio r per batch, ``ceil(N r)`` tokens masked along per-sample random orders.

    Returns (mask float32 [B, N] with 1 = masked, orders int32 [B, N]).
    """
    k_ratio, k_order = jax.random.split(key)
    orders = random_orders(k_order, batch, seq_len)
    num_masked = jnp.ceil(seq_len * sample_mask_ratio(k_ratio, min_ratio)).astype(jnp.int32)
    return mask_by_order(orders, num_masked).astype(jnp.float32), orders
