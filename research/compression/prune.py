"""Structured pruning: remove whole layers, giving a smaller dense ModelConfig.

Layers are scored by how much they change the residual stream on calibration text: the Block
Influence of ShortGPT (Men et al. 2024), 1 - cos(block input, block output) averaged over
tokens. A layer that barely turns the residual vector is the cheapest to drop. The result is
an ordinary, smaller model: it loads, trains and decodes faster with no special kernels.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@contextlib.contextmanager
def _recording(model, scores: dict):
    """Makes every Block of `model` add (sum over tokens of 1 - cos(in, out), tokens) to
    scores[i] while active (traced: the jitted function returns them)."""
    from research.model import Block

    index = {id(layer): i for i, layer in enumerate(model.layers)}
    original = Block.__call__

    def call(self, x_btd, *args, **kwargs):
        y_btd = original(self, x_btd, *args, **kwargs)
        i = index.get(id(self))
        if i is not None:
            x, y = x_btd.astype(jnp.float32), y_btd.astype(jnp.float32)
            cos = jnp.sum(x * y, -1) / (jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1))
            scores[i] = (jnp.sum(1.0 - cos), cos.size)
        return y_btd

    Block.__call__ = call
    try:
        yield
    finally:
        Block.__call__ = original


def layer_importance(graphdef, params, batches) -> np.ndarray:
    """[num_layers] Block Influence of each layer over `batches` ([B, T] token arrays)."""

    def forward(params, tokens):
        model = nnx.merge(graphdef, params)
        scores = {}
        with _recording(model, scores):
            model(tokens)
        return [scores[i][0] for i in range(len(scores))], [
            scores[i][1] for i in range(len(scores))
        ]

    totals, count = 0.0, 0
    compiled = jax.jit(forward)
    for tokens in batches:
        sums, sizes = compiled(params, jnp.asarray(tokens))
        totals = totals + np.asarray(jax.device_get(sums), np.float64)
        count += int(sizes[0])
    return totals / count


def drop_layers(model_config, params, keep: list[int]):
    """(config with len(keep) layers, pure dict params of those layers, in order)."""
    pure = params.to_pure_dict() if hasattr(params, "to_pure_dict") else params
    if not keep or len(set(keep)) != len(keep):
        raise ValueError(f"keep={keep} must name distinct layers.")
    out = {key: value for key, value in pure.items() if key != "layers"}
    out["layers"] = {new: pure["layers"][old] for new, old in enumerate(sorted(keep))}
    return model_config.replace(num_layers=len(keep)), out


def least_important(importance: np.ndarray, drop: int, *, keep_first_last: bool = True) -> list:
    """The layers to keep after dropping the `drop` lowest-scored ones (the first and the last
    layer are kept: removing them costs far more than their score says, ShortGPT Sec. 4)."""
    candidates = list(range(len(importance)))
    if keep_first_last and len(candidates) > 2:
        candidates = candidates[1:-1]
    order = sorted(candidates, key=lambda i: importance[i])
    dropped = set(order[:drop])
    return [i for i in range(len(importance)) if i not in dropped]
