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


@pytest.mark.parametrize(
    ("bits", "group", "asym"),
    [(4, 16, False), (4, 32, False), (8, 64, False), (4, 16, True), (4, 32, True)],
)
def test_gptq_beats_round_to_nearest_on_the_layer_output(bits, group, asym):
    k, n = 64, 24
    x = _inputs(512, k)
    # Off centre, so that int4_asym's min is not just -max.
    w = np.random.default_rng(1).normal(0.3, 1.0, size=(k, n)).astype(np.float32)
    spec = qz.QuantSpec(bits, group if bits == 4 else k, asym)
    h = 2 * x.T.astype(np.float64) @ x / len(x)
    q, scale, minimum = gptq.quantize_matrix(w, h, spec, block=32)
    rtn_q, rtn_scale, rtn_min = qz.quantize(w, spec)
    assert q.shape == rtn_q.shape and q.dtype == rtn_q.dtype and scale.shape == rtn_scale.shape
    assert scale.dtype == rtn_scale.dtype and (minimum is None) == (rtn_min is None) == (not asym)
    if asym:
        assert minimum.shape == rtn_min.shape and minimum.dtype == np.float16

    def output_error(q_, s_, m_):
        return np.linalg.norm(x @ qz.dequantize(q_, s_, spec, m_) - x @ w)

    assert output_error(q, scale, minimum) < 0.8 * output_error(rtn_q, rtn_scale, rtn_min)


@pytest.mark.parametrize("asym", [False, True])
def test_gptq_with_identity_hessian_is_round_to_nearest(asym):
    """With uncorrelated inputs there is no error to push elsewhere: GPTQ = RTN."""
    w = np.random.default_rng(2).normal(size=(32, 5)).astype(np.float32)
    spec = qz.QuantSpec(4, 8, asym)
    q, scale, minimum = gptq.quantize_matrix(w, np.eye(32), spec, damp=0.0)
    rtn_q, rtn_scale, rtn_min = qz.quantize(w, spec)
    np.testing.assert_array_equal(q, rtn_q)
    np.testing.assert_array_equal(scale, rtn_scale)
    np.testing.assert_array_equal(minimum, rtn_min)


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

    for mode in ("int4", "int4_asym"):
        overrides = gptq.gptq_overrides(CONFIG, params, hessians, mode, 32, log=lambda m: 0)
        qconfig, qparams = qz.quantize_params(CONFIG, params, mode, 32, overrides=overrides)
        q, scale, minimum = overrides[("layers", 0, "mlp", "down_proj", "kernel")]
        down = qparams["layers"][0]["mlp"]["down_proj"]
        np.testing.assert_array_equal(down["kernel_q"], q)
        np.testing.assert_array_equal(down["scale"], scale)
        assert (minimum is None) == (mode == "int4") == ("min" not in down)
        if minimum is not None:
            np.testing.assert_array_equal(down["min"], minimum)
