"""The loop end to end on a tiny corpus: the loss falls, metrics are written, NaN stops it."""

import json
import os

import numpy as np
import pytest

from research.data import DataConfig, prepare_data
from research.model import ModelConfig
from research.train import NonFiniteLossError, TrainConfig, train

MODEL = ModelConfig(
    vocab_size=320,
    d_model=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=64,
    max_seq_len=32,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis"]
    for index in range(40):
        # Mostly a fixed verse, so that a tiny model learns it quickly.
        body = " ".join(words) + ". " + " ".join(rng.choice(words, size=2)) + ".\n"
        (corpus / f"doc{index}.txt").write_text(f"Document {index}.\n" + body * 6)
    config = DataConfig(sources=(str(corpus),), vocab_size=320, min_chars=16)
    return prepare_data(config, str(tmp_path_factory.mktemp("data")), log=lambda _: None).directory


def test_fifty_steps_drop_the_loss_and_write_metrics(data_dir, tmp_path):
    config = TrainConfig(
        num_steps=50,
        batch_size=8,
        seq_len=32,
        learning_rate=1e-2,
        warmup_steps=5,
        log_every=1,
        eval_every=25,
        eval_batches=2,
        peak_flops_per_device=1e11,
    )
    lines = []
    _, state, last = train(
        MODEL, config, data_dir=data_dir, workdir=str(tmp_path), log=lines.append
    )
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 51))
    assert records[0]["loss"] > 0.9 * np.log(MODEL.vocab_size)  # Starts near uniform.
    assert records[-1]["loss"] < 0.25 * records[0]["loss"]
    assert {"loss", "learning_rate", "tokens_per_s", "mfu"} <= set(records[0])
    assert [r["step"] for r in records if "val_loss" in r] == [25, 50]
    assert int(state.step) == 50
    assert os.path.getsize(tmp_path / "plots" / "loss.png") > 1000
    assert os.listdir(tmp_path / "tensorboard")
    assert any("ETA" in line and "tok/s" in line and "MFU" in line for line in lines)


def test_non_finite_loss_stops_and_names_the_step(data_dir, tmp_path):
    config = TrainConfig(
        num_steps=20,
        batch_size=8,
        seq_len=32,
        learning_rate=1e30,
        warmup_steps=0,
        grad_clip_norm=0.0,
        log_every=100,
        eval_every=0,
        peak_flops_per_device=1e11,
    )
    with pytest.raises(NonFiniteLossError, match=r"at step \d+"):
        train(MODEL, config, data_dir=data_dir, workdir=str(tmp_path), log=lambda _: None)
