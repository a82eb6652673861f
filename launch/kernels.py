"""What the TPU cost model cannot price: the work of Pallas (Mosaic) kernels in a planned program.

XLA's ``cost_analysis`` sees a Mosaic kernel as an opaque ``tpu_custom_call`` with (almost) no FLOPs, so a plan
compiled with the splash attention kernel would leave attention out of ``optimal_seconds``. The planner adds it
back as the kernel's own roofline: ``max(matmul FLOPs / peak, HBM bytes / bandwidth)``, divided by an assumed
efficiency (:data:`KERNEL_EFFICIENCY`, the fraction of that roofline the kernel reaches; there is no TPU here to
measure it). Reports give the MFU at other efficiencies too (:data:`SENSITIVITY`).

Splash (``jax.experimental.pallas.ops.tpu.splash_attention``, the non-fused backward it runs by default) works on
``block x block`` tiles; the static mask decides which it computes (causal: on or below the diagonal, whole
diagonal tiles; full: all). Per computed tile and head: forward ``q k^T`` and ``p v`` (2 matmuls); backward dq
kernel ``q k^T``, ``do v^T``, ``ds k`` (3) and dkv kernel ``q k^T``, ``p^T do``, ``do v^T``, ``ds^T q`` (4); each
``2 * block * block * head_dim`` FLOPs. HBM traffic: each of the three kernels (forward, dq, dkv) streams two
``block x head_dim`` operands per computed tile (k and v, or q and do) and reads / writes about four per row of tiles
(its own q / k / v and its outputs): ~``block`` FLOPs per byte (bf16), so 128-token tiles are bound by HBM on v6e
(peak over bandwidth 560) and near balance on v5p (166); ``nexus_jax.layers.splash_block`` picks up to 512.
"""

from __future__ import annotations

import dataclasses
import re

from nexus_jax import layers

# The assumed fraction of its roofline (max of FLOPs at peak, HBM bytes at bandwidth) a kernel reaches; not measured.
KERNEL_EFFICIENCY = 0.5
# Kernel efficiencies at which reports also give the estimated MFU (1.0 = the kernel at peak: an upper bound).
SENSITIVITY = (1.0, 0.5, 0.25)

SPLASH_FORWARD_MATMULS = 2
SPLASH_BACKWARD_MATMULS = 7

_CUSTOM_CALL_RE = re.compile(r'custom_call_target="tpu_custom_call"')


def count_custom_calls(hlo_text: str) -> int:
    """Mosaic kernel calls in an optimised HLO module's text."""
    return len(_CUSTOM_CALL_RE.findall(hlo_text))


@dataclasses.dataclass(frozen=True)
class KernelCost:
    """Per-device work of a program's kernels: matmul FLOPs and HBM bytes."""

    flops: float = 0.0
    hbm_bytes: float = 0.0

    def __add__(self, other: KernelCost) -> KernelCost:
        return KernelCost(self.flops + other.flops, self.hbm_bytes + other.hbm_bytes)

    def __mul__(self, k: float) -> KernelCost:
        return KernelCost(self.flops * k, self.hbm_bytes * k)

    __rmul__ = __mul__

    def roofline_seconds(self, peak_flops: float, hbm_bandwidth: float) -> float:
        """The kernels at the chip's peak: the slower of their matmuls and their HBM traffic."""
        return max(self.flops / peak_flops, self.hbm_bytes / hbm_bandwidth)

    def seconds(self, peak_flops: float, hbm_bandwidth: float, efficiency: float = KERNEL_EFFICIENCY) -> float:
        """Estimated seconds: the roofline divided by the fraction of it the kernels reach."""
        if not 0 < efficiency <= 1:
            raise ValueError(f"kernel efficiency must be in (0, 1], got {efficiency}")
        return self.roofline_seconds(peak_flops, hbm_bandwidth) / efficiency


def splash_cost(sequences: int, heads: int, length: int, head_dim: int, causal: bool, itemsize: int,
                forward_passes: int = 1, backward_passes: int = 0) -> KernelCost:
    """Splash attention over ``sequences`` x ``heads`` (query heads) of ``length`` tokens at the tile the kernel
    picks (``layers.splash_block``): ``forward_passes`` forward kernels (2 when remat recomputes the layer) and
    ``backward_passes`` backward passes (dq + dkv kernels); operands of ``itemsize`` bytes."""
    block = layers.splash_block(length, causal)
    tiles = layers.splash_tiles(length, block, causal)
    rows = -(-length // block)
    matmuls = SPLASH_FORWARD_MATMULS * forward_passes + SPLASH_BACKWARD_MATMULS * backward_passes
    kernel_runs = forward_passes + 2 * backward_passes
    operand = block * head_dim * itemsize
    units = sequences * heads
    return KernelCost(flops=float(units * tiles * matmuls * 2 * block * block * head_dim),
                      hbm_bytes=float(units * kernel_runs * (2 * tiles + 4 * rows) * operand))
