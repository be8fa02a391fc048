"""Meshes and the one table of logical-axis rules.

Model code names logical axes only ("embed", "mlp", ...); this file maps them onto the mesh.
"""

import math

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from research.errors import UserError

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
    # The model dim of activations [B, T, D]: replicated, so that FSDP's "embed" -> "fsdp"
    # shards only parameters (batch already uses the fsdp axis).
    ("act_embed", None),
)


def resolve_mesh_shape(shape, num_devices: int) -> tuple[int, ...]:
    """Fills one -1 entry of a (data, fsdp, tensor) shape with the remaining devices."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise UserError(
            f"train.mesh_shape={shape} must have {len(MESH_AXES)} entries, one per mesh axis "
            f"{MESH_AXES}."
        )
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise UserError(
            f"train.mesh_shape={shape}: use positive sizes and at most one -1 (the rest)."
        )
    known = math.prod(s for s in shape if s != -1)
    if num_devices % known:
        raise UserError(
            f"train.mesh_shape={shape} does not divide the {num_devices} available devices; "
            f"choose sizes whose product divides {num_devices}."
        )
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise UserError(
            f"train.mesh_shape={shape} uses {math.prod(shape)} devices but {num_devices} are "
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
    spec = fit_spec(logical_to_spec(logical_axes), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


def global_batch(mesh, local_batch: dict) -> dict:
    """Assembles per-host numpy batches into global jax.Arrays sharded over the batch axes."""
    return {
        name: jax.make_array_from_process_local_data(
            batch_sharding(mesh, np.ndim(value)), np.asarray(value)
        )
        for name, value in local_batch.items()
    }


def fit_spec(spec: PartitionSpec, shape, mesh) -> PartitionSpec:
    """Drops mesh axes from dimensions they do not divide (e.g. a vocab of 50257 over 2).

    Such a dimension is replicated instead of failing: correct, merely less memory-efficient.
    """
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = []
        for name in names:
            size = math.prod(mesh.shape[n] for n in kept) * mesh.shape[name]
            if dim % size == 0:
                kept.append(name)
        fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*fitted)


def fit_shardings(shardings, abstract_tree):
    """fit_spec for every NamedSharding in a tree against the matching abstract array.

    An empty node in abstract_tree where shardings has a leaf (optax's MaskedNode: no
    optimizer state for a frozen parameter) stays that empty node."""

    def fit(named, leaf):
        if not hasattr(leaf, "shape"):
            return leaf
        return NamedSharding(named.mesh, fit_spec(named.spec, leaf.shape, named.mesh))

    return jax.tree.map(fit, shardings, abstract_tree)
