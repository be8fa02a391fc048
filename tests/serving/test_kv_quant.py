"""The int8 KV cache: the quantizer against NumPy, its bytes, decode close to the float
cache, no float copy of the cache in the compiled decode, and bad settings named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.errors import UserError
from research.serving import Sampler, SamplingParams, complete
from research.serving.core import kv_cache, kv_quant
from research.serving.engine import EngineConfig
from research.serving.engine.prefix_cache import PrefixCache
from research.sharding import make_mesh
from tests.serving.helpers import FAMILIES, LLAMA, full_logits, random_split

PROMPTS = [[1, 5, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [3]]


def test_quantize_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 2, 5, 8)).astype(np.float32) * rng.uniform(0.01, 50, (3, 2, 5, 1))
    x[0, 1, 2] = 0.0  # An all-zero vector: scale 0, dequantizes to exact zeros.
    x[1, 0, 3, 4] = -400.0  # An outlier sets its vector's scale.
    q, scale = map(np.asarray, jax.jit(kv_quant.quantize)(x))
    expected_scale = np.abs(x).max(-1, keepdims=True) / 127
    safe = np.where(expected_scale > 0, expected_scale, 1)
    expected_q = np.clip(np.round(x / safe), -127, 127).astype(np.int8)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (3, 2, 5, 1)
    np.testing.assert_allclose(scale, expected_scale, rtol=1e-6)
    # Ties may round either way after float rounding of x / scale: at most one level apart.
    assert np.abs(q.astype(int) - expected_q).max() <= 1
    assert np.mean(q == expected_q) > 0.99
    assert np.abs(q).max(-1).min() == 0 and q[1, 0, 3, 4] == -127
    np.testing.assert_array_equal(np.abs(q[np.abs(x).max(-1) > 0]).max(-1), 127)
    back = np.asarray(kv_quant.dequantize(q, scale))
    assert np.all(np.abs(back - x) <= expected_scale / 2 * (1 + 1e-5))
    np.testing.assert_array_equal(back[0, 1, 2], 0.0)


def test_int8_cache_is_a_quarter_of_float32_and_half_of_bfloat16():
    """Real arrays: H int8 bytes + one float32 scale per position and head, for the keys and
    the values, in the sampler's state and in the prefix-cache pool."""
    graphdef, params = random_split(LLAMA)
    h = LLAMA.resolved_head_dim
    for dtype, itemsize in (("float32", 4), ("bfloat16", 2)):
        config = LLAMA.replace(dtype=dtype)
        nbytes = {}
        for kv_dtype in ("auto", "int8"):
            sampler = Sampler(config, graphdef, params, num_slots=3, kv_dtype=kv_dtype)
            cache = sampler.init_state().cache
            nbytes[kv_dtype] = sum(a.nbytes for a in jax.tree.leaves(cache))
            pool = PrefixCache(config, 32, 2**16, block=8, kv_dtype=kv_dtype)
            pool_bytes = sum(a.nbytes for a in jax.tree.leaves(pool.pool))
            assert pool_bytes == pool.num_blocks * pool.block_bytes
        positions = 3 * LLAMA.num_kv_heads * LLAMA.max_seq_len * LLAMA.num_layers * 2
        assert nbytes["auto"] == positions * h * itemsize
        assert nbytes["int8"] == positions * (h + 4)
        assert nbytes["int8"] / nbytes["auto"] == (h + 4) / (h * itemsize)
    assert {a.dtype for a in jax.tree.leaves(cache)} == {np.dtype(np.int8), np.dtype(np.float32)}


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_decode_stays_close_to_the_float_cache(family):
    """Prefill 6 tokens then 6 decode steps with each cache: int8 logits within 0.03 of the
    full forward's (logits span about +-3; a float cache is within 1e-5), the argmax equal,
    and int8 decode equal to int8 prefill of the same tokens (a decoding token attends to
    its own key as the cache stores it)."""
    config = FAMILIES[family]
    graphdef, params = random_split(config)
    tokens_bt = np.random.default_rng(1).integers(0, config.vocab_size, (2, 12)).astype(np.int32)
    expected_btv = full_logits(graphdef, params, tokens_bt)

    @jax.jit
    def run(params):
        model = nnx.merge(graphdef, params)
        out = {}
        for kv_dtype in ("auto", "int8"):
            cache = kv_cache.init_cache(config, 2, 16, kv_dtype)
            start = jnp.zeros((2,), jnp.int32)
            x_btd, cache = kv_cache.extend(model, jnp.asarray(tokens_bt[:, :6]), start, cache)
            logits = [model.unembed(x_btd)]
            for i in range(6, 12):
                position_b = jnp.full((2,), i, jnp.int32)
                token_b, writes_b = jnp.asarray(tokens_bt[:, i]), jnp.ones((2,), bool)
                logits_bv, cache = kv_cache.decode_step(model, token_b, position_b, writes_b, cache)
                logits.append(logits_bv[:, None])
            fresh = kv_cache.init_cache(config, 2, 16, kv_dtype)
            x_btd, _ = kv_cache.extend(model, jnp.asarray(tokens_bt), start, fresh)
            out[kv_dtype] = jnp.concatenate(logits, 1), model.unembed(x_btd)
        return out

    out = jax.tree.map(np.asarray, run(params))
    np.testing.assert_allclose(out["auto"][0], expected_btv, atol=1e-5)
    int8_btv, int8_prefill_btv = out["int8"]
    error = np.abs(int8_btv - expected_btv).max()
    assert 1e-4 < error < 0.03, error  # Quantized (not float), and close.
    np.testing.assert_array_equal(int8_btv.argmax(-1), expected_btv.argmax(-1))
    np.testing.assert_allclose(int8_btv[:, 6:], int8_prefill_btv[:, 6:], atol=1e-5)


def test_int8_greedy_tokens_equal_the_float_cache():
    graphdef, params = random_split(LLAMA)
    greedy = SamplingParams(max_new_tokens=9, temperature=0.0)
    tokens = {}
    for kv_dtype in ("auto", "int8"):
        sampler = Sampler(LLAMA, graphdef, params, num_slots=1, steps_per_call=9, kv_dtype=kv_dtype)
        tokens[kv_dtype] = [r.token_ids for r in complete(sampler, PROMPTS, greedy)]
    assert tokens["int8"] == tokens["auto"]
    assert all(len(t) == 9 for t in tokens["int8"])


def test_int8_on_a_tensor_parallel_mesh_equals_one_device():
    """Scales are split over kv heads as the int8 keys are."""
    graphdef, params = random_split(LLAMA)
    requests = [SamplingParams(max_new_tokens=7, temperature=1.0, top_k=5, seed=3)] * 2
    one = Sampler(LLAMA, graphdef, params, num_slots=2, kv_dtype="int8")
    mesh = make_mesh((2, 1, 2), devices=jax.devices()[:4])
    sharded = Sampler(LLAMA, graphdef, params, num_slots=2, kv_dtype="int8", mesh=mesh)
    expected = complete(one, PROMPTS[:2], requests)
    results = complete(sharded, PROMPTS[:2], requests)
    assert [r.token_ids for r in results] == [r.token_ids for r in expected]
    cache = sharded.init_state().cache
    assert "tensor" in str(cache.key_scales[0][0].sharding.spec)
    assert cache.key_scales[0][0].dtype == jnp.float32


def test_compiled_int8_decode_makes_no_float_copy_of_the_cache(monkeypatch):
    """XLA's convert-then-dot would hold a float32 copy of a cache segment; the fused
    int8 products hold none: the decode's temporaries stay as small as the float cache's
    through the same XLA einsums (the float cache's C++ kernel is off here; one segment of
    one layer in float32 is 786 KB), and the cache is updated in place."""
    monkeypatch.setattr(kv_cache, "use_attention_kernel", lambda cache, dtype: False)
    config = LLAMA.replace(max_seq_len=1024, head_dim=32)
    graphdef, params = random_split(config)
    temp, cache_bytes = {}, {}
    for kv_dtype in ("auto", "int8"):
        sampler = Sampler(
            config, graphdef, params, num_slots=4, steps_per_call=2, kv_dtype=kv_dtype
        )
        sampler.compile_bucket(4, 1024)
        memory = sampler._executables[(4, 1024)].memory_analysis()
        cache = sampler.init_state().cache
        cache_bytes[kv_dtype] = sum(a.nbytes for a in jax.tree.leaves(cache))
        temp[kv_dtype] = memory.temp_size_in_bytes
        assert memory.alias_size_in_bytes >= cache_bytes[kv_dtype]  # In place.
    segment_f32 = 4 * config.num_kv_heads * 768 * 32 * 4
    assert temp["int8"] < segment_f32 / 4, temp
    assert temp["int8"] <= temp["auto"] * 1.1, temp
    assert cache_bytes["int8"] < cache_bytes["auto"] / 3


def test_a_bad_kv_cache_dtype_is_a_user_error_naming_the_field():
    graphdef, params = random_split(LLAMA)
    with pytest.raises(UserError, match=r"serve.kv_cache_dtype='int4' .*'auto'.*'int8'"):
        EngineConfig(kv_cache_dtype="int4").check()
    with pytest.raises(UserError, match=r"sampler kv_dtype='float16' .*'auto'.*'int8'"):
        Sampler(LLAMA, graphdef, params, kv_dtype="float16")
    with pytest.raises(UserError, match=r"kv_dtype='fp8'"):
        kv_cache.init_cache(LLAMA, 1, 16, "fp8")
    EngineConfig(kv_cache_dtype="int8").check()
