"""IDDPM Gaussian diffusion for the UniPic-1 / MAR per-token head, as pure functions.

Conventions (improved-diffusion / DiT / MAR ``diffusion/``): betas from a continuous alpha-bar (cosine, capped at
``max_beta``), respaced by keeping evenly spaced steps and recomputing betas from alpha-bar; the net sees the
ORIGINAL timestep index (``timestep_map``); eps prediction; LEARNED_RANGE variance (the second half of the output,
in [-1, 1], interpolates between the clipped posterior and the beta log-variance) or FIXED_LARGE; no x0 clipping.
Tables are computed on the host in float64 and cast to float32 (as ``_extract_into_tensor`` does); token arrays
are ``[M, C]`` rows with per-row integer timesteps ``t [M]`` in respaced units.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from configs.unipic_diffusion import GaussianDiffusionConfig

TABLES = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "log_betas",
    "fixed_large_variance", "fixed_large_log_variance",
)

Head = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


# ----------------------------------------------------------------------------------------------- host-side tables
def cosine_alpha_bar(t: float) -> float:
    """IDDPM cosine schedule: ``cos((t + 0.008) / 1.008 * pi / 2) ** 2`` for t in [0, 1]."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def betas_for_alpha_bar(num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float) -> np.ndarray:
    """``beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta)``. [T] float64."""
    return np.array([min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
                     for i in range(num_timesteps)], dtype=np.float64)


def named_beta_schedule(name: str, num_timesteps: int, max_beta: float = 0.2) -> np.ndarray:
    """``"cosine"`` (capped at ``max_beta``) or Ho et al.'s ``"linear"`` scaled to ``num_timesteps``. [T] float64."""
    if name == "cosine":
        return betas_for_alpha_bar(num_timesteps, cosine_alpha_bar, max_beta)
    if name == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
    raise ValueError(f"unknown noise schedule {name!r}; expected 'cosine' or 'linear'")


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """IDDPM ``space_timesteps``: the sorted original steps to keep.

    ``section_counts``: "" (all steps), "100" (100 evenly spaced, rounded fractional stride), "10,15,20"
    (per equal section), or "ddimN" (integer stride giving exactly N steps).
    """
    if isinstance(section_counts, str):
        if section_counts == "":
            return list(range(num_timesteps))
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps out of {num_timesteps} with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    if not section_counts or any(c < 1 for c in section_counts):
        raise ValueError(f"section counts must be positive integers, got {section_counts}")
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


def schedule_tables(base_betas: np.ndarray, use_timesteps: Sequence[int]) -> dict[str, np.ndarray]:
    """Respaced ``GaussianDiffusion`` tables (float64, [S]) plus ``timestep_map`` (int64, respaced -> original)."""
    base_ac = np.cumprod(1.0 - np.asarray(base_betas, dtype=np.float64))
    keep, last, betas, tmap = set(use_timesteps), 1.0, [], []
    for i, ac in enumerate(base_ac):
        if i in keep:
            betas.append(1 - ac / last)
            last = ac
            tmap.append(i)
    b = np.array(betas, dtype=np.float64)
    if len(b) < 2:
        raise ValueError(f"a diffusion needs at least 2 steps, got {len(b)}")
    ac = np.cumprod(1.0 - b)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = b * (1.0 - ac_prev) / (1.0 - ac)
    fixed_large = np.append(post_var[1], b[1:])
    return {
        "betas": b, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac), "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1), "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.append(post_var[1], post_var[1:])),
        "posterior_mean_coef1": b * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac),
        "log_betas": np.log(b), "fixed_large_variance": fixed_large, "fixed_large_log_variance": np.log(fixed_large),
        "timestep_map": np.array(tmap, dtype=np.int64),
    }


@struct.dataclass
class Schedule:
    """Device tables (float32 [S]) of one (possibly respaced) diffusion; ``timestep_map`` int32 [S]."""

    betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    log_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    log_betas: jax.Array
    fixed_large_variance: jax.Array
    fixed_large_log_variance: jax.Array
    timestep_map: jax.Array
    learned_range: bool = struct.field(pytree_node=False, default=True)

    @property
    def num_steps(self) -> int:
        return int(self.betas.shape[0])


def make_schedule(cfg: GaussianDiffusionConfig, respacing: str | Sequence[int] | None = None) -> Schedule:
    """Schedule for ``respacing`` ("" = all ``num_timesteps`` for training; None = ``cfg.sampling_steps``)."""
    respacing = cfg.sampling_steps if respacing is None else respacing
    base = named_beta_schedule(cfg.noise_schedule, cfg.num_timesteps, cfg.max_beta)
    tables = schedule_tables(base, space_timesteps(cfg.num_timesteps, respacing))
    arrays = {k: jnp.asarray(tables[k].astype(np.float32)) for k in TABLES}
    return Schedule(**arrays, timestep_map=jnp.asarray(tables["timestep_map"], jnp.int32),
                    learned_range=cfg.learn_sigma)


def training_schedule(cfg: GaussianDiffusionConfig) -> Schedule:
    """All ``num_timesteps`` steps (``create_diffusion(timestep_respacing="")``)."""
    return make_schedule(cfg, "")


# ------------------------------------------------------------------------------------------------ per-step maths
def _at(table: jax.Array, t: jax.Array) -> jax.Array:
    """table[t] as a [M, 1] column (broadcasts over the channel axis)."""
    return table[t][:, None]


def q_sample(s: Schedule, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t ~ q(x_t | x_0): ``sqrt(ab) x0 + sqrt(1 - ab) noise``. [M, C]."""
    return _at(s.sqrt_alphas_cumprod, t) * x_start + _at(s.sqrt_one_minus_alphas_cumprod, t) * noise


def q_posterior_mean_variance(s: Schedule, x_start: jax.Array, x_t: jax.Array,
                              t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q(x_{t-1} | x_t, x_0): (mean [M, C], variance [M, 1], clipped log variance [M, 1])."""
    mean = _at(s.posterior_mean_coef1, t) * x_start + _at(s.posterior_mean_coef2, t) * x_t
    return mean, _at(s.posterior_variance, t), _at(s.posterior_log_variance_clipped, t)


def predict_xstart_from_eps(s: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """x0 = sqrt(1 / ab) x_t - sqrt(1 / ab - 1) eps. [M, C]."""
    return _at(s.sqrt_recip_alphas_cumprod, t) * x_t - _at(s.sqrt_recipm1_alphas_cumprod, t) * eps


def p_mean_variance(s: Schedule, model_output: jax.Array, x: jax.Array, t: jax.Array) -> dict[str, jax.Array]:
    """p(x_{t-1} | x_t) from the net's output [M, 2C] (LEARNED_RANGE) or [M, C] (FIXED_LARGE).

    Returns ``mean``, ``log_variance``, ``pred_xstart`` (each [M, C]) and ``eps``.
    """
    c = x.shape[-1]
    want = 2 * c if s.learned_range else c
    if model_output.shape != (x.shape[0], want):
        raise ValueError(f"model output must be [{x.shape[0]}, {want}] for x {x.shape}, got {model_output.shape}")
    eps = model_output[:, :c]
    if s.learned_range:
        min_log, max_log = _at(s.posterior_log_variance_clipped, t), _at(s.log_betas, t)
        frac = (model_output[:, c:] + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
    else:
        log_variance = jnp.broadcast_to(_at(s.fixed_large_log_variance, t), x.shape)
    pred_xstart = predict_xstart_from_eps(s, x, t, eps)
    mean, _, _ = q_posterior_mean_variance(s, pred_xstart, x, t)
    return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart, "eps": eps}


def model_output(head: Head, s: Schedule, x: jax.Array, t: jax.Array, z: jax.Array, cfg_scale: jax.Array | float = 1.0,
                 *, guided: bool = False) -> jax.Array:
    """The net at the original timesteps ``timestep_map[t]``; with ``guided`` the rows are [cond; uncond] halves.

    Guided (upstream ``forward_with_cfg``): both halves evaluate the COND half's x; ``eps_u + s (eps_c - eps_u)``
    replaces eps in both halves, each half keeps its own variance channels. x [B, C], t [B], z [B, Cz] -> [B, out].
    """
    ts = s.timestep_map[t]
    if not guided:
        return head(x, ts, z)
    b, c = x.shape
    if b % 2:
        raise ValueError(f"a guided batch stacks [cond; uncond] halves: need an even row count, got {b}")
    half = x[: b // 2]
    out = head(jnp.concatenate([half, half], axis=0), ts, z)
    cond_eps, uncond_eps = jnp.split(out[:, :c], 2, axis=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return jnp.concatenate([jnp.concatenate([half_eps, half_eps], axis=0), out[:, c:]], axis=1)


def p_sample_from_output(s: Schedule, out: jax.Array, x: jax.Array, t: jax.Array, noise: jax.Array,
                         temperature: jax.Array | float = 1.0) -> jax.Array:
    """``mean + 1[t > 0] exp(log_var / 2) noise * temperature``. [M, C]."""
    pm = p_mean_variance(s, out, x, t)
    nonzero = (t != 0).astype(x.dtype)[:, None]
    return pm["mean"] + nonzero * jnp.exp(0.5 * pm["log_variance"]) * noise * temperature


def p_sample_step(head: Head, s: Schedule, x: jax.Array, t: jax.Array, z: jax.Array, noise: jax.Array,
                  temperature: jax.Array | float = 1.0, cfg_scale: jax.Array | float = 1.0, *,
                  guided: bool = False) -> jax.Array:
    """One ancestral step x_t -> x_{t-1} (upstream ``p_sample``, ``clip_denoised=False``). x, noise [B, C]."""
    return p_sample_from_output(s, model_output(head, s, x, t, z, cfg_scale, guided=guided), x, t, noise, temperature)


def sample(head: Head, s: Schedule, z: jax.Array, *, key: jax.Array | None = None, noise: jax.Array | None = None,
           step_noise: jax.Array | None = None, temperature: jax.Array | float = 1.0,
           cfg_scale: jax.Array | float = 1.0, guided: bool = False, valid: jax.Array | None = None) -> jax.Array:
    """``p_sample_loop`` over all ``s.num_steps`` steps (lax.fori_loop). z [B, Cz] -> tokens [B, C].

    ``guided``: z rows are [cond; uncond] halves (row i pairs with i + B/2) and both halves start from the SAME
    x_T. Noise: ``noise`` [B, C] (x_T) and ``step_noise`` [S, B, C] (per step, step i runs t = S - 1 - i), or
    drawn from ``key`` (x_T from one half, then each step's noise from ``fold_in(key, i)``). Rows are independent
    except for the guided pairing, so padded rows are harmless; ``valid`` [B] zeroes them in the output.
    """
    b, c = z.shape[0], head.cfg.in_channels  # type: ignore[attr-defined]
    if guided and b % 2:
        raise ValueError(f"a guided batch stacks [cond; uncond] halves: need an even row count, got {b}")
    if noise is None or step_noise is None:
        if key is None:
            raise ValueError("pass a PRNG key, or both noise [B, C] and step_noise [S, B, C]")
        k_init, k_steps = jax.random.split(key)
    if noise is None:
        x_t = jax.random.normal(k_init, (b // 2 if guided else b, c), jnp.float32)
        noise = jnp.concatenate([x_t, x_t], axis=0) if guided else x_t
    if noise.shape != (b, c):
        raise ValueError(f"noise must be [{b}, {c}], got {noise.shape}")
    steps = s.num_steps
    if step_noise is not None and step_noise.shape != (steps, b, c):
        raise ValueError(f"step_noise must be [{steps}, {b}, {c}], got {step_noise.shape}")

    def body(i: jax.Array, x: jax.Array) -> jax.Array:
        eps = step_noise[i] if step_noise is not None else jax.random.normal(jax.random.fold_in(k_steps, i), (b, c))
        t = jnp.full((b,), steps - 1 - i, jnp.int32)
        return p_sample_step(head, s, x, t, z, eps, temperature, cfg_scale, guided=guided)

    x = jax.lax.fori_loop(0, steps, body, noise.astype(jnp.float32))
    if valid is not None:
        if valid.shape != (b,):
            raise ValueError(f"valid must be [{b}], got {valid.shape}")
        x = jnp.where(valid[:, None], x, 0.0)
    return x


sample_jit = nnx.jit(sample, static_argnames=("guided",))


# ------------------------------------------------------------------------------------------------------- training
def normal_kl(mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array) -> jax.Array:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    """tanh approximation of the standard normal CDF (as IDDPM)."""
    return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: jax.Array, means: jax.Array, log_scales: jax.Array) -> jax.Array:
    """IDDPM decoder log-likelihood with 1/255 bins on [-1, 1] (used as-is by MAR for latents). Elementwise, nats."""
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def training_losses(head: Head, s: Schedule, x_start: jax.Array, z: jax.Array, t: jax.Array,
                    noise: jax.Array) -> dict[str, jax.Array]:
    """Hybrid loss per row (LossType.MSE): ``mse`` of eps + ``vb`` (bits; learned variance only). Each [M].

    The VLB sees the eps half through stop_gradient (it trains only the variance); at t = 0 it is the decoder NLL,
    otherwise KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)).
    """
    x_t = q_sample(s, x_start, t, noise)
    out = head(x_t, s.timestep_map[t], z)
    c = x_start.shape[-1]
    mse = jnp.mean((noise - out[:, :c]) ** 2, axis=-1)
    if not s.learned_range:
        return {"loss": mse, "mse": mse}
    frozen = jnp.concatenate([jax.lax.stop_gradient(out[:, :c]), out[:, c:]], axis=1)
    true_mean, _, true_logvar = q_posterior_mean_variance(s, x_start, x_t, t)
    pm = p_mean_variance(s, frozen, x_t, t)
    kl = jnp.mean(normal_kl(true_mean, true_logvar, pm["mean"], pm["log_variance"]), axis=-1) / np.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x_start, pm["mean"], 0.5 * pm["log_variance"])
    nll = jnp.mean(nll, axis=-1) / np.log(2.0)
    vb = jnp.where(t == 0, nll, kl)
    return {"loss": mse + vb, "mse": mse, "vb": vb}


def diffusion_loss(head: Head, s: Schedule, target: jax.Array, z: jax.Array, *, key: jax.Array | None = None,
                   mask: jax.Array | None = None, batch_mul: int = 4, t: jax.Array | None = None,
                   noise: jax.Array | None = None) -> jax.Array:
    """MAR ``forward_loss`` + ``DiffLoss``: tile target [M, C], z [M, Cz], mask [M] ``batch_mul`` times, draw
    t [batch_mul M] uniformly over the steps and noise [batch_mul M, C] (or pass them), return the mask-weighted
    mean of the per-row hybrid loss (the plain mean without a mask; 0 when the mask is empty). Scalar.
    """
    if target.ndim != 2 or z.ndim != 2 or z.shape[0] != target.shape[0]:
        raise ValueError(f"target must be [M, C] and z [M, Cz] with the same M, got {target.shape} and {z.shape}")
    rows = batch_mul * target.shape[0]
    if t is None or noise is None:
        if key is None:
            raise ValueError("pass a PRNG key, or both t and noise")
        k_t, k_n = jax.random.split(key)
        t = jax.random.randint(k_t, (rows,), 0, s.num_steps) if t is None else t
        noise = jax.random.normal(k_n, (rows, target.shape[1]), jnp.float32) if noise is None else noise
    if t.shape != (rows,) or noise.shape != (rows, target.shape[1]):
        raise ValueError(f"t must be [{rows}] and noise [{rows}, {target.shape[1]}], got {t.shape}, {noise.shape}")
    tile = (batch_mul, 1)
    loss = training_losses(head, s, jnp.tile(target, tile), jnp.tile(z, tile), t, noise)["loss"]
    if mask is None:
        return jnp.mean(loss)
    if mask.shape != (target.shape[0],):
        raise ValueError(f"mask must be [{target.shape[0]}], got {mask.shape}")
    w = jnp.tile(mask.astype(loss.dtype), batch_mul)
    return jnp.sum(loss * w) / jnp.maximum(jnp.sum(w), 1e-12)
