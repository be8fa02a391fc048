"""Distillation: the loss against NumPy, and a student that moves towards its teacher."""

import jax
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
    t_params = nnx.state(teacher, nnx.Param)
    s_config, s_pure = prune.drop_layers(config, t_params, [0, 2])
    tokenizer = train_tokenizer(default_corpus_documents()[:20], config.vocab_size)
    batches = corpus.training_batches(tokenizer, 4, 32, documents=default_corpus_documents()[:20])
    settings = distill.DistillConfig(steps=30, batch_size=4, seq_len=32, learning_rate=3e-3)
    _, history = distill.distill(
        (s_config, s_pure), (config, t_params), batches, settings, log=lambda _: None
    )
    assert len(history) == 10 and history[-1]["step"] == 30
    assert history[-1]["kd"] < 0.6 * history[0]["kd"], history


def test_distillation_on_a_sharded_mesh_matches_one_device():
    """The teacher rides along sharded like the student (tensor and fsdp axes); the losses
    equal the single-device run's."""
    from research import sharding

    config = CONFIG.replace(num_layers=2)
    teacher = random_model(lambda: Decoder(config, rngs=nnx.Rngs(0)), scale=0.3)
    t_params = nnx.state(teacher, nnx.Param)
    s_config, s_pure = prune.drop_layers(config, t_params, [1])
    tokenizer = train_tokenizer(default_corpus_documents()[:20], config.vocab_size)
    settings = distill.DistillConfig(steps=4, batch_size=4, seq_len=16, learning_rate=3e-3)
    histories = []
    for mesh in (None, sharding.make_mesh((1, 2, 2), devices=jax.devices()[:4])):
        batches = corpus.training_batches(
            tokenizer, 4, 16, documents=default_corpus_documents()[:20]
        )
        _, history = distill.distill(
            (s_config, s_pure), (config, t_params), batches, settings, mesh=mesh,
            log=lambda _: None,
        )  # fmt: skip
        histories.append(history)
    for one, sharded in zip(*histories, strict=True):
        np.testing.assert_allclose(sharded["kd"], one["kd"], rtol=2e-4)
        np.testing.assert_allclose(sharded["ce"], one["ce"], rtol=2e-4)


def test_topk_loss_with_every_logit_equals_the_online_loss():
    """With k = vocab the cached-logits KD is the full KL; with k < vocab it is the KL to the
    teacher renormalised over its top k (NumPy)."""
    rng = np.random.default_rng(1)
    student = rng.normal(size=(2, 5, 11)).astype(np.float32) * 2
    teacher = rng.normal(size=(2, 5, 11)).astype(np.float32) * 2
    targets = rng.integers(0, 11, size=(2, 5))
    weights = (rng.random((2, 5)) > 0.2).astype(np.float32)

    def top(k):
        ids = np.argsort(-teacher, axis=-1)[..., :k]
        return np.take_along_axis(teacher, ids, -1), ids.astype(np.int32)

    values, ids = top(11)
    kd_full = distill.topk_kd(student, values, ids, weights, temperature=2.0)
    _, parts = distill.distill_loss(student, teacher, targets, weights, alpha=1.0, temperature=2.0)
    np.testing.assert_allclose(float(kd_full) / weights.sum(), float(parts["kd"]), rtol=1e-5)
    values, ids = top(3)
    kd3 = distill.topk_kd(student, values, ids, weights, temperature=2.0)
    logp_t = _log_softmax(values / 2.0)
    logp_s = np.take_along_axis(_log_softmax(student / 2.0), ids, -1)
    expected = 4.0 * ((np.exp(logp_t) * (logp_t - logp_s)).sum(-1) * weights).sum()
    np.testing.assert_allclose(float(kd3), expected, rtol=1e-5)


def test_cached_topk_distillation_reuses_the_cache_and_moves_the_student(tmp_path):
    config = CONFIG.replace(num_layers=3)
    teacher = random_model(lambda: Decoder(config, rngs=nnx.Rngs(0)), scale=0.3)
    t_params = nnx.state(teacher, nnx.Param)
    s_config, s_pure = prune.drop_layers(config, t_params, [0, 2])
    documents = default_corpus_documents()[:20]
    tokenizer = train_tokenizer(documents, config.vocab_size)
    settings = distill.DistillConfig(
        steps=10, batch_size=4, seq_len=32, learning_rate=3e-3, teacher_topk=16,
        cache_dir=str(tmp_path),
    )  # fmt: skip
    runs = []
    for _ in range(2):
        lines = []
        batches = corpus.training_batches(tokenizer, 4, 32, documents=documents)
        _, history = distill.distill(
            (s_config, s_pure), (config, t_params), batches, settings, log=lines.append
        )
        runs.append((lines, history))
    assert any("cached the teacher's top-16 logits" in line for line in runs[0][0])
    assert any("reusing the teacher's cached top-16" in line for line in runs[1][0])
    assert len(list(tmp_path.glob("teacher_top16-*.npz"))) == 1
    first, second = runs[0][1], runs[1][1]
    assert [h["kd"] for h in first] == [h["kd"] for h in second]  # Same cache, same run.
    assert first[-1]["kd"] < 0.8 * first[0]["kd"], first
