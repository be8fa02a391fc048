"""The loop end to end on a tiny corpus: the loss falls, metrics are written, NaN stops it."""

import json
import os

import numpy as np
import pytest

from research.checkpoint import CheckpointConfig
from research.data import DataConfig, prepare_data
from research.errors import UserError
from research.model import ModelConfig
from research.train import NonFiniteLossError, TrainConfig, train
from research.train.loop import Preempted, PreemptionNotice
from research.train.metrics_writer import read_metrics, truncate_metrics

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


def _metrics(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_torn_last_metrics_line_is_dropped_and_the_run_resumes_exactly(data_dir, tmp_path, caplog):
    config = TrainConfig(
        num_steps=6, batch_size=8, seq_len=32, log_every=1, eval_every=0,
        peak_flops_per_device=1e11,
    )  # fmt: skip
    checkpoint = CheckpointConfig(save_every=2, keep=5, async_save=False)
    run = dict(data_dir=data_dir, log=lambda _: None, checkpoint=checkpoint)
    train(MODEL, config, workdir=str(tmp_path / "reference"), **run)
    workdir = tmp_path / "run"
    notice = PreemptionNotice()  # Stops the run at step 4, as a kill would.
    stop_at_4 = lambda line: setattr(notice, "requested", line.startswith("step 4/"))
    with pytest.raises(Preempted):
        train(MODEL, config, workdir=str(workdir), **dict(run, log=stop_at_4, preemption=notice))
    path = workdir / "metrics.jsonl"
    before = path.read_text()
    path.write_text(before + '{"step": 5, "loss": 4.1')  # Killed while writing step 5's record.
    lines = []
    train(MODEL, config, workdir=str(workdir), **dict(run, log=lines.append))
    assert "resumed from step 4" in "\n".join(lines)
    assert path.read_text().startswith(before)  # Steps 1-4 kept as they were.
    records, reference = _metrics(path), _metrics(tmp_path / "reference" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert [r["loss"] for r in records] == [r["loss"] for r in reference]
    assert any("torn last line 5" in r.getMessage() for r in caplog.records)


def test_corrupt_metrics_line_before_the_last_is_a_user_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "lo\n{"step": 3, "loss": 4.0}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl line 2 is not valid JSON.*Fix or delete"):
        truncate_metrics(path, 3)
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_truncating_metrics_replaces_the_file_atomically(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    text = "".join(json.dumps({"step": step, "loss": 1.0}) + "\n" for step in (1, 2, 3))
    path.write_text(text)
    os.chmod(path, 0o640)

    def crash(*args):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", crash)
        with pytest.raises(OSError, match="disk full"):
            truncate_metrics(path, 1)
    assert path.read_text() == text and os.listdir(tmp_path) == ["metrics.jsonl"]
    truncate_metrics(path, 2)
    assert [r["step"] for r in _metrics(path)] == [1, 2]
    assert os.listdir(tmp_path) == ["metrics.jsonl"]
    assert os.stat(path).st_mode & 0o777 == 0o640


def _tree_size(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_a_lora_run_saves_only_adapters_resumes_over_its_base_and_loads(data_dir, tmp_path):
    import jax
    from flax import nnx

    from research.checkpoint import load_model
    from research.checkpoint.pretrained import Pretrained, load_pretrained, save_as_run
    from research.model import Decoder, lora

    def base_run(directory, seed):
        params = nnx.state(Decoder(MODEL, rngs=nnx.Rngs(seed)), nnx.Param)
        source = {"format": "cirrus", "path": str(directory)}
        save_as_run(str(directory), Pretrained(MODEL, params, source, None), log=lambda _: None)

    def load(directory):  # Afresh for each run: training donates (consumes) init_params.
        return load_pretrained(str(directory), log=lambda _: None).params

    base_run(tmp_path / "base", 0)
    base_run(tmp_path / "other", 1)
    config = TrainConfig(
        num_steps=6, batch_size=8, seq_len=32, log_every=1, eval_every=0,
        learning_rate=1e-2, peak_flops_per_device=1e11,
    )  # fmt: skip
    model = MODEL.replace(lora_rank=4, lora_targets=("q_proj", "v_proj"))
    checkpoint = CheckpointConfig(save_every=2, keep=5, async_save=False)
    meta = {"init_from": {"format": "cirrus", "path": str(tmp_path / "base")}}
    run = dict(data_dir=data_dir, checkpoint=checkpoint, meta=meta, log=lambda _: None)
    _, reference, _ = train(
        model, config, workdir=str(tmp_path / "ref"), init_params=load(tmp_path / "base"), **run
    )

    # Stopped at step 4, then resumed over the base read again: the same run as without a stop.
    workdir = tmp_path / "run"
    notice = PreemptionNotice()
    stop_at_4 = lambda line: setattr(notice, "requested", line.startswith("step 4/"))
    with pytest.raises(Preempted):
        train(model, config, workdir=str(workdir), init_params=load(tmp_path / "base"),
              preemption=notice,
              **dict(run, log=stop_at_4))  # fmt: skip
    # The step holds the adapters alone: a fraction of the base's bytes.
    saved = _tree_size(workdir / "ckpt" / "4" / "params")
    assert saved < 0.3 * _tree_size(tmp_path / "base" / "ckpt" / "0" / "params")
    with pytest.raises(UserError, match="LoRA adapters only.*--init_from="):
        train(model, config, workdir=str(workdir), **run)
    with pytest.raises(UserError, match="fingerprint"):
        train(model, config, workdir=str(workdir), init_params=load(tmp_path / "other"), **run)
    lines = []
    _, resumed, _ = train(
        model,
        config,
        workdir=str(workdir),
        init_params=load(tmp_path / "base"),
        **dict(run, log=lines.append),
    )
    assert "resumed from step 4" in "\n".join(lines)
    for got, want in zip(
        jax.tree.leaves(resumed.params.to_pure_dict()),
        jax.tree.leaves(reference.params.to_pure_dict()),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)

    # load_model puts the adapters back on the base; a base that moved is named, and found
    # again through CIRRUS_LORA_BASE.
    loaded = load_model(str(workdir), log=lambda _: None)
    assert loaded.step == 6 and loaded.model_config.lora_rank == 4
    for got, want in zip(
        jax.tree.leaves(loaded.params.to_pure_dict()),
        jax.tree.leaves(resumed.params.to_pure_dict()),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert lora.trainable_count(loaded.params)[0] > 0
    (tmp_path / "base").rename(tmp_path / "moved")
    with pytest.raises(UserError, match="CIRRUS_LORA_BASE"):
        load_model(str(workdir), log=lambda _: None)
    os.environ["CIRRUS_LORA_BASE"] = str(tmp_path / "other")
    try:
        with pytest.raises(UserError, match="fingerprint"):
            load_model(str(workdir), log=lambda _: None)
        os.environ["CIRRUS_LORA_BASE"] = str(tmp_path / "moved")
        assert load_model(str(workdir), log=lambda _: None).step == 6
    finally:
        del os.environ["CIRRUS_LORA_BASE"]
