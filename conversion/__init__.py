"""Checkpoint conversion PyTorch <-> JAX/Orbax: declarative mapping tables (``engine``, ``tables``), streaming I/O
(``io``, ``orbax``), key-scheme detection (``schemes``), model families (``families``), end-to-end conversions
(``pipeline``) and the ``nexus-jax convert`` CLI (``cli``). See docs/conversion.md."""
