"""The full Decoder: NumPy forward, packing, causality, tying, dtypes, remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.model import Decoder, count_params
from tests.model import numpy_reference as ref
from tests.model.helpers import FAMILIES, GPT2, LLAMA, jitted, numpy_params, random_model


def _model(config, seed=0):
    return random_model(lambda: Decoder(config, rngs=nnx.Rngs(seed)), seed=seed, scale=0.3)


def _tokens(shape=(2, 9), seed=3):
    return jax.random.randint(jax.random.key(seed), shape, 0, 37)


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_matches_numpy(family):
    config = FAMILIES[family]
    model = _model(config)
    tokens = _tokens()
    positions = jnp.array([[0, 1, 2, 3, 0, 1, 2, 0, 0], list(range(9))])
    segment_ids = jnp.array([[1, 1, 1, 1, 2, 2, 2, 0, 0], [1] * 9])
    logits = jitted(model)(tokens, positions_bt=positions, segment_ids_bt=segment_ids)
    assert logits.shape == (2, 9, 37) and logits.dtype == jnp.float32
    want = ref.decoder(
        numpy_params(model), config, *(np.asarray(a) for a in (tokens, positions, segment_ids))
    )
    np.testing.assert_allclose(logits, want, atol=2e-4, rtol=1e-4)


def test_default_positions_and_segments():
    model = jitted(_model(GPT2))  # learned positions: default slices the table, no gather
    tokens = _tokens()
    explicit = model(
        tokens,
        positions_bt=jnp.broadcast_to(jnp.arange(9), (2, 9)),
        segment_ids_bt=jnp.ones((2, 9), jnp.int32),
    )
    np.testing.assert_allclose(model(tokens), explicit, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_documents_do_not_see_each_other(family):
    """Logits of [docA, docB, pad] equal those of docA and docB run alone."""
    model = jitted(_model(FAMILIES[family]))
    doc_a, doc_b = _tokens((1, 4), seed=5), _tokens((1, 3), seed=6)
    packed = jnp.concatenate([doc_a, doc_b, jnp.zeros((1, 2), jnp.int32)], axis=1)
    positions = jnp.array([[0, 1, 2, 3, 0, 1, 2, 0, 1]])
    segment_ids = jnp.array([[1, 1, 1, 1, 2, 2, 2, 0, 0]])
    logits = model(packed, positions_bt=positions, segment_ids_bt=segment_ids)
    np.testing.assert_allclose(logits[:, :4], model(doc_a), atol=1e-5)
    np.testing.assert_allclose(logits[:, 4:7], model(doc_b), atol=1e-5)
    assert np.all(np.isfinite(logits))  # padding rows attend to themselves: no NaN
    # Without segment ids doc B attends to doc A, which must change its logits.
    unsegmented = model(packed, positions_bt=positions)
    assert not np.allclose(unsegmented[:, 4:7], logits[:, 4:7], atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_causal(family):
    model = jitted(_model(FAMILIES[family]))
    tokens = _tokens()
    changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % 37)
    before, after = model(tokens), model(changed)
    np.testing.assert_allclose(before[:, :5], after[:, :5], atol=1e-6)
    assert not np.allclose(before[:, 5:], after[:, 5:], atol=1e-4)


def test_tied_and_untied_heads():
    tied = nnx.eval_shape(lambda: Decoder(LLAMA.replace(tie_embeddings=True), rngs=nnx.Rngs(0)))
    untied = nnx.eval_shape(lambda: Decoder(LLAMA, rngs=nnx.Rngs(0)))
    assert tied.lm_head is None
    assert untied.lm_head.kernel.shape == (12, 37)
    assert count_params(LLAMA) - count_params(LLAMA.replace(tie_embeddings=True)) == 37 * 12
    # The tied head reuses the embedding table (the NumPy forward multiplies by table.T).
    tokens = _tokens()
    model = _model(LLAMA.replace(tie_embeddings=True))
    params = numpy_params(model)
    want = ref.decoder(
        params,
        model.config,
        np.asarray(tokens),
        np.broadcast_to(np.arange(9), (2, 9)),
        np.ones((2, 9), np.int64),
    )
    np.testing.assert_allclose(jitted(model)(tokens), want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_compute_is_close_to_float32(family):
    config = FAMILIES[family]
    fp32 = _model(config)
    bf16 = _model(config.replace(dtype="bfloat16"))
    for leaf in jax.tree.leaves(nnx.state(bf16, nnx.Param)):
        assert leaf.dtype == jnp.float32  # parameters stay float32
    tokens = _tokens()
    want, got = jitted(fp32)(tokens), jitted(bf16)(tokens)
    assert got.dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(want)))
    assert float(jnp.max(jnp.abs(got - want))) < 0.05 * scale


def test_remat_modes_give_the_same_outputs_and_gradients():
    tokens, targets = _tokens(), _tokens(seed=4)

    def loss_and_grads(remat):
        model = _model(LLAMA.replace(remat=remat, num_layers=1))
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(params):
            logits = nnx.merge(graphdef, params)(tokens)
            log_probs = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], -1))

        return jax.jit(jax.value_and_grad(loss))(params)

    want_loss, want_grads = loss_and_grads("none")
    for remat in ("full", "save_dots"):
        got_loss, got_grads = loss_and_grads(remat)
        np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
        for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)
