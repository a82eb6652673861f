"""The main job's tiny checkpoint, built in upstream's PyTorch layout and converted, for tests that need one."""

from __future__ import annotations

from pathlib import Path

from nexus_jax import main_job


def converted_default_checkpoint(work: Path, seed: int) -> Path:
    """Build ``work/default_checkpoint`` (random weights, ``seed``) and convert it to ``work/converted``
    (ar/, generation_decoder/, edit_decoder/, vae/, empty prompt, tokenizer pointer); returns the converted dir."""
    main_job.build_checkpoint(work / "default_checkpoint", seed=seed)
    assert main_job.convert(work / "default_checkpoint", work / "converted") == 0
    return work / "converted"
