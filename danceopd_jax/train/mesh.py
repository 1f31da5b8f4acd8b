"""The device mesh, the sharding rules, and where every array lives.

The mesh has three named axes: "data" (pure data parallelism), "fsdp" (data parallelism whose
devices also split the parameters and optimizer state) and "tensor" (splits heads and MLP
width). The batch is split over data x fsdp; parameters are placed by ONE rules table that maps
the logical axis names every backbone parameter carries ("embed", "heads", "mlp", ...) to mesh
axes. The jitted steps take these shardings as explicit in/out shardings and never depend on
the mesh's size, so a one-device run and a pod run are the same program.

Batch shards: the global batch is laid out shard-major, B = shards x local, where shard i is
the i-th block of B/shards rows and lives on the i-th data x fsdp position. Routing slots tile
each shard's rows (core.routing), so every teacher runs on its own samples inside each shard
and no step ever gathers the batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Logical parameter axis -> mesh axis. A logical name not listed (or None) is replicated.
RULES: dict[str, str | None] = {
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "lora_rank": "fsdp",  # a LoRA factor's rank axis, used where its other axis is not split
}


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolve config sizes (one of them may be -1: "the rest") to a full mesh shape."""
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh axes {unknown} are unknown; use {MESH_AXES}.")
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    rest = [i for i, s in enumerate(shape) if s == -1]
    if len(rest) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, shape, strict=True))}: each must be "
                         "a positive size, and at most one may be -1 (the rest of the devices).")
    fixed = math.prod(s for s in shape if s != -1)
    if rest:
        if num_devices % fixed:
            raise ValueError(f"mesh sizes {dict(sizes)} do not divide the {num_devices} "
                             "devices; make the fixed sizes divide the device count.")
        shape[rest[0]] = num_devices // fixed
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape, strict=True))} needs "
                         f"{math.prod(shape)} devices but {num_devices} are available; set one "
                         "axis to -1 to use the rest.")
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int] | None = None,
              devices: list[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: every device of every
    process)."""
    devices = devices or jax.devices()
    shape = mesh_shape(sizes or {"data": -1}, len(devices))
    # Auto axes: shardings are declared on the step's inputs/outputs and propagated inside.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def batch_shards(mesh: Mesh) -> int:
    """How many shards the batch is split into (the data x fsdp positions)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batches_sharding(mesh: Mesh) -> NamedSharding:
    """Consecutive steps' batches stacked on a leading (step) axis: each step's rows split as
    batch_sharding's."""
    return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))


def logical_sharding(mesh: Mesh, logical: PartitionSpec, shape: tuple[int, ...]) -> NamedSharding:
    """The rules table applied to one parameter. A dimension stays replicated when its mesh
    axis does not divide it (e.g. a 3-channel patch kernel on an 8-way fsdp axis) or already
    splits an earlier dimension (an ("embed", "embed") kernel is split once)."""
    names = tuple(logical) + (None,) * (len(shape) - len(logical))
    spec: list[str | None] = []
    for name, dim in zip(names, shape, strict=True):
        axis = RULES.get(name) if name else None
        usable = axis and axis not in spec and mesh.shape[axis] > 1 and dim % mesh.shape[axis] == 0
        spec.append(axis if usable else None)
    return NamedSharding(mesh, PartitionSpec(*spec))


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def param_shardings(mesh: Mesh, axes: Any, params: Any) -> Any:
    """Shardings for a params tree from its logical-axes tree (same structure, PartitionSpec
    leaves of logical names; Models carries them)."""
    return jax.tree.map(lambda a, p: logical_sharding(mesh, a, p.shape), axes, params,
                        is_leaf=_is_spec)


def state_shardings(mesh: Mesh, state: Any, trainable: Any,
                    optimizer: optax.GradientTransformation) -> Any:
    """Shardings of a TrainState (abstract or real): optimizer moments follow the params they
    belong to, everything else (step, key, counts) is replicated."""
    rep = replicated(mesh)
    opt = optax.tree_map_params(optimizer, lambda _, s: s, state.opt_state, trainable,
                                transform_non_params=lambda _: rep)
    return state.replace(step=rep, key=rep, trainable=trainable, opt_state=opt)


@dataclass(frozen=True)
class StepShardings:
    """Where a train call's (state, frozen, batches) inputs and (state, metrics) outputs live
    (batches and metrics stacked over the call's steps, train/step.consecutive)."""

    state: Any
    frozen: Any
    batches: NamedSharding
    metrics: NamedSharding

    @classmethod
    def create(cls, mesh: Mesh, state: Any, trainable_axes: Any, frozen: Any,
               frozen_axes: Any, optimizer: optax.GradientTransformation) -> StepShardings:
        trainable = param_shardings(mesh, trainable_axes, state.trainable)
        return cls(state=state_shardings(mesh, state, trainable, optimizer),
                   frozen=param_shardings(mesh, frozen_axes, frozen),
                   batches=batches_sharding(mesh), metrics=replicated(mesh))

    def jit_kwargs(self) -> dict:
        return {"in_shardings": (self.state, self.frozen, self.batches),
                "out_shardings": (self.state, self.metrics)}


def put(tree: Any, shardings: Any) -> Any:
    """Place host values (the same on every process) onto their shardings. Works with many
    processes, where a sharding spans devices this process cannot address.

    A value that occurs twice in the tree (a LoRA teacher's base is another teacher's params,
    models/lora.adapted) is placed once, so both share one copy on the devices."""
    placed: dict[tuple[int, NamedSharding], jax.Array] = {}

    def transfer(x: Any, s: NamedSharding) -> jax.Array:
        if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
            return jax.device_put(x, s)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

    def place(x: Any, s: NamedSharding) -> jax.Array:
        key = (id(x), s)  # every leaf stays alive in `tree`, so ids are not reused meanwhile
        if key not in placed:
            placed[key] = transfer(x, s)
        return placed[key]

    if isinstance(shardings, NamedSharding):
        return jax.tree.map(lambda x: place(x, shardings), tree)
    return jax.tree.map(place, tree, shardings)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    return put(tree, replicated(mesh))


def local_shards(mesh: Mesh) -> range:
    """The batch shards whose rows this process feeds (a contiguous range)."""
    n = batch_shards(mesh)
    index = batch_sharding(mesh).addressable_devices_indices_map((n,))
    starts = sorted({idx[0].start or 0 for idx in index.values()})
    if starts != list(range(starts[0], starts[0] + len(starts))):
        raise ValueError(f"this process feeds batch shards {starts}, which are not contiguous; "
                         "order the mesh so each process's devices are adjacent.")
    return range(starts[0], starts[-1] + 1)


def put_batches(local: Sequence[Any], mesh: Mesh) -> Any:
    """Assemble consecutive steps' global batches, stacked on a leading step axis, from this
    process's rows of each (those of local_shards(mesh))."""
    n, mine = batch_shards(mesh), len(local_shards(mesh))
    sharding = batches_sharding(mesh)

    def place(*steps: np.ndarray) -> jax.Array:
        rows = steps[0].shape[0]
        if rows % mine:
            raise ValueError(f"a local batch of {rows} rows does not split over this "
                             f"process's {mine} batch shards; make the batch size a multiple "
                             f"of the mesh's data x fsdp size ({n}).")
        x = np.stack(steps)
        return jax.make_array_from_process_local_data(
            sharding, x, (len(steps), rows // mine * n) + x.shape[2:])
    return jax.tree.map(place, *local)


def to_host(tree: Any) -> Any:
    """Full numpy values of (possibly sharded, multi-process) arrays, on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)
