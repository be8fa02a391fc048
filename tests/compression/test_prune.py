"""Depth pruning: layer scores from the residual stream, and a smaller model that still runs."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.compression import prune
from research.model import Decoder, make_attention_mask
from tests.compression.test_quantize import CONFIG, _logits
from tests.model.helpers import random_model

CONFIG4 = CONFIG.replace(num_layers=4)


def _blocks(model, tokens, layers):
    """The residual stream through the given blocks, by hand, then the head."""
    x = model.embed(tokens)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    mask = make_attention_mask(jnp.ones(tokens.shape, jnp.int32))
    inputs = []
    for i in layers:
        inputs.append(x)
        x = model.layers[i](x, positions, mask)
    return inputs, x, model.unembed(x)


def test_influence_is_one_minus_cosine_of_block_input_and_output():
    model = random_model(lambda: Decoder(CONFIG4, rngs=nnx.Rngs(0)), scale=0.3)
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, size=(2, 8)))
    scores = prune.layer_importance(graphdef, params, [tokens])
    inputs, last, _ = _blocks(model, tokens, range(4))
    outputs = [*inputs[1:], last]
    for i in range(4):
        x, y = np.asarray(inputs[i], np.float64), np.asarray(outputs[i], np.float64)
        cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
        np.testing.assert_allclose(scores[i], np.mean(1 - cos), rtol=1e-4)


def test_dropping_layers_gives_the_model_without_them():
    model = random_model(lambda: Decoder(CONFIG4, rngs=nnx.Rngs(0)), scale=0.3)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    keep = prune.least_important(np.array([0.0, 0.5, 0.1, 0.0]), 1)
    assert keep == [0, 1, 3]  # Layer 2 is the least influential of the middle ones.
    config, pruned = prune.drop_layers(CONFIG4, params, keep)
    assert config.num_layers == 3 and sorted(pruned["layers"]) == [0, 1, 2]
    tokens = np.random.default_rng(1).integers(0, CONFIG.vocab_size, size=(1, 6))
    _, _, expected = _blocks(model, jnp.asarray(tokens), keep)
    np.testing.assert_allclose(_logits(config, pruned, tokens), expected, rtol=1e-5, atol=1e-5)
