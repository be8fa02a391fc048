"""The memorisation check: counting by hand, seeded windows of the train split, and a tiny
model trained on a tiny repetitive corpus reproducing more of it than its initial weights."""

import jax
import numpy as np
import pytest

from research import sharding
from research.data import DataConfig, make_dataset, prepare_data, read_split
from research.errors import UserError
from research.evaluation.memorization import (
    evaluate_memorization,
    matched_lengths,
    summarize,
    training_snippets,
)
from research.model import ModelConfig
from research.serving import Sampler
from research.train import TrainConfig
from research.train.loop import build_trainer
from tests.data.conftest import WORDS

PREFIX, SUFFIX = 8, 8


def test_counting_by_hand():
    reference = np.array([[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8]])
    generated = np.array([[5, 6, 7, 8], [5, 6, 0, 8], [0, 6, 7, 8], [5, 6, 7, -1]])
    lengths = matched_lengths(generated, reference)
    assert lengths.tolist() == [4, 2, 0, 3]  # A later match after a miss does not count.
    assert summarize(lengths, 4) == {
        "exact_fraction": 0.25,
        "mean_matched_tokens": 2.25,
        "snippets": 4,
    }


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Six short verses, each repeated in its own document: a corpus to memorise."""
    root = tmp_path_factory.mktemp("memorization")
    rng = np.random.default_rng(0)
    for index in range(6):
        verse = " ".join(rng.choice(WORDS[:14], size=12))
        (root / f"verse{index}.txt").write_text(f"Verse {index}: {verse}.\n" * 4)
    config = DataConfig(
        sources=(str(root),), vocab_size=280, min_chars=16, num_shards=1,
        validation_fraction=0.0, test_fraction=0.0,
    )  # fmt: skip
    return prepare_data(config, str(root / "data"), log=lambda line: None)


def test_snippets_are_seeded_windows_of_train_documents(prepared):
    bos = prepared.tokenizer.bos_id
    documents = [[bos, *ids.tolist()] for ids in read_split(prepared.directory, "train")]
    snippets = training_snippets(
        prepared.directory, num_snippets=10, prefix_len=PREFIX, suffix_len=SUFFIX, seed=1
    )
    assert snippets.shape == (10, PREFIX + SUFFIX)
    for row in snippets.tolist():
        assert any(doc[i : i + len(row)] == row for doc in documents for i in range(len(doc))), row
    again = training_snippets(
        prepared.directory, num_snippets=10, prefix_len=PREFIX, suffix_len=SUFFIX, seed=1
    )
    other = training_snippets(
        prepared.directory, num_snippets=10, prefix_len=PREFIX, suffix_len=SUFFIX, seed=2
    )
    assert np.array_equal(snippets, again) and not np.array_equal(snippets, other)
    with pytest.raises(UserError, match="eval.memorization_prefix"):
        training_snippets(prepared.directory, num_snippets=4, prefix_len=500, suffix_len=500)


def test_a_trained_model_reproduces_more_than_an_untrained_one(prepared):
    model_config = ModelConfig(
        vocab_size=prepared.tokenizer.vocab_size, d_model=64, num_layers=2, num_heads=4,
        num_kv_heads=2, mlp_dim=128, max_seq_len=64,
    )  # fmt: skip
    train_config = TrainConfig(
        batch_size=8, seq_len=32, learning_rate=1e-2, warmup_steps=5, mesh_shape=(1, 1, 1),
        weight_decay=0.0,
    )  # fmt: skip
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    trainer, state = build_trainer(model_config, train_config, mesh)
    snippets = training_snippets(
        prepared.directory, num_snippets=16, prefix_len=PREFIX, suffix_len=SUFFIX
    )
    sampler = Sampler(
        model_config, trainer.graphdef, state.params, num_slots=8, max_len=PREFIX + SUFFIX
    )
    before = evaluate_memorization(sampler, snippets, prefix_len=PREFIX)
    batches = iter(
        make_dataset(prepared.directory, "train", seq_len=32, batch_size=8, shard_index=0,
                     shard_count=1)
    )  # fmt: skip
    for _ in range(100):
        state, _ = trainer.train_step(state, sharding.global_batch(trainer.mesh, next(batches)))
    sampler.set_params(state.params)
    after = evaluate_memorization(sampler, snippets, prefix_len=PREFIX)
    assert before["mean_matched_tokens"] < 2
    # Measured: 0 -> 0.5 verbatim, 0 -> 5.6 of 8 tokens matched.
    assert after["exact_fraction"] >= 0.25 > before["exact_fraction"], after
    assert after["mean_matched_tokens"] > before["mean_matched_tokens"] + 3
    assert after["snippets"] == 16 and after["suffix_tokens"] == SUFFIX
