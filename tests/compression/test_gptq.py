"""GPTQ: less output error than round-to-nearest, and Hessians that are the layers' inputs."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.compression import gptq
from research.compression import quantize as qz
from research.model import Decoder
from tests.compression.test_quantize import CONFIG
from tests.model.helpers import random_model


def _inputs(rows, k, seed=0):
    """Correlated inputs with uneven scales: where GPTQ's error feedback pays."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(k, k)) * rng.uniform(0.1, 2.0, size=k)
    return (rng.normal(size=(rows, k)) @ mix).astype(np.float32)


@pytest.mark.parametrize(("bits", "group"), [(4, 16), (4, 32), (8, 64)])
def test_gptq_beats_round_to_nearest_on_the_layer_output(bits, group):
    k, n = 64, 24
    x = _inputs(512, k)
    w = np.random.default_rng(1).normal(size=(k, n)).astype(np.float32)
    spec = qz.QuantSpec(bits, group if bits == 4 else k)
    h = 2 * x.T.astype(np.float64) @ x / len(x)
    q, scale = gptq.quantize_matrix(w, h, spec, block=32)
    rtn_q, rtn_scale = qz.quantize(w, spec)
    assert q.shape == rtn_q.shape and q.dtype == rtn_q.dtype and scale.shape == rtn_scale.shape

    def output_error(q_, s_):
        return np.linalg.norm(x @ qz.dequantize(q_, s_, spec) - x @ w)

    assert output_error(q, scale) < 0.8 * output_error(rtn_q, rtn_scale)


def test_gptq_with_identity_hessian_is_round_to_nearest():
    """With uncorrelated inputs there is no error to push elsewhere: GPTQ = RTN."""
    w = np.random.default_rng(2).normal(size=(32, 5)).astype(np.float32)
    spec = qz.QuantSpec(4, 8)
    q, scale = gptq.quantize_matrix(w, np.eye(32), spec, damp=0.0)
    rtn_q, rtn_scale = qz.quantize(w, spec)
    np.testing.assert_array_equal(q, rtn_q)
    np.testing.assert_allclose(scale, rtn_scale)


def test_hessians_are_the_inputs_of_each_dense():
    model = random_model(lambda: Decoder(CONFIG, rngs=nnx.Rngs(0)), scale=0.3)
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = np.random.default_rng(3).integers(0, CONFIG.vocab_size, size=(2, 8))
    hessians = gptq.collect_hessians(graphdef, params, [tokens[:1], tokens[1:]], log=lambda m: 0)
    layers = CONFIG.num_layers
    assert len(hessians) == layers * 7  # q, k, v, o, gate, up, down; the head is tied.
    x = np.asarray(model.layers[0].attention_norm(model.embed(jnp.asarray(tokens))))
    x = x.reshape(-1, CONFIG.d_model).astype(np.float64)
    expected = 2 * x.T @ x / len(x)
    for name in ("q_proj", "k_proj", "v_proj"):
        got = hessians[("layers", 0, "attention", name, "kernel")]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    down = hessians[("layers", 1, "mlp", "down_proj", "kernel")]
    assert down.shape == (CONFIG.mlp_dim, CONFIG.mlp_dim)

    overrides = gptq.gptq_overrides(CONFIG, params, hessians, "int4", 32, log=lambda m: 0)
    qconfig, qparams = qz.quantize_params(CONFIG, params, "int4", 32, overrides=overrides)
    q, scale = overrides[("layers", 0, "mlp", "down_proj", "kernel")]
    np.testing.assert_array_equal(qparams["layers"][0]["mlp"]["down_proj"]["kernel_q"], q)
