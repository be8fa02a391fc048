"""Meshes and the one table of logical-axis rules.

Model code names logical axes only ("embed", "mlp", ...); this file maps them onto the mesh.
"""

import math

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# Auto axes: logical rules + FSDP fail on Explicit axes (jax.make_mesh's default now).
AUTO3 = (AxisType.Auto,) * 3

RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("seq", None),
    ("head_dim", None),
    ("layers", None),
)


def resolve_mesh_shape(shape, num_devices: int) -> tuple[int, ...]:
    """Fills one -1 entry of a (data, fsdp, tensor) shape with the remaining devices."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(
            f"mesh shape {shape} must have {len(MESH_AXES)} entries, one per axis {MESH_AXES}."
        )
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: use positive sizes and at most one -1.")
    known = math.prod(s for s in shape if s != -1)
    if num_devices % known:
        raise ValueError(
            f"mesh shape {shape} does not divide the {num_devices} available devices; "
            f"choose sizes whose product divides {num_devices}."
        )
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh shape {shape} uses {math.prod(shape)} devices but {num_devices} are "
            f"available; use -1 for one axis to take the rest."
        )
    return shape


def make_mesh(shape=(-1, 1, 1), devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), -1 meaning "the rest"."""
    devices = jax.devices() if devices is None else devices
    shape = resolve_mesh_shape(shape, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=AUTO3, devices=devices)


def logical_to_spec(logical_axes, rules=RULES) -> PartitionSpec:
    """PartitionSpec for a tuple of logical axis names (None = replicated)."""
    table = dict(rules)
    return PartitionSpec(*(table.get(name) if name else None for name in logical_axes))


def named_sharding(mesh, logical_axes, rules=RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules))


def batch_sharding(mesh, rank: int = 2) -> NamedSharding:
    """Batch arrays [B, T, ...]: B over (data, fsdp), the rest replicated."""
    return named_sharding(mesh, ("batch",) + (None,) * (rank - 1))


def constrain(x, logical_axes):
    """Sharding constraint by logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes))


def global_batch(mesh, local_batch: dict) -> dict:
    """Assembles per-host numpy batches into global jax.Arrays sharded over the batch axes."""
    return {
        name: jax.make_array_from_process_local_data(
            batch_sharding(mesh, np.ndim(value)), np.asarray(value)
        )
        for name, value in local_batch.items()
    }
