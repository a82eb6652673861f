"""nexus-jax: Nexus-Gen (unified understanding, generation and editing) in JAX / Flax NNX."""

__version__ = "0.1.0"

# Before anything imports JAX's backends: no libtpu error block on machines without a TPU (see tpu_env).
from nexus_jax.tpu_env import quiet_libtpu_without_tpu as _quiet_libtpu_without_tpu  # noqa: E402

_quiet_libtpu_without_tpu()
