"""Each layer against its NumPy reference, with distinct small dims so swapped axes fail."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.model import (
    Attention,
    Embedding,
    GeluMLP,
    LayerNorm,
    LearnedPositions,
    RMSNorm,
    SwiGLU,
    apply_rope,
    causal_attention,
    dot_product_attention,
    make_attention_mask,
)
from tests.model import numpy_reference as ref
from tests.model.helpers import numpy_params, random_model

B, T, D, F, N, H, V = 2, 5, 12, 20, 4, 6, 37  # H even for RoPE; N * H != D
INIT = nnx.initializers.normal(0.3)


def _x(shape=(B, T, D), seed=1):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_rms_norm_matches_numpy():
    norm = random_model(lambda: RMSNorm(D, eps=1e-5, rngs=nnx.Rngs(0)))
    x = _x()
    p = numpy_params(norm)
    np.testing.assert_allclose(norm(x), ref.rms_norm(np.float64(x), p["scale"], 1e-5), atol=1e-5)


def test_layer_norm_matches_numpy():
    norm = random_model(lambda: LayerNorm(D, eps=1e-5, rngs=nnx.Rngs(0)))
    x = _x() * 3 + 1
    p = numpy_params(norm)
    want = ref.layer_norm(np.float64(x), p["scale"], p["bias"], 1e-5)
    np.testing.assert_allclose(norm(x), want, atol=1e-5)


@pytest.mark.parametrize("norm_cls", [RMSNorm, LayerNorm])
def test_norm_gradients_match_autodiff(norm_cls):
    """The hand-written backward passes equal autodiff of the plain formula."""
    norm = random_model(lambda: norm_cls(D, eps=1e-5, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(norm)
    x, cotangent = _x(), _x(seed=2)
    params = state.to_pure_dict()

    def plain(x, p):
        if norm_cls is RMSNorm:
            return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-5) * p["scale"]
        mean = x.mean(-1, keepdims=True)
        var = jnp.mean((x - mean) ** 2, -1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]

    def custom(x, p):
        new_state = jax.tree.map(lambda a: a, state)
        new_state.replace_by_pure_dict(p)
        return nnx.merge(graphdef, new_state)(x)

    got = jax.vjp(custom, x, params)[1](cotangent)
    want = jax.vjp(plain, x, params)[1](cotangent)
    for got_leaf, want_leaf in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got_leaf, want_leaf, atol=1e-4, rtol=1e-5)


def test_norms_keep_bfloat16_inputs_bfloat16():
    x = _x().astype(jnp.bfloat16)
    for norm_cls in (RMSNorm, LayerNorm):
        assert random_model(lambda c=norm_cls: c(D, eps=1e-5, rngs=nnx.Rngs(0)))(x).dtype == (
            jnp.bfloat16
        )


def test_rope_matches_hf_rotate_half():
    x = _x((B, T, N, 6))
    positions = jnp.array([[0, 1, 2, 3, 4], [7, 3, 0, 11, 100]])
    got = apply_rope(x, positions, theta=500.0)
    want = ref.rope(np.float64(x), np.asarray(positions), 500.0)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_rope_scores_depend_only_on_relative_position():
    q, k = _x((1, 1, 1, 8), 1), _x((1, 1, 1, 8), 2)

    def score(pq, pk):
        rq = apply_rope(q, jnp.array([[pq]]), theta=10_000.0)
        rk = apply_rope(k, jnp.array([[pk]]), theta=10_000.0)
        return float(jnp.sum(rq * rk))

    assert score(3, 1) == pytest.approx(score(12, 10), abs=1e-4)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-4)


def test_learned_positions_and_embedding():
    positions = random_model(lambda: LearnedPositions(16, D, init=INIT, rngs=nnx.Rngs(0)))
    idx = jnp.array([[0, 3, 15, 2, 2], [1, 1, 0, 9, 4]])
    np.testing.assert_array_equal(positions(idx), positions.embedding[...][idx])
    np.testing.assert_array_equal(positions.prefix(T)[0], positions.embedding[...][:T])

    embedding = random_model(lambda: Embedding(V, D, init=INIT, rngs=nnx.Rngs(0)))
    tokens = jnp.array([[0, 36, 5, 5, 1], [2, 3, 4, 35, 0]])
    table = np.float64(embedding.embedding[...])
    np.testing.assert_array_equal(embedding(tokens), embedding.embedding[...][tokens])
    x = _x()
    logits = embedding.attend(x)
    assert logits.shape == (B, T, V) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, np.float64(x) @ table.T, atol=1e-4)


@pytest.mark.parametrize("use_bias", [False, True])
def test_swiglu_matches_numpy(use_bias):
    mlp = random_model(
        lambda: SwiGLU(D, F, use_bias=use_bias, kernel_init=INIT, out_init=INIT, rngs=nnx.Rngs(0))
    )
    x = _x()
    np.testing.assert_allclose(mlp(x), ref.swiglu(np.float64(x), numpy_params(mlp)), atol=1e-4)


@pytest.mark.parametrize("use_bias", [False, True])
def test_gelu_mlp_matches_numpy(use_bias):
    mlp = random_model(
        lambda: GeluMLP(D, F, use_bias=use_bias, kernel_init=INIT, out_init=INIT, rngs=nnx.Rngs(0))
    )
    x = _x()
    np.testing.assert_allclose(mlp(x), ref.gelu_mlp(np.float64(x), numpy_params(mlp)), atol=1e-4)


def test_attention_mask_packing_and_padding():
    segment_ids = jnp.array([[1, 1, 2, 2, 0], [1, 1, 1, 1, 1]])
    got = np.asarray(make_attention_mask(segment_ids))
    np.testing.assert_array_equal(got, ref.mask(np.asarray(segment_ids)))
    assert got[0, 4].tolist() == [False, False, False, False, True]  # padding sees itself only
    assert got[0, 2].tolist() == [False, False, True, False, False]  # doc 2 starts fresh


@pytest.mark.parametrize("num_kv_heads", [1, 2, N])
@pytest.mark.parametrize(
    "rope_theta,use_bias,qkv_bias",
    [(10_000.0, False, False), (100.0, False, True), (None, True, False)],
)
def test_attention_matches_numpy(num_kv_heads, rope_theta, use_bias, qkv_bias):
    attention = random_model(
        lambda: Attention(
            D,
            N,
            num_kv_heads,
            H,
            rope_theta=rope_theta,
            use_bias=use_bias,
            qkv_bias=qkv_bias,
            kernel_init=INIT,
            out_init=INIT,
            rngs=nnx.Rngs(0),
        )
    )
    params = numpy_params(attention)
    assert ("bias" in params["q_proj"]) == (use_bias or qkv_bias)
    assert ("bias" in params["o_proj"]) == use_bias
    assert params["k_proj"]["kernel"].shape == (D, num_kv_heads, H)
    x = _x()
    positions = jnp.array([[0, 1, 0, 1, 0], [0, 1, 2, 3, 4]])
    segment_ids = jnp.array([[1, 1, 2, 2, 0], [1, 1, 1, 1, 1]])
    mask = make_attention_mask(segment_ids)
    got = attention(x, positions, mask)
    want = ref.attention(np.float64(x), params, np.asarray(positions), np.asarray(mask), rope_theta)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_attention_core_for_a_kv_cache():
    """T queries against S > T cached keys: the core takes any [B, T, S] mask."""
    s, k_heads = 7, 2
    q, k, v = _x((B, 2, N, H), 1), _x((B, s, k_heads, H), 2), _x((B, s, k_heads, H), 3)
    mask = make_attention_mask(
        jnp.ones((B, 2), jnp.int32),
        jnp.array([[1] * 6 + [0], [1] * 7]),
        q_index_bt=jnp.array([[4, 5], [5, 6]]),
        kv_index_bs=jnp.broadcast_to(jnp.arange(s), (B, s)),
    )
    got = jax.jit(dot_product_attention)(q, k, v, mask)
    qn, kn, vn, mn = (np.float64(a) for a in (q, k, v, mask))
    for head in range(N):
        kv = head // (N // k_heads)
        logits = np.einsum("bth,bsh->bts", qn[:, :, head], kn[:, :, kv]) / np.sqrt(H)
        logits = np.where(mn, logits, -np.inf)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        want = np.einsum("bts,bsh->bth", probs, vn[:, :, kv])
        np.testing.assert_allclose(got[:, :, head], want, atol=1e-5)


def _reference_attention(q_btnh, k_bskh, v_bskh, mask_bts):
    """Autodiff-able plain formula with k and v repeated to N heads."""
    group = q_btnh.shape[2] // k_bskh.shape[2]
    k_bsnh, v_bsnh = (jnp.repeat(a, group, axis=2) for a in (k_bskh, v_bskh))
    logits = jnp.einsum("btnh,bsnh->bnts", q_btnh, k_bsnh) / np.sqrt(q_btnh.shape[-1])
    probs = jax.nn.softmax(jnp.where(mask_bts[:, None], logits, -jnp.inf), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", probs, v_bsnh)


def _output_and_grads(attention_fn, mask):
    """Jitted (output, input gradients for a cotangent): eager vjp of the loops is slow."""

    def run(q, k, v, cotangent):
        out, vjp = jax.vjp(lambda *a: attention_fn(*a, mask), q, k, v)
        return out, vjp(cotangent)

    return jax.jit(run)


@pytest.mark.parametrize("num_kv_heads", [2, N])  # grouped and multi-head code paths
def test_blockwise_causal_attention_and_gradients(num_kv_heads):
    """150 tokens = 3 query blocks (64, 64, 22): values and hand-written gradients."""
    t = 150
    q, cotangent = _x((B, t, N, H), 1), _x((B, t, N, H), 4)
    k, v = _x((B, t, num_kv_heads, H), 2), _x((B, t, num_kv_heads, H), 3)
    mask = make_attention_mask(jnp.array([[1] * 70 + [2] * 60 + [0] * 20, [1] * t]))
    want, want_grads = _output_and_grads(_reference_attention, mask)(q, k, v, cotangent)
    for core in (causal_attention, dot_product_attention):
        got, got_grads = _output_and_grads(core, mask)(q, k, v, cotangent)
        np.testing.assert_allclose(got, want, atol=2e-5)
        for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
            np.testing.assert_allclose(got_grad, want_grad, atol=1e-4)


def test_attention_in_bfloat16():
    q, k, v = (_x((B, T, N, H), i).astype(jnp.bfloat16) for i in (1, 2, 3))
    mask = make_attention_mask(jnp.ones((B, T), jnp.int32))
    out, grads = _output_and_grads(causal_attention, mask)(q, k, v, q)
    assert out.dtype == jnp.bfloat16
    assert all(grad.dtype == jnp.bfloat16 for grad in grads)
    want = _reference_attention(*(a.astype(jnp.float32) for a in (q, k, v)), mask)
    np.testing.assert_allclose(out.astype(jnp.float32), want, atol=5e-2)
