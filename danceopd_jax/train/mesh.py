"""The device mesh and where arrays live on it.

The step is written for a mesh from the start: the batch is split over the "data" axis and
parameters are replicated. A one-device mesh is the default; widening it changes only this
file's placements, never the step.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec


def make_mesh(data: int = -1) -> Mesh:
    """A 1-D ("data",) mesh over `data` devices (-1 = all local devices)."""
    n = jax.device_count() if data == -1 else data
    if n < 1 or n > jax.device_count():
        raise ValueError(
            f"mesh.data={data} asks for {n} devices but {jax.device_count()} are available; use "
            "-1 for all of them.")
    # Auto axes: shardings are declared on inputs/outputs and propagated by the compiler.
    return jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:n])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec("data"))


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, replicated(mesh))


def put_batch(batch: Any, mesh: Mesh) -> Any:
    """Place a host batch split along its leading axis over the data axis."""
    n = mesh.shape["data"]
    for x in jax.tree.leaves(batch):
        if x.shape[0] % n:
            raise ValueError(
                f"a batch of {x.shape[0]} does not split over {n} data-parallel devices; make "
                "the batch size a multiple of the mesh's data axis.")
    return jax.device_put(batch, batch_sharded(mesh))
