"""Prefill + KV-cache decode steps give the full forward's logits at every position."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.model import dot_product_attention
from research.serving.core import attention_kernel, kv_cache
from tests.serving.helpers import (
    FAMILIES,
    cpu_has,
    full_logits,
    random_split,
    run_isa_check,
)


@pytest.mark.parametrize("num_rows", [2, 1])  # XLA lowers a one-row scatter apart.
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_matches_full_forward_at_every_position(family, num_rows):
    config = FAMILIES[family]
    graphdef, params = random_split(config)
    tokens_bt = np.random.default_rng(1).integers(0, config.vocab_size, (2, 12)).astype(np.int32)
    # Row 0 is prefilled with 3 tokens, row 1 with 6: each decodes at its own position.
    tokens_bt, prompt_lengths = tokens_bt[-num_rows:], np.array([3, 6], np.int32)[-num_rows:]
    expected_btv = full_logits(graphdef, params, tokens_bt)
    max_len = 16

    @jax.jit
    def run(params):
        model = nnx.merge(graphdef, params)
        cache = kv_cache.init_cache(config, num_rows, max_len)
        start = jnp.zeros((num_rows,), jnp.int32)
        x_btd, cache = kv_cache.extend(model, jnp.asarray(tokens_bt[:, :8]), start, cache)
        prefill_logits_btv = model.unembed(x_btd)
        positions_b = jnp.asarray(prompt_lengths)
        writes_b = jnp.ones((num_rows,), bool)
        step_logits = []
        for _ in range(6):
            token_b = jnp.take_along_axis(jnp.asarray(tokens_bt), positions_b[:, None], 1)[:, 0]
            logits_bv, cache = kv_cache.decode_step(model, token_b, positions_b, writes_b, cache)
            step_logits.append(logits_bv)
            positions_b = positions_b + 1
        return prefill_logits_btv, jnp.stack(step_logits, 1)

    prefill_btv, steps_bkv = map(np.asarray, run(params))
    np.testing.assert_allclose(prefill_btv, expected_btv[:, :8], rtol=1e-5, atol=1e-5)
    for row, start in enumerate(prompt_lengths):
        np.testing.assert_allclose(
            steps_bkv[row], expected_btv[row, start : start + 6], rtol=1e-4, atol=1e-4
        )


def test_decode_on_the_first_rows_and_keys_equals_the_whole_cache():
    """A bucket of R < B rows reading L < S keys gives the whole cache's logits and writes
    only its rows' positions; a row that does not write keeps its cache untouched."""
    config = FAMILIES["llama"]
    graphdef, params = random_split(config)
    rng = np.random.default_rng(4)
    b, s, r, keys = 4, 32, 2, 8
    tokens_bt = rng.integers(0, config.vocab_size, (b, 6)).astype(np.int32)

    @jax.jit
    def run(params):
        model = nnx.merge(graphdef, params)
        cache = kv_cache.init_cache(config, b, s)
        _, cache = kv_cache.extend(model, jnp.asarray(tokens_bt), jnp.zeros((b,), jnp.int32), cache)
        tokens_b, positions_b = jnp.asarray(tokens_bt[:, 5]), jnp.full((b,), 6, jnp.int32)
        writes_b = jnp.array([True, False, True, True])
        whole, whole_cache = kv_cache.decode_step(model, tokens_b, positions_b, writes_b, cache)
        part, part_cache = kv_cache.decode_step(
            model, tokens_b[:r], positions_b[:r], writes_b[:r], cache, num_keys=keys
        )
        return whole, part, whole_cache, part_cache, cache

    whole, part, whole_cache, part_cache, before = run(params)
    np.testing.assert_allclose(np.asarray(part), np.asarray(whole)[:r], rtol=1e-5, atol=1e-5)
    k_new, k_part, k_old = (
        np.asarray(kv_cache.whole(c.keys[0])) for c in (whole_cache, part_cache, before)
    )
    np.testing.assert_allclose(k_part[0], k_new[0], rtol=1e-6)  # Row 0 wrote position 6.
    assert not np.allclose(k_part[0, :, 6], k_old[0, :, 6])
    np.testing.assert_array_equal(k_part[1], k_old[1])  # Row 1 does not write.
    np.testing.assert_array_equal(k_part[r:], k_old[r:])  # Rows past R are untouched.


@pytest.mark.parametrize("kernel", [True, False], ids=["cpp_attention", "xla_attention"])
@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_decode_across_cache_segments_match_the_full_forward(
    family, kernel, monkeypatch
):
    """max_len 300 splits each layer's cache into [0, 256) and [256, 300): a 250-token
    prompt (chunks of 100) then decode steps that cross the boundary, read in the 256 and
    the 300 key buckets, give the full forward's logits, through the C++ decode attention
    and through XLA's einsums."""
    if kernel:
        assert attention_kernel.available(), f"{attention_kernel.LIBRARY}: run `make kernels`"
    monkeypatch.setattr(kv_cache, "use_attention_kernel", lambda cache, dtype: kernel)
    config = FAMILIES[family].replace(max_seq_len=512)
    graphdef, params = random_split(config)
    tokens_t = np.random.default_rng(2).integers(0, config.vocab_size, 262).astype(np.int32)
    expected_tv = full_logits(graphdef, params, tokens_t[None])[0]
    assert kv_cache.segment_bounds(300) == ((0, 256), (256, 300))

    @jax.jit
    def run(params):
        model = nnx.merge(graphdef, params)
        cache = kv_cache.init_cache(config, 1, 300)
        for start in (0, 100, 200):
            end = min(start + 100, 250)
            x_1td, cache = kv_cache.extend(
                model, jnp.asarray(tokens_t[None, start:end]), jnp.array([start]), cache
            )
        last = model.unembed(x_1td)[0, -1]
        steps = []
        for position in range(250, 262):
            logits, cache = kv_cache.decode_step(
                model,
                jnp.asarray(tokens_t[position : position + 1]),
                jnp.array([position]),
                jnp.array([True]),
                cache,
                num_keys=256 if position <= 256 else 300,
            )
            steps.append(logits[0])
        return last, jnp.stack(steps)

    last, steps = map(np.asarray, run(params))
    np.testing.assert_allclose(last, expected_tv[249], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(steps, expected_tv[250:262], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block", [4, 5, 64])
def test_blockwise_attention_equals_causal_attention(block):
    """Queries at their own positions over cache rows chosen per query row, one key block
    at a time (including a block shifted back to fit), equal masked attention."""
    rng = np.random.default_rng(0)
    c, k, s, h, n, t = 3, 2, 13, 5, 4, 3
    k_cksh, v_cksh = rng.normal(size=(2, c, k, s, h)).astype(np.float32)
    q_btnh = rng.normal(size=(2, t, n, h)).astype(np.float32)
    rows_b = np.array([2, 0], np.int32)
    positions_bt = np.array([[0, 1, 2], [10, 11, 12]], np.int32)
    got = kv_cache.blockwise_attention(q_btnh, k_cksh, v_cksh, positions_bt, rows_b, block=block)
    # The same cache as two segments, [0, 7) and [7, 13): blocks never straddle them.
    segments = [k_cksh[:, :, :7], k_cksh[:, :, 7:]], [v_cksh[:, :, :7], v_cksh[:, :, 7:]]
    split = kv_cache.blockwise_attention(q_btnh, *segments, positions_bt, rows_b, block=block)
    mask_bts = np.arange(s)[None, None] <= positions_bt[:, :, None]
    k_bskh = k_cksh[rows_b].transpose(0, 2, 1, 3)
    v_bskh = v_cksh[rows_b].transpose(0, 2, 1, 3)
    expected = dot_product_attention(q_btnh, k_bskh, v_bskh, mask_bts)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(split, expected, rtol=1e-5, atol=1e-6)


def test_cache_is_grouped_query_sized():
    config = FAMILIES["llama"]
    shape = kv_cache.cache_shape(config, num_slots=3, max_len=16).shape
    assert shape == (3, config.num_kv_heads, 16, config.resolved_head_dim)
    assert config.num_kv_heads < config.num_heads


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_decode_attention_equals_the_model_attention(num_kv_heads):
    rng = np.random.default_rng(0)
    b, s, n, h = 3, 7, 4, 5
    q_bnh = rng.normal(size=(b, n, h)).astype(np.float32)
    k_bskh, v_bskh = rng.normal(size=(2, b, s, num_kv_heads, h)).astype(np.float32)
    positions = np.array([[0], [3], [6]])
    mask_bs = np.arange(s)[None] <= positions
    expected = dot_product_attention(q_bnh[:, None], k_bskh, v_bskh, mask_bs[:, None])[:, 0]
    k_bksh, v_bksh = k_bskh.transpose(0, 2, 1, 3), v_bskh.transpose(0, 2, 1, 3)
    got = kv_cache.decode_attention(q_bnh, k_bksh, v_bksh, mask_bs)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # The token's own key and value given apart, its cache row not written yet (garbage).
    rows = np.arange(b)
    own_kv = k_bksh[rows, :, positions[:, 0]], v_bksh[rows, :, positions[:, 0]]
    stale_k, stale_v = k_bksh.copy(), v_bksh.copy()
    stale_k[rows, :, positions[:, 0]] = 1e3
    stale_v[rows, :, positions[:, 0]] = -1e3
    earlier_bs = np.arange(s)[None] < positions
    got = kv_cache.decode_attention(q_bnh, stale_k, stale_v, earlier_bs, own_kv)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def _numpy_segment_stats(q_bkgh, keys_cksh, values_cksh, lengths_b):
    b, k, g, h = q_bkgh.shape
    maxes, sums = np.full((b, k, g), -3e38), np.zeros((b, k, g))
    accs = np.zeros((b, k, g, h))
    for row in range(b):
        n = int(np.clip(lengths_b[row], 0, keys_cksh.shape[2]))
        if n == 0:
            continue
        logits_kgs = np.einsum("kgh,ksh->kgs", q_bkgh[row], keys_cksh[row, :, :n], dtype=np.float64)
        maxes[row] = logits_kgs.max(-1)
        weights_kgs = np.exp(logits_kgs - maxes[row][..., None])
        sums[row] = weights_kgs.sum(-1)
        accs[row] = np.einsum("kgs,ksh->kgh", weights_kgs, values_cksh[row, :, :n])
    return maxes, sums, accs


_STATS_CHECK = """
import numpy as np, jax, jax.numpy as jnp
from research.serving.core import attention_kernel as ak
from tests.serving.test_kv_cache import _numpy_segment_stats
rng = np.random.default_rng(0)
# (B, C, K, G, S, H): C > B rows in the cache, G of 1 and 5, H not a multiple of 16.
for b, c, k, g, s, h in [(4, 6, 2, 5, 40, 24), (3, 3, 1, 1, 33, 80), (16, 16, 3, 3, 64, 64)]:
    q = rng.standard_normal((b, k, g, h), dtype=np.float32)
    keys, values = (rng.standard_normal((c, k, s, h), dtype=np.float32) for _ in range(2))
    lengths = rng.integers(1, s, b).astype(np.int32)
    lengths[0], lengths[-1] = 0, s + 7  # No keys; past the segment (clipped to S).
    got = jax.jit(ak.segment_stats)(q, keys, values, lengths)
    want = _numpy_segment_stats(q, keys, values, lengths)
    for name, x, y in zip(("max", "sum", "acc"), got, want):
        np.testing.assert_allclose(np.asarray(x), y, rtol=2e-5, atol=2e-5, err_msg=name)
print("isa", ak.isa())
"""


def test_reference_decode_attention_stats_equal_numpy():
    """The plain-JAX statistics (the kernel's definition, used off CPU) equal NumPy's."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((3, 2, 4, 24), dtype=np.float32)
    keys, values = (rng.standard_normal((5, 2, 40, 24), dtype=np.float32) for _ in range(2))
    lengths = np.array([0, 17, 47], np.int32)
    got = attention_kernel.reference_stats(q, keys, values, lengths)
    want = _numpy_segment_stats(q, keys, values, lengths)
    for name, x, y in zip(("max", "sum", "acc"), got, want, strict=True):
        np.testing.assert_allclose(np.asarray(x), y, rtol=2e-5, atol=2e-5, err_msg=name)


@pytest.mark.parametrize("portable", [False, True], ids=["cpu_default", "portable"])
def test_cpp_decode_attention_equals_numpy(portable):
    """The kernel's softmax statistics per (row, kv head) equal NumPy's in float64, for rows
    with no keys, lengths past the segment and shapes off the vector width: with the loop
    this CPU gets (AVX-512 where it has avx512f/bw/vl) and the portable one, each in its own
    process (the choice is made once per process)."""
    assert attention_kernel.available(), f"{attention_kernel.LIBRARY}: run `make kernels`"
    wide = cpu_has("avx512f", "avx512bw", "avx512vl") and not portable
    run_isa_check(_STATS_CHECK, "CIRRUS_ATTENTION_ISA", portable, "avx512" if wide else "portable")
