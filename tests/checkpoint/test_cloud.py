"""gs:// workdirs against a real GCS emulator (fake-gcs-server) on 127.0.0.1."""

import datetime

import jax
import numpy as np
import pytest
from etils import epath

from research.checkpoint import (
    CheckpointConfig,
    Checkpointer,
    checkpoint_dir,
    load_model,
    move_aside,
)
from research.errors import UserError
from research.train import TrainConfig, train
from tests.checkpoint.test_resume import MODEL, corpus, data_dir  # noqa: F401
from tests.storage_emulators import fake_gcs_server


@pytest.fixture(scope="module")
def gcs():
    with fake_gcs_server(buckets=("bucket",)) as url:
        yield url


def _config(steps):
    return TrainConfig(
        num_steps=steps, batch_size=8, seq_len=32, log_every=2, eval_every=0,
        mesh_shape=(2, 1, 4), peak_flops_per_device=1e11,
    )  # fmt: skip


def test_train_resume_and_load_on_gcs(gcs, data_dir):  # noqa: F811
    workdir = "gs://bucket/runs/one"
    checkpoint = CheckpointConfig(save_every=2, keep=2)
    _, state, _ = train(
        MODEL, _config(4), data_dir=data_dir, workdir=workdir, log=lambda _: None,
        checkpoint=checkpoint,
    )  # fmt: skip
    checkpointer = Checkpointer(workdir, checkpoint)
    assert checkpointer.all_steps() == [2, 4]
    checkpointer.close()
    root = epath.Path(workdir)
    assert (root / "metrics.jsonl").read_text().count("\n") == 2
    assert (root / "plots" / "loss.png").exists()
    assert list((root / "tensorboard").iterdir())

    lines = []
    _, resumed, _ = train(
        MODEL, _config(6), data_dir=data_dir, workdir=workdir, log=lines.append,
        checkpoint=checkpoint,
    )  # fmt: skip
    assert any("resumed from step 4" in line for line in lines)
    assert int(resumed.step) == 6

    loaded = load_model(workdir, log=lambda _: None)
    assert loaded.step == 6
    for a, b in zip(
        jax.tree.leaves(loaded.params), jax.tree.leaves(jax.device_get(resumed.params)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_bucket_is_a_clear_error(gcs):
    with pytest.raises(UserError, match="bucket gs://no-such-bucket does not exist"):
        Checkpointer("gs://no-such-bucket/run", CheckpointConfig())


def test_move_aside_on_gcs(gcs, data_dir):  # noqa: F811
    """--fresh on gs://: no rename there, so every object is copied, then the original removed."""
    workdir = "gs://bucket/runs/fresh"
    checkpoint = CheckpointConfig(save_every=2, keep=2)
    train(
        MODEL, _config(2), data_dir=data_dir, workdir=workdir, log=lambda _: None,
        checkpoint=checkpoint,
    )  # fmt: skip
    now = datetime.datetime(2026, 12, 5, 3, 45, 0, tzinfo=datetime.UTC)
    moved = move_aside(checkpoint_dir(workdir), now=now)
    assert moved == "gs://bucket/runs/fresh/ckpt.old-20261205-034500"
    assert (epath.Path(moved) / "2" / "commit_success.txt").exists()
    assert not epath.Path(checkpoint_dir(workdir)).exists()
    checkpointer = Checkpointer(workdir, checkpoint)
    assert checkpointer.all_steps() == []
    checkpointer.close()
