"""Device-mesh shape of a job (plain data; nexus_jax.sharding.mesh_from_config builds the Mesh)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape over the ``(data, fsdp, tensor)`` axes; one entry may be -1 (the rest of the devices)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
