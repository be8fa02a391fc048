"""Distillation: the loss against NumPy, and a student that moves towards its teacher."""

import numpy as np
import pytest
from flax import nnx

from research.compression import corpus, distill, prune
from research.data import default_corpus_documents, train_tokenizer
from research.model import Decoder
from tests.compression.test_quantize import CONFIG
from tests.model.helpers import random_model


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize(("alpha", "temperature"), [(0.9, 2.0), (0.0, 1.0), (1.0, 0.5)])
def test_loss_matches_numpy(alpha, temperature):
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(2, 2, 5, 11)) * 3
    targets = rng.integers(0, 11, size=(2, 5))
    weights = (rng.random((2, 5)) > 0.3).astype(np.float32)
    loss, parts = distill.distill_loss(
        student, teacher, targets, weights, alpha=alpha, temperature=temperature
    )
    logp_t = _log_softmax(teacher / temperature)
    logp_s = _log_softmax(student / temperature)
    kl = (np.exp(logp_t) * (logp_t - logp_s)).sum(-1)
    kd = temperature**2 * (kl * weights).sum() / weights.sum()
    nll = -np.take_along_axis(_log_softmax(student), targets[..., None], -1)[..., 0]
    ce = (nll * weights).sum() / weights.sum()
    np.testing.assert_allclose(float(parts["kd"]), kd, rtol=1e-5)
    np.testing.assert_allclose(float(parts["ce"]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(loss), alpha * kd + (1 - alpha) * ce, rtol=1e-5)


def test_a_pruned_student_moves_towards_its_teacher():
    config = CONFIG.replace(num_layers=3)
    teacher = random_model(lambda: Decoder(config, rngs=nnx.Rngs(0)), scale=0.3)
    t_graphdef, t_params = nnx.split(teacher, nnx.Param)
    s_config, s_pure = prune.drop_layers(config, t_params, [0, 2])
    student = nnx.eval_shape(lambda: Decoder(s_config, rngs=nnx.Rngs(0)))
    s_graphdef, s_params = nnx.split(student, nnx.Param)
    nnx.replace_by_pure_dict(s_params, s_pure)
    tokenizer = train_tokenizer(default_corpus_documents()[:20], config.vocab_size)
    batches = corpus.training_batches(tokenizer, 4, 32, documents=default_corpus_documents()[:20])
    settings = distill.DistillConfig(steps=30, batch_size=4, seq_len=32, learning_rate=3e-3)
    _, history = distill.distill(
        (s_graphdef, s_params), (t_graphdef, t_params), batches, settings, log=lambda _: None
    )
    assert len(history) == 10 and history[-1]["step"] == 30
    assert history[-1]["kd"] < 0.6 * history[0]["kd"], history
