"""Token choice on fixed distributions: filters keep exactly their sets, penalties as specified."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.serving import SamplingParams, choose_tokens, slot_params
from research.serving.core.sampling import apply_penalties, keep_mask

PROBS = np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02, 0.0, 0.0, 0.0])
LOGITS = np.log(np.maximum(PROBS, 1e-30)).astype(np.float32)
NUM_DRAWS = 4000


@functools.partial(jax.jit, static_argnums=4)
def _choose(logits_bv, params, counts_bv, seen_bv, num_top_logprobs=0):
    index_b = jnp.zeros(logits_bv.shape[0], jnp.int32)
    return choose_tokens(logits_bv, params, counts_bv, seen_bv, index_b, num_top_logprobs)[0]


def draw(request: SamplingParams, logits_v=LOGITS, counts_v=None, seen_v=None) -> np.ndarray:
    """NUM_DRAWS tokens from one distribution, one row per seed."""
    rows = [dataclasses.replace(request, seed=seed) for seed in range(NUM_DRAWS)]
    shape = (NUM_DRAWS, len(logits_v))
    counts = np.zeros(shape, np.int32) if counts_v is None else np.broadcast_to(counts_v, shape)
    seen = np.zeros(shape, bool) if seen_v is None else np.broadcast_to(seen_v, shape)
    logits = np.broadcast_to(logits_v, shape)
    return np.asarray(_choose(logits, slot_params(rows, 4), counts, seen))


def assert_frequencies(tokens, expected_probs):
    """Empirical frequencies within 4 standard errors of the expected probabilities."""
    counts = np.bincount(tokens, minlength=len(expected_probs)) / len(tokens)
    tolerance = 4 * np.sqrt(expected_probs * (1 - expected_probs) / len(tokens)) + 1e-9
    np.testing.assert_array_less(np.abs(counts - expected_probs), tolerance)


def renormalized(keep):
    probs = np.where(keep, PROBS, 0.0)
    return probs / probs.sum()


def test_plain_sampling_follows_the_distribution():
    assert_frequencies(draw(SamplingParams(temperature=1.0)), PROBS)


def test_temperature_sharpens():
    sharp = PROBS**2 / np.sum(PROBS**2)
    assert_frequencies(draw(SamplingParams(temperature=0.5)), sharp)


def test_top_p_never_samples_outside_the_nucleus():
    # Mass before each token: 0, .4, .65, .8 -> with p = .75 the nucleus is {0, 1, 2}.
    tokens = draw(SamplingParams(temperature=1.0, top_p=0.75))
    assert set(np.unique(tokens)) <= {0, 1, 2}
    assert_frequencies(tokens, renormalized(np.arange(10) < 3))


def test_top_k_and_min_p_keep_their_sets():
    tokens = draw(SamplingParams(temperature=1.0, top_k=2))
    assert_frequencies(tokens, renormalized(np.arange(10) < 2))
    # min_p .3: p >= .3 * .4 = .12 keeps {0, 1, 2}.
    tokens = draw(SamplingParams(temperature=1.0, min_p=0.3))
    assert_frequencies(tokens, renormalized(np.arange(10) < 3))
    greedy = draw(SamplingParams(temperature=0.0, top_k=5))
    assert set(np.unique(greedy)) == {0}


def test_penalties_change_the_distribution_as_specified():
    counts_v = np.zeros(10, np.int32)
    counts_v[0] = 2
    # frequency .5 * 2 + presence ln 2: token 0's logit drops by 1 + ln 2, odds scale by e^-1 / 2.
    request = SamplingParams(temperature=1.0, frequency_penalty=0.5, presence_penalty=np.log(2))
    penalized = PROBS.copy()
    penalized[0] *= np.exp(-1.0) / 2
    assert_frequencies(draw(request, counts_v=counts_v), penalized / penalized.sum())
    # Repetition 2 on seen tokens: negative logits are multiplied by 2, i.e. p -> p^2.
    seen_v = np.zeros(10, bool)
    seen_v[[0, 1]] = True
    penalized = PROBS.copy()
    penalized[[0, 1]] **= 2
    request = SamplingParams(temperature=1.0, repetition_penalty=2.0)
    assert_frequencies(draw(request, seen_v=seen_v), penalized / penalized.sum())


def test_penalty_formula_on_signed_logits():
    logits = np.array([[2.0, -2.0, 2.0, -2.0, 1.0]], np.float32)
    seen = np.array([[True, True, False, False, False]])
    counts = np.array([[0, 0, 0, 0, 3]], np.int32)
    request = SamplingParams(repetition_penalty=4.0, presence_penalty=0.25, frequency_penalty=0.5)
    out = apply_penalties(logits, slot_params([request], 1), counts, seen)
    np.testing.assert_allclose(out, [[0.5, -8.0, 2.0, -2.0, 1.0 - 0.25 - 1.5]])


@pytest.mark.parametrize("top_k, top_p", [(150, 1.0), (0, 0.9), (120, 0.95), (5, 0.9)])
def test_filters_beyond_the_candidate_shortlist_are_exact(top_k, top_p):
    """A wide vocabulary and flat logits: k and nuclei larger than the 64 candidates."""
    rng = np.random.default_rng(0)
    logits = (rng.normal(0, 0.3, (3, 300))).astype(np.float32)
    request = SamplingParams(top_k=top_k, top_p=top_p)
    keep = np.asarray(jax.jit(keep_mask)(logits, slot_params([request] * 3, 1)))
    for row in range(3):
        order = np.argsort(-logits[row], kind="stable")
        k = top_k or 300
        kept = order[:k]
        probs = np.exp(logits[row, kept] - logits[row, kept].max())
        probs /= probs.sum()
        mass_before = np.cumsum(probs) - probs
        expected = set(kept[mass_before < top_p])
        assert set(np.flatnonzero(keep[row])) == expected
