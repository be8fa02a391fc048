"""Loss, perplexity, bits per byte and accuracy against a NumPy float64 computation."""

import math

import numpy as np
import pytest
from flax import nnx

from research.evaluation import evaluate_documents, evaluate_texts, windows
from tests.evaluation.helpers import CharTokenizer
from tests.model import numpy_reference
from tests.model.helpers import numpy_params
from tests.serving.helpers import LLAMA, random_split

SEQ_LEN = 16


@pytest.fixture(scope="module")
def model():
    return random_split(LLAMA, seed=3, scale=0.3)


def _documents():
    rng = np.random.default_rng(0)
    return [[1, *rng.integers(3, LLAMA.vocab_size, n - 2), 2] for n in (3, 9, 20, 45)]


def numpy_metrics(graphdef, params, documents, num_bytes, stride):
    """Every target scored with the context of the first window that reaches it."""
    reference = numpy_params(nnx.merge(graphdef, params))
    nll, correct, count = 0.0, 0, 0
    for doc in documents:
        n = len(doc) - 1
        for t in range(n):
            begin = 0
            while min(begin + SEQ_LEN, n) <= t:
                begin += stride
            window = np.asarray(doc[begin : t + 1])[None]
            positions = np.arange(window.shape[1])[None]
            logits = numpy_reference.decoder(
                reference, LLAMA, window, positions, np.ones_like(window)
            )[0, -1]
            log_z = np.log(np.sum(np.exp(logits - logits.max()))) + logits.max()
            nll -= logits[doc[t + 1]] - log_z
            correct += int(np.argmax(logits) == doc[t + 1])
            count += 1
    loss = nll / count
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": nll / math.log(2) / num_bytes,
        "accuracy": correct / count,
        "tokens": count,
    }


@pytest.mark.parametrize("stride", [SEQ_LEN, 6])
def test_metrics_match_numpy(model, stride):
    graphdef, params = model
    documents = _documents()
    got = evaluate_documents(
        graphdef, params, documents, num_bytes=123, seq_len=SEQ_LEN, stride=stride, batch_size=2
    )
    expected = numpy_metrics(graphdef, params, documents, 123, stride)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, err_msg=name)
    assert got["documents"] == 4 and got["bytes"] == 123


def test_windows_score_every_target_once_with_enough_context():
    tokens = np.arange(41)
    for stride in (1, 4, 10):
        spans = windows(tokens, 10, stride)
        scored = np.concatenate([s.tokens[1:][s.score_from :] for s in spans])
        np.testing.assert_array_equal(scored, tokens[1:])
        for span in spans[1:]:
            assert span.score_from >= 10 - stride and len(span.tokens) <= 11


def test_texts_count_utf8_bytes(model):
    graphdef, params = model
    texts = ["hello world.", "naïve"]  # "ï" is 2 bytes and one (unknown) character
    got = evaluate_texts(graphdef, params, CharTokenizer(), texts, seq_len=SEQ_LEN)
    assert got["bytes"] == 12 + 6 and got["tokens"] == 12 + 5 + 2
    no_eos = evaluate_texts(
        graphdef, params, CharTokenizer(), texts, seq_len=SEQ_LEN, append_eos=False
    )
    assert no_eos["tokens"] == 12 + 5
