"""TrainState: a pytree of the step, the parameters and the optimizer state."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from research import sharding
from research.model import Decoder, ModelConfig


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far.
    params: Any  # nnx.State of nnx.Param.
    opt_state: Any


def abstract_model(model_config: ModelConfig, seed: int = 0):
    """(graphdef, abstract params) without allocating: shapes, dtypes and sharding metadata."""
    with nnx.logical_axis_rules(sharding.RULES):
        model = nnx.eval_shape(lambda: Decoder(model_config, rngs=nnx.Rngs(seed)))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


def state_shardings(mesh, model_config: ModelConfig, tx: optax.GradientTransformation):
    """NamedShardings of every TrainState leaf, from the logical axes of each parameter."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
        _, params = abstract_model(model_config)
        abstract = TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32),
            params=params,
            opt_state=jax.eval_shape(tx.init, params),
        )
        return sharding.fit_shardings(nnx.get_named_sharding(abstract, mesh), abstract)


def init_train_state(mesh, model_config: ModelConfig, tx, seed: int):
    """Initializes the state directly into its shardings (parameters are born sharded).

    Returns (graphdef, state, shardings).
    """
    shardings = state_shardings(mesh, model_config, tx)
    graphdef, _ = abstract_model(model_config, seed)

    def init():
        model = Decoder(model_config, rngs=nnx.Rngs(seed))
        params = nnx.state(model, nnx.Param)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
        state = jax.jit(init, out_shardings=shardings)()
    return graphdef, state, shardings
