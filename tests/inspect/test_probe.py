"""research/inspect on tiny models: the logit lens, attention weights and attributions
against the model's own logits, a NumPy reference and exact gradients; model comparison."""

import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.compression import quantize
from research.errors import UserError
from research.inspect import (
    MAX_ATTENTION_TOKENS,
    check_same_vocabulary,
    compare,
    compare_logprobs,
    inspect_prompt,
)
from research.model import Decoder
from tests.model import numpy_reference as ref
from tests.model.helpers import FAMILIES, LLAMA, jitted, numpy_params, random_model

# Distinct ids: each embedding row is read once (the exact-gradient check relies on it).
PROMPT = [1, 5, 9, 3, 30, 2, 7, 11, 20]
TARGET = 6  # The attributed token: PROMPT[6], predicted after PROMPT[:6].


def _loaded(config, model):
    """What research.checkpoint.load returns, as far as research/inspect reads it."""
    graphdef, params = nnx.split(model)
    return types.SimpleNamespace(model_config=config, graphdef=graphdef, params=params)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def inspected(request):
    config = FAMILIES[request.param]
    model = random_model(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    found = inspect_prompt(_loaded(config, model), PROMPT, top_k=4, target=(TARGET, None))
    return config, model, found


def _log_softmax(logits):
    return np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1))


def test_last_lens_row_is_the_models_own_output(inspected):
    config, model, found = inspected
    t, k = len(PROMPT), 4
    logprobs = _log_softmax(jitted(model)(jnp.asarray([PROMPT]))[0])  # The fused path.
    np.testing.assert_allclose(found.logprobs, logprobs, atol=2e-5)
    top_ids = np.argsort(-logprobs, axis=-1)[:, :k]
    np.testing.assert_array_equal(found.lens_top_ids[-1], top_ids)
    np.testing.assert_array_equal(found.top_ids, top_ids)
    np.testing.assert_allclose(
        found.lens_top_logprobs[-1], np.take_along_axis(logprobs, top_ids, 1), atol=2e-5
    )
    nexts = np.asarray(PROMPT[1:])[:, None]
    actual = np.take_along_axis(logprobs[:-1], nexts, 1)[:, 0]
    np.testing.assert_allclose(found.lens_next_logprob[-1], actual, atol=2e-5)
    np.testing.assert_allclose(found.next_logprob, actual, atol=2e-5)
    assert found.lens_top_ids.shape == (config.num_layers + 1, t, k)
    assert found.lens_next_logprob.shape == (config.num_layers + 1, t - 1)
    # Earlier rows read other (not final) residual streams.
    assert not np.allclose(found.lens_top_logprobs[0], found.lens_top_logprobs[-1])


def test_attention_weights_equal_a_numpy_reference(inspected):
    config, model, found = inspected
    t = len(PROMPT)
    weights = []
    tokens = np.asarray([PROMPT])
    positions = np.arange(t)[None]
    ref.decoder(numpy_params(model), config, tokens, positions, np.ones_like(tokens), weights)
    expected = np.stack([w[0] for w in weights])  # [L, N, T, T], query heads expanded.
    assert found.attention.shape == (config.num_layers, config.num_heads, t, t)
    np.testing.assert_allclose(found.attention.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(found.attention, expected, atol=1e-5)
    assert np.all(found.attention[:, :, np.triu_indices(t, 1)[0], np.triu_indices(t, 1)[1]] == 0)


def test_attribution_is_gradient_times_input(inspected):
    """The exact gradient comes from an independent route: d log p / d (embedding table) at
    each prompt token's row, through the plain model (untied head, no learned positions:
    those rows are the inputs)."""
    config, model, found = inspected
    assert (found.target_position, found.target_token) == (TARGET, PROMPT[TARGET])
    assert np.all(found.attribution[TARGET:] == 0) and np.all(found.attribution_norm[:TARGET] > 0)
    if config.tie_embeddings or config.positions == "learned":
        return
    graphdef, params = nnx.split(model)

    def target_logprob(params):
        logits = nnx.merge(graphdef, params)(jnp.asarray([PROMPT]))
        return jax.nn.log_softmax(logits[0, TARGET - 1])[PROMPT[TARGET]]

    value, grads = jax.jit(jax.value_and_grad(target_logprob))(params)
    table = np.asarray(params["embedding"]["embedding"][...])[PROMPT]
    rows = np.asarray(grads["embedding"]["embedding"][...])[PROMPT]
    assert found.target_logprob == pytest.approx(float(value), abs=2e-5)
    np.testing.assert_allclose(found.attribution, (rows * table).sum(-1), atol=2e-5)
    np.testing.assert_allclose(
        found.attribution_norm, np.linalg.norm(rows * table, axis=-1), atol=2e-5
    )


@pytest.mark.parametrize("variant", ["int8", "lora"])
def test_quantized_and_lora_models_go_through_the_same_capture(variant):
    model = random_model(lambda: Decoder(LLAMA, rngs=nnx.Rngs(0)), scale=0.3)
    if variant == "int8":
        params = nnx.state(model, nnx.Param).to_pure_dict()
        config, qparams = quantize.quantize_params(LLAMA, params, "int8", 0)
        model = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
        nnx.update(model, jax.tree.map(jnp.asarray, qparams))
    else:
        config = LLAMA.replace(lora_rank=2, lora_targets=("q_proj", "down_proj"))
        model = random_model(lambda: Decoder(config, rngs=nnx.Rngs(0)), scale=0.3)
    attention = variant == "int8"
    # Short (5 rows): the int8 kernel's path; the default target, the top choice after it.
    found = inspect_prompt(_loaded(config, model), PROMPT[:5], top_k=3, attention=attention)
    logprobs = _log_softmax(jitted(model)(jnp.asarray([PROMPT[:5]]))[0])
    np.testing.assert_allclose(found.logprobs, logprobs, atol=2e-5)
    if attention:
        np.testing.assert_allclose(found.attention.sum(-1), 1.0, atol=1e-5)
    else:
        assert found.attention is None
    assert (found.target_position, found.target_token) == (5, found.top_ids[-1, 0])
    assert found.target_logprob == pytest.approx(float(logprobs[-1].max()), abs=2e-5)
    assert np.all(np.isfinite(found.attribution)) and np.all(found.attribution_norm > 0)


def test_bad_inputs_are_user_errors():
    model = random_model(lambda: Decoder(LLAMA, rngs=nnx.Rngs(0)))
    loaded = _loaded(LLAMA, model)
    cases = [
        ([], {}, "empty"),
        (list(range(33)), {}, "context is 32"),
        ([1, 2, 40], {}, "must be in [0, 37)"),
        (PROMPT, {"target": (0, None)}, "target position 0 must be in [1, 9]"),
        (PROMPT, {"target": (10, None)}, "target position 10"),
        (PROMPT, {"target": (3, 37)}, "target token 37"),
    ]
    for ids, kwargs, fragment in cases:
        with pytest.raises(UserError, match=re.escape(fragment)):
            inspect_prompt(loaded, ids, **kwargs)
    long = _loaded(LLAMA.replace(max_seq_len=512), model)
    with pytest.raises(UserError, match=f"at most {MAX_ATTENTION_TOKENS}"):
        inspect_prompt(long, [3] * (MAX_ATTENTION_TOKENS + 1))


def test_compare_kl_equals_numpy_and_is_zero_against_itself():
    base_model = random_model(lambda: Decoder(LLAMA, rngs=nnx.Rngs(0)), seed=0)
    other_model = random_model(lambda: Decoder(LLAMA, rngs=nnx.Rngs(0)), seed=1)
    base, other = _loaded(LLAMA, base_model), _loaded(LLAMA, other_model)
    for loaded in (base, other):
        loaded.tokenizer = None
    result = compare(base, other, PROMPT)

    def reference_logprobs(model):  # float64, no JAX.
        tokens = np.asarray([PROMPT])
        positions, segments = np.arange(len(PROMPT))[None], np.ones_like(tokens)
        logits = ref.decoder(numpy_params(model), LLAMA, tokens, positions, segments)[0]
        shifted = logits - logits.max(-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))

    p_log, q_log = reference_logprobs(base_model), reference_logprobs(other_model)
    kl = (np.exp(p_log) * (p_log - q_log)).sum(-1)
    np.testing.assert_allclose(result.kl, kl, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(result.base_top1, p_log.argmax(-1))
    np.testing.assert_array_equal(result.changed, p_log.argmax(-1) != q_log.argmax(-1))
    assert list(result.order) == sorted(range(len(PROMPT)), key=lambda t: -kl[t])
    same = compare(base, base, PROMPT)
    assert np.all(same.kl == 0) and not same.changed.any()
    # Equal KL: positions keep their order.
    tied = compare_logprobs(np.zeros((3, 4)), np.zeros((3, 4)))
    assert list(tied.order) == [0, 1, 2]


def test_compare_refuses_another_vocabulary():
    model = random_model(lambda: Decoder(LLAMA, rngs=nnx.Rngs(0)))
    base = _loaded(LLAMA, model)
    other = _loaded(LLAMA.replace(vocab_size=40), model)
    base.tokenizer = other.tokenizer = None
    with pytest.raises(UserError, match="vocabulary of 37 tokens and other 40"):
        check_same_vocabulary(base, other)
