"""The quantized weight form: arrays against NumPy, models against their float originals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.compression import quantize as qz
from research.errors import UserError
from research.model import Decoder, ModelConfig
from tests.model.helpers import random_model

# Dims that int4 groups of 32 divide (D=64, H=16, F=128) and an odd vocab (N = 97).
CONFIG = ModelConfig(
    vocab_size=97,
    d_model=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    mlp_dim=128,
    max_seq_len=64,
    tie_embeddings=True,
)


def test_int8_is_round_to_nearest_per_output_channel():
    w = np.random.default_rng(0).normal(size=(40, 7)).astype(np.float32)
    w[:, 3] = 0.0  # An all-zero column must not divide by zero.
    q, scale = qz.quantize_int8(w)
    expected_scale = np.abs(w).max(axis=0) / 127
    np.testing.assert_allclose(scale[0], expected_scale, rtol=1e-6)
    safe = np.where(expected_scale > 0, expected_scale, 1)
    values = qz.unpack(q, 8)
    np.testing.assert_array_equal(values, np.rint(w / safe).astype(np.int8))
    back = qz.dequantize(q, scale, qz.QuantSpec(8, 40))
    assert np.all(np.abs(back - w) <= expected_scale / 2 + 1e-7)
    assert np.abs(values).max() == 127 and not values[:, 3].any()


@pytest.mark.parametrize("group", [8, 32])
def test_int4_groups_match_q4_0_rounding(group):
    w = np.random.default_rng(1).normal(size=(64, 9)).astype(np.float32)
    packed, scale = qz.quantize_int4(w, group)
    assert (
        packed.dtype == np.uint8 and packed.shape == (8, 9, 4) and scale.shape == (64 // group, 9)
    )
    values = qz.unpack(packed, 4)
    # By hand: per group, d = (value of largest magnitude) / -8, q = clip(round(w / d), -8, 7).
    for g in range(64 // group):
        block = w[g * group : (g + 1) * group]
        extreme = block[np.abs(block).argmax(axis=0), np.arange(9)]
        d = extreme / -8
        np.testing.assert_allclose(scale[g], d, rtol=1e-6)
        expected = np.clip(np.rint(block / d), -8, 7)
        np.testing.assert_array_equal(values[g * group : (g + 1) * group], expected)
    assert values.min() == -8  # The extreme of each group maps to -8: all 16 levels in use.
    back = qz.dequantize(packed, scale, qz.QuantSpec(4, group))
    # Half a step, except where +7 clips a value opposite the extreme (Q4_0 does the same).
    step = np.repeat(np.abs(scale), group, axis=0)
    clipped = values == 7
    assert np.all(np.abs(back - w)[~clipped] <= step[~clipped] / 2 + 1e-6)
    assert np.all(np.abs(back - w) <= step + 1e-6)


@pytest.mark.parametrize("group", [8, 32])
def test_int4_asym_groups_follow_the_q4_1_rule(group):
    w = np.random.default_rng(5).normal(0.4, 1.0, size=(64, 9)).astype(np.float32)
    w[:, 2] = 1.5  # A constant column: scale 0, every value is the min.
    spec = qz.QuantSpec(4, group, asym=True)
    packed, scale, minimum = qz.quantize(w, spec)
    assert packed.dtype == np.uint8 and packed.shape == (8, 9, 4)
    assert scale.dtype == minimum.dtype == np.float16 and scale.shape == (64 // group, 9)
    values = qz.unpack(packed, 4, signed=False)
    # By hand, as llama.cpp: per group d = (max - min) / 15 and min, stored as float16;
    # q = floor((w - min) / d + 0.5) against the float32 d and min.
    for g in range(64 // group):
        block = w[g * group : (g + 1) * group]
        low, high = block.min(axis=0), block.max(axis=0)
        np.testing.assert_array_equal(scale[g], ((high - low) / 15).astype(np.float16))
        np.testing.assert_array_equal(minimum[g], low.astype(np.float16))
        d = (high - low) / 15
        inverse = np.divide(1, d, out=np.zeros_like(d), where=d > 0)
        expected = np.clip(np.floor((block - low) * inverse + 0.5), 0, 15)
        np.testing.assert_array_equal(values[g * group : (g + 1) * group], expected)
    assert values.min() == 0 and values.max() == 15  # Each group's min and max: both ends used.
    back = qz.dequantize(packed, scale, spec, minimum)
    # Half a step, plus float16's rounding of min and of 15 steps (2^-11 relative each).
    step = np.repeat(scale.astype(np.float32), group, axis=0)
    fp16 = 2.0**-11 * (np.abs(w) + 15 * step)
    assert np.all(np.abs(back - w) <= step / 2 + fp16 + 1e-7)
    np.testing.assert_array_equal(back[:, 2], 1.5)


def test_int4_asym_g32_is_the_gguf_packages_q4_1_bit_for_bit():
    from gguf import GGMLQuantizationType, quants

    w = np.random.default_rng(6).normal(0.1, 0.7, size=(96, 40)).astype(np.float32)
    spec = qz.QuantSpec(4, 32, asym=True)
    back = qz.dequantize(*qz.quantize(w, spec)[:2], spec, qz.quantize(w, spec)[2])
    q4_1 = GGMLQuantizationType.Q4_1
    expected = quants.dequantize(quants.quantize(np.ascontiguousarray(w.T), q4_1), q4_1)
    np.testing.assert_array_equal(np.asarray(back), expected.reshape(40, 96).T)


def test_int4_asym_g32_reproduces_q4_1_weights_exactly():
    """Weights that are Q4_1 values (the bundled SmolLM2 GGUF's, along the input axis) come back
    unchanged from int4_asym with groups aligned to Q4_1's blocks of 32, not with 64 or int4."""
    from gguf import GGMLQuantizationType, quants

    w_nk = np.random.default_rng(6).normal(size=(24, 128)).astype(np.float32)
    q4_1 = GGMLQuantizationType.Q4_1
    w_kn = quants.dequantize(quants.quantize(w_nk, q4_1), q4_1).reshape(24, 128).T
    errors = {}
    for mode, group in [("int4_asym", 32), ("int4_asym", 64), ("int4", 32)]:
        spec = qz.QuantSpec.of(mode, group, 128)
        q, scale, minimum = qz.quantize(w_kn, spec)
        back = qz.dequantize(q, scale, spec, minimum)
        errors[(mode, group)] = np.abs(back - w_kn).max() / np.abs(w_kn).max()
    assert errors[("int4_asym", 32)] < 1e-6
    assert errors[("int4_asym", 64)] > 0.01 and errors[("int4", 32)] > 0.01, errors


def _kl(p_logits, q_logits):
    logp = jax.nn.log_softmax(p_logits.astype(np.float64), axis=-1)
    logq = jax.nn.log_softmax(q_logits.astype(np.float64), axis=-1)
    return float(np.mean(np.sum(np.exp(logp) * (logp - logq), axis=-1)))


def _logits(config, params, tokens):
    model = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    state = jax.tree.map(jnp.asarray, state)
    return np.asarray(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens))


@pytest.mark.parametrize(
    ("mode", "group", "max_kl", "tie"),
    [
        ("int8", 32, 1e-3, True),
        ("int4", 32, 0.1, True),
        ("int4", 64, 0.1, False),
        ("int4_asym", 32, 0.1, True),
        ("int4_asym", 64, 0.1, False),
    ],
)
def test_quantized_model_stays_close_to_float(mode, group, max_kl, tie):
    config = CONFIG.replace(tie_embeddings=tie)
    model = random_model(lambda: Decoder(config, rngs=nnx.Rngs(0)), scale=0.3)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    qconfig, qparams = qz.quantize_params(config, params, mode, group)
    assert qconfig.quant == mode and qconfig.quant_group == group
    kernel = qparams["layers"][0]["attention"]["o_proj"]
    assert "kernel" not in kernel and kernel["kernel_q"].dtype == (
        np.int8 if mode == "int8" else np.uint8
    )
    # o_proj [N, H, D] is stored [N * H / L, D, 4]; its scale is [groups, D].
    per_word = 4 if mode == "int8" else 8
    assert kernel["kernel_q"].shape == (4 * 16 // per_word, 64, 4)
    assert kernel["scale"].shape == (4 * 16 // group, 64)
    scale_dtype = np.float16 if mode == "int4_asym" else np.float32
    assert kernel["scale"].dtype == scale_dtype and ("min" in kernel) == (mode == "int4_asym")
    if tie and mode == "int4_asym":  # The table [V, D] is stored [D / 8, V, 4] + [D / g, V] x 2.
        table = qparams["embedding"]
        assert table["min"].shape == table["scale"].shape == (64 // group, 97)
    tokens = np.random.default_rng(3).integers(0, 97, size=(2, 24))
    # 2 x 24 rows go through dequantize + dot, 1 x 3 through the CPU kernel (when built).
    for shape in [(2, 24), (1, 3)]:
        t = tokens[: shape[0], : shape[1]]
        kl = _kl(_logits(config, params, t), _logits(qconfig, qparams, t))
        assert 0 < kl < max_kl, (shape, kl)


def test_weight_memory_of_quantized_models():
    config = CONFIG.replace(d_model=256, num_heads=4, head_dim=64, mlp_dim=512, vocab_size=1000)
    model = random_model(lambda: Decoder(config, rngs=nnx.Rngs(0)), scale=0.1)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    fp32 = qz.weight_bytes(params)
    int8 = qz.weight_bytes(qz.quantize_params(config, params, "int8", 0)[1])
    int8_g32 = qz.weight_bytes(qz.quantize_params(config, params, "int8", 32)[1])
    int4 = qz.weight_bytes(qz.quantize_params(config, params, "int4", 32)[1])
    int4_asym = qz.weight_bytes(qz.quantize_params(config, params, "int4_asym", 32)[1])
    assert int8 / fp32 < 0.26 and int8_g32 / fp32 < 0.29 and int4 / fp32 < 0.16
    # 4 bits + float16 scale and min per 32: the same 5 bits per weight as int4's f32 scale.
    assert int4_asym == int4


def test_bad_quantization_settings_name_the_field():
    with pytest.raises(UserError, match="model.quant="):
        CONFIG.replace(quant="int3")
    for mode in ("int4", "int4_asym"):
        with pytest.raises(UserError, match="model.quant_group"):
            Decoder(CONFIG.replace(quant=mode, quant_group=48), rngs=nnx.Rngs(0))
    with pytest.raises(UserError, match="float16"):  # Past float16's range: int4 instead.
        qz.quantize(np.full((32, 2), 1e6, np.float32), qz.QuantSpec(4, 32, asym=True))
    with pytest.raises(UserError, match="already quantized"):
        qz.quantize_params(CONFIG.replace(quant="int8"), {}, "int8")


@pytest.mark.parametrize(("mode", "tie"), [("int8", True), ("int4", False), ("int4_asym", True)])
def test_dequantize_params_inverts_quantize_params(mode, tie):
    config = CONFIG.replace(tie_embeddings=tie)
    model = random_model(lambda: Decoder(config, rngs=nnx.Rngs(0)), scale=0.3)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    qconfig, qparams = qz.quantize_params(config, params, mode, 32)
    fconfig, fparams = qz.dequantize_params(qconfig, qparams)
    assert fconfig == config
    flat = dict(jax.tree_util.tree_leaves_with_path(fparams))
    for path, original in jax.tree_util.tree_leaves_with_path(params):
        back = flat[path]
        assert back.shape == original.shape and back.dtype == np.float32, path
        step = np.abs(original).max() / (127 if mode == "int8" else 7)  # int4_asym: finer.
        assert np.abs(back - original).max() <= step, path
    # The same logits as the quantized model itself.
    tokens = np.random.default_rng(4).integers(0, 97, size=(1, 10))
    np.testing.assert_allclose(
        _logits(fconfig, fparams, tokens), _logits(qconfig, qparams, tokens), atol=1e-4
    )


def test_int4_asym_run_saves_and_restores_in_its_form(tmp_path):
    """ModelConfig.quant='int4_asym' round-trips through the checkpoint meta, and the float16
    scale and min through Orbax, bit for bit; the restored model gives the same logits."""
    from research.checkpoint import load, save_as_run
    from research.checkpoint.pretrained import Pretrained

    model = random_model(lambda: Decoder(CONFIG, rngs=nnx.Rngs(0)), scale=0.3)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    qconfig, qparams = qz.quantize_params(CONFIG, params, "int4_asym", 64)
    source = {"format": "random", "path": "test"}
    save_as_run(str(tmp_path), Pretrained(qconfig, qparams, source, None), log=lambda _: None)
    restored = load(str(tmp_path), log=lambda _: None)
    assert restored.model_config == qconfig
    assert restored.model_config.quant == "int4_asym" and restored.model_config.quant_group == 64
    leaves = dict(jax.tree_util.tree_leaves_with_path(restored.params.to_pure_dict()))
    for path, expected in jax.tree_util.tree_leaves_with_path(qparams):
        got = np.asarray(leaves[path])
        assert got.dtype == expected.dtype, path
        np.testing.assert_array_equal(got, expected)
    tokens = np.random.default_rng(7).integers(0, 97, size=(1, 5))
    got = jax.jit(lambda s, t: nnx.merge(restored.graphdef, s)(t))(restored.params, tokens)
    np.testing.assert_allclose(np.asarray(got), _logits(qconfig, qparams, tokens), atol=1e-5)
