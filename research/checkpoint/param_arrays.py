"""Model parameters as a flat {path: numpy array} dict, and back into an nnx.State.

A path is the tuple of attribute names and list indices of a parameter in `Decoder`, e.g.
("layers", 0, "attention", "q_proj", "kernel"). Importers fill such a dict; `from_flat` checks
it against the shapes `Decoder(model_config)` would have and returns the nnx.State that
`nnx.merge(graphdef, state)`, `train(init_params=...)` and Orbax take.
"""

import jax
import numpy as np
from flax import nnx

from research import sharding
from research.errors import UserError
from research.model import ModelConfig


def to_flat(params) -> dict[tuple, np.ndarray]:
    """{path: float32 numpy array} of an nnx.State of parameters (on any devices) or of its
    pure dict (what `lora.merge` returns)."""
    if isinstance(params, dict):
        params = nnx.State(params)
    flat = {}
    for path, leaf in nnx.to_flat_state(params):
        value = leaf[...] if isinstance(leaf, nnx.Variable) else leaf
        flat[tuple(path)] = np.asarray(jax.device_get(value), dtype=np.float32)
    return flat


def from_flat(model_config: ModelConfig, flat: dict, *, missing_bias_is_zero: bool = False):
    """The nnx.State of `Decoder(model_config)`'s parameters holding the arrays of `flat`.

    Each leaf keeps its logical-axis metadata, so shardings derive from it as from a freshly
    initialised model. With `missing_bias_is_zero`, a bias the dict lacks is zeros (a source
    format without that bias computes the same function). Raises UserError on a missing,
    extra or wrongly shaped array.
    """
    from research.train.state import abstract_model  # research.train imports checkpoint.

    # Built under a mesh, as the training state and `load_model`'s parameters are, so that the
    # leaves' metadata matches theirs (jax.device_put onto their shardings needs equal trees).
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
        _, abstract = abstract_model(model_config)
    leaves, missing = [], []
    for path, variable in nnx.to_flat_state(abstract):
        path = tuple(path)
        if path in flat:
            value = np.asarray(flat[path], dtype=np.float32)
            if value.shape != tuple(variable.shape):
                raise UserError(
                    f"parameter {_dotted(path)} has shape {list(value.shape)}, expected "
                    f"{list(variable.shape)}."
                )
        elif missing_bias_is_zero and path[-1] == "bias":
            value = np.zeros(variable.shape, np.float32)
        else:
            missing.append(_dotted(path))
            continue
        leaves.append((path, variable.replace(value)))
    known = {tuple(path) for path, _ in nnx.to_flat_state(abstract)}
    extra = sorted(_dotted(path) for path in flat if tuple(path) not in known)
    if missing or extra:
        raise UserError(
            f"parameters do not match the model: missing {missing[:8]}, unexpected {extra[:8]}."
        )
    return nnx.from_flat_state(leaves)


def _dotted(path) -> str:
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in path).replace(".[", "[")
