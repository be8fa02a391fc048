"""How every model parameter is made: float32, with logical axis names for sharding."""

import jax
import jax.numpy as jnp
from flax import nnx


def param(
    init: nnx.Initializer,
    shape: tuple[int, ...],
    logical_axes: tuple[str | None, ...],
    *,
    rngs: nnx.Rngs,
    dtype=jnp.float32,
    kind: type = nnx.Param,
) -> nnx.Param:
    """An nnx.Param of `shape` (float32 unless quantized) whose axes are named `logical_axes`.

    Under `jax.set_mesh(mesh)` + `nnx.logical_axis_rules(RULES)` it is born sharded by the
    rules; without a mesh it is a plain single-device array (tests, eval_shape, one device)
    that still carries the names, so `nnx.get_partition_spec` works on it later.
    kind: the Param subclass (nnx.LoRAParam for adapters).
    """
    init = nnx.with_partitioning(init, tuple(logical_axes))
    value = init(rngs.params(), tuple(shape), dtype)
    return kind(value, eager_sharding=not jax.sharding.get_abstract_mesh().empty)
