"""Checkpoints that never lose a run: exact resume after SIGKILL, SIGTERM exit 42, reshard,
corrupt-step fallback, config mismatch."""

import functools
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from launch.config import ROOT
from research import sharding
from research.checkpoint import (
    CheckpointConfig,
    Checkpointer,
    abstract_with_shardings,
    checkpoint_dir,
    load,
    load_model,
    move_aside,
    restore_latest_usable,
)
from research.data import DataConfig, make_dataset, prepare_data
from research.errors import UserError
from research.model import ModelConfig
from research.train import TrainConfig, build_trainer, train
from tests.launch.test_train_cli import TINY_RUN
from tests.xla_flags import with_devices

MODEL = ModelConfig(
    vocab_size=320, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
    max_seq_len=32,
)  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = [
        "now",
        "is",
        "the",
        "winter",
        "of",
        "our",
        "discontent",
        "made",
        "glorious",
        "summer",
        "by",
        "this",
        "sun",
    ]
    for index in range(24):
        text = " ".join(rng.choice(words, size=120))
        (directory / f"doc{index}.txt").write_text(f"Document {index}. {text}\n")
    return directory


@pytest.fixture(scope="module")
def data_dir(corpus, tmp_path_factory):
    config = DataConfig(sources=(str(corpus),), vocab_size=320, min_chars=16)
    return prepare_data(config, str(tmp_path_factory.mktemp("data")), log=lambda _: None).directory


def _command(workdir, corpus, cache, steps):
    bindings = TINY_RUN + [
        f"data.sources = ('{corpus}',)",
        f"data.cache_dir = '{cache}'",
        f"train.num_steps = {steps}",
        "train.log_every = 1",
        "train.eval_every = 0",
        "checkpoint.save_every = 3",
        "checkpoint.keep = 2",
    ]
    return [
        sys.executable, "-m", "launch.train", "--gin_file=configs/experiment/demo.gin",
        f"--workdir={workdir}", "--sample_prompt=",
    ] + [f"--gin_bindings={b}" for b in bindings]  # fmt: skip


def _env():
    return dict(os.environ, XLA_FLAGS=with_devices(1))


def _losses(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def _wait_for_step(workdir, step, process, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = glob.glob(str(workdir / "ckpt" / "*" / "commit_success.txt"))
        if any(int(os.path.basename(os.path.dirname(p))) >= step for p in done):
            return
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.2)
    raise TimeoutError(f"no checkpoint at step {step}")


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted_run(corpus, tmp_path):
    steps = 18
    reference = tmp_path / "reference"
    result = subprocess.run(
        _command(reference, corpus, tmp_path / "c", steps), cwd=ROOT, env=_env(),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    workdir = tmp_path / "killed"
    command = _command(workdir, corpus, tmp_path / "c", steps)
    process = subprocess.Popen(
        command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_step(workdir, 6, process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    resumed = subprocess.run(
        command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stdout
    expected = _losses(reference)
    assert sorted(expected) == list(range(1, steps + 1))
    assert _losses(workdir) == expected  # Bit for bit, step for step.


@pytest.mark.slow
def test_sigterm_saves_exits_42_and_resumes(corpus, tmp_path):
    workdir = tmp_path / "run"
    command = _command(workdir, corpus, tmp_path / "c", 400)
    process = subprocess.Popen(
        command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_step(workdir, 3, process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 42, stderr[-3000:]
    saved = Checkpointer(str(workdir), CheckpointConfig()).all_steps()
    last_logged = max(_losses(workdir))
    assert saved[-1] == last_logged  # Saved at the step it stopped, not an older one.
    assert f"saved a checkpoint at step {last_logged}" in stdout


def test_fresh_moves_the_old_steps_aside_and_starts_at_step_0(corpus, tmp_path):
    workdir = tmp_path / "run"
    first = subprocess.run(
        _command(workdir, corpus, tmp_path / "c", 3), cwd=ROOT, env=_env(),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    old_losses = _losses(workdir)
    fresh = subprocess.run(
        _command(workdir, corpus, tmp_path / "c", 3) + ["--fresh"], cwd=ROOT, env=_env(),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    (old,) = glob.glob(str(workdir / "ckpt.old-*"))
    assert re.fullmatch(r"ckpt\.old-\d{8}-\d{6}", os.path.basename(old))
    assert f"--fresh: moved the old checkpoints {workdir / 'ckpt'} to {old}" in fresh.stdout
    assert "resumed from step" not in fresh.stdout
    assert os.path.isfile(os.path.join(old, "3", "commit_success.txt"))  # The old step, kept.
    assert sorted(_losses(workdir)) == [1, 2, 3]  # Started at step 0 ...
    assert _losses(workdir) == old_losses  # ... from the same initialization and data.
    checkpointer = Checkpointer(str(workdir), CheckpointConfig())
    assert checkpointer.all_steps() == [3]
    checkpointer.close()


def test_move_aside_renames_to_a_free_utc_stamped_sibling(tmp_path):
    import datetime

    import flax
    import grain
    import jax.numpy as jnp

    @flax.struct.dataclass
    class State:
        params: dict
        opt_state: dict

    now = datetime.datetime(2026, 12, 5, 3, 45, 0, tzinfo=datetime.UTC)
    moved = []
    for _ in range(2):
        checkpointer = Checkpointer(str(tmp_path), CheckpointConfig())
        iterator = iter(grain.MapDataset.range(4).to_iter_dataset())
        checkpointer.save(1, State({"w": jnp.ones(3)}, {"m": jnp.zeros(2)}), iterator, {})
        checkpointer.close()
        moved.append(move_aside(checkpoint_dir(str(tmp_path)), now=now))
    assert moved == [
        str(tmp_path / "ckpt.old-20261205-034500"),
        str(tmp_path / "ckpt.old-20261205-034500-2"),
    ]
    assert not (tmp_path / "ckpt").exists()
    for path in moved:
        assert os.path.isfile(os.path.join(path, "1", "commit_success.txt"))


def test_reshard_on_restore(data_dir, tmp_path):
    devices = jax.devices()
    config = TrainConfig(
        num_steps=3, batch_size=8, seq_len=32, log_every=3, eval_every=0, mesh_shape=(4, 1, 2),
        peak_flops_per_device=1e11,
    )  # fmt: skip
    _, state, _ = train(
        MODEL, config, data_dir=data_dir, workdir=str(tmp_path), log=lambda _: None,
        checkpoint=CheckpointConfig(save_every=3, async_save=True),
    )  # fmt: skip
    saved = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]
    for shape, devs in [((2, 1, 4), devices), ((8, 1, 1), devices), ((1, 1, 1), devices[:1])]:
        mesh = sharding.make_mesh(shape, devices=devs)
        trainer, fresh = build_trainer(MODEL, config.replace(mesh_shape=shape), mesh)
        checkpointer = Checkpointer(str(tmp_path), CheckpointConfig())
        iterator = iter(make_dataset(data_dir, "train", seq_len=32, batch_size=8))
        params, _ = checkpointer.restore(
            3, abstract_with_shardings(fresh, trainer.shardings), iterator
        )
        checkpointer.close()
        for leaf, want in zip(jax.tree.leaves(params), saved, strict=True):
            assert leaf.sharding.mesh.shape == mesh.shape
            np.testing.assert_array_equal(np.asarray(leaf), want)
    loaded = load_model(
        str(tmp_path), mesh=sharding.make_mesh((1, 1, 2), devices=devices[:2]), log=lambda _: None
    )
    assert loaded.step == 3 and loaded.model_config == MODEL
    for leaf, want in zip(jax.tree.leaves(loaded.params), saved, strict=True):
        np.testing.assert_array_equal(np.asarray(leaf), want)


def _train_steps(data_dir, workdir, steps, **kwargs):
    config = TrainConfig(
        num_steps=steps, batch_size=8, seq_len=32, log_every=1, eval_every=0,
        mesh_shape=(-1, 1, 1), peak_flops_per_device=1e11,
    )  # fmt: skip
    return train(
        kwargs.pop("model", MODEL), config, data_dir=data_dir, workdir=str(workdir),
        log=kwargs.pop("log", lambda _: None),
        checkpoint=CheckpointConfig(save_every=2, keep=5, async_save=False), **kwargs,
    )  # fmt: skip


def test_corrupt_latest_step_falls_back_with_a_warning(data_dir, tmp_path):
    _train_steps(data_dir, tmp_path, 4)
    checkpointer = Checkpointer(str(tmp_path), CheckpointConfig())
    assert checkpointer.all_steps() == [2, 4]
    checkpointer.close()
    # Truncate every array data file of step 4's parameters.
    files = [
        path
        for path in glob.glob(str(tmp_path / "ckpt" / "4" / "params" / "**" / "*"), recursive=True)
        if os.path.isfile(path) and "/d/" in path
    ]
    assert files, "expected array data files under params/"
    for path in files:
        with open(path, "r+b") as f:
            f.truncate(8)
    warnings = []
    model, _ = load_model(str(tmp_path), log=warnings.append), None
    assert model.step == 2
    assert any("step 4" in w and "unusable" in w for w in warnings)
    # With every step corrupt: a clear error, never a silent fresh start.
    for path in glob.glob(str(tmp_path / "ckpt" / "2" / "params" / "**" / "*"), recursive=True):
        if os.path.isfile(path) and "/d/" in path:
            os.remove(path)
    with pytest.raises(UserError, match="no usable checkpoint"):
        _train_steps(data_dir, tmp_path, 6)


def test_unreadable_meta_of_the_latest_step_falls_back_with_a_warning(data_dir, tmp_path):
    _train_steps(data_dir, tmp_path, 4)
    step_2 = jax.tree.leaves(load_model(str(tmp_path), step=2, log=lambda _: None).params)
    with open(tmp_path / "ckpt" / "4" / "meta" / "metadata", "r+b") as f:
        f.truncate(10)  # A meta JSON cut short.
    warnings = []
    loaded = load(str(tmp_path), log=warnings.append)  # What launch.sample calls.
    assert loaded.step == 2 and loaded.model_config == MODEL
    for leaf, want in zip(jax.tree.leaves(loaded.params), step_2, strict=True):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want))
    assert any("step 4" in w and "unusable" in w for w in warnings)
    with pytest.raises(UserError, match=r"step 4 in .* is unreadable"):
        load_model(str(tmp_path), step=4)
    # Resuming training falls back the same way, and moves step 4 aside to save it again.
    lines = []
    _, state, _ = _train_steps(data_dir, tmp_path, 6, log=lines.append)
    assert "resumed from step 2" in "\n".join(lines) and int(state.step) == 6
    assert any("step 4" in line and "unusable" in line for line in lines)
    (aside,) = glob.glob(str(tmp_path / "ckpt.unusable-step4-*"))
    assert os.path.getsize(os.path.join(aside, "meta", "metadata")) == 10
    checkpointer = Checkpointer(str(tmp_path), CheckpointConfig())
    assert checkpointer.all_steps() == [2, 4, 6]
    checkpointer.close()
    # No step readable: a clear error, never a silent fresh start.
    for step in (2, 4, 6):
        (tmp_path / "ckpt" / str(step) / "meta" / "metadata").write_text("")
    with pytest.raises(UserError, match=r"(?s)no usable checkpoint.*step 2: JSONDecodeError"):
        load(str(tmp_path), log=warnings.append)


def test_half_written_step_is_ignored(data_dir, tmp_path):
    _train_steps(data_dir, tmp_path, 2)
    os.makedirs(tmp_path / "ckpt" / "8.orbax-checkpoint-tmp-1234" / "params")
    checkpointer = Checkpointer(str(tmp_path), CheckpointConfig())
    assert checkpointer.all_steps() == [2]
    checkpointer.close()
    lines = []
    _, state, _ = _train_steps(data_dir, tmp_path, 4, log=lines.append)
    assert "resumed from step 2" in "\n".join(lines)
    assert int(state.step) == 4


def test_resume_refuses_a_different_model_shape(data_dir, tmp_path):
    _train_steps(data_dir, tmp_path, 2)
    with pytest.raises(UserError, match=r"model.d_model: saved 32, now 48"):
        _train_steps(data_dir, tmp_path, 4, model=MODEL.replace(d_model=48))


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        load_model(str(tmp_path))


def test_restore_latest_usable_on_empty_dir(tmp_path):
    checkpointer = Checkpointer(str(tmp_path), CheckpointConfig())
    assert restore_latest_usable(checkpointer, lambda step: step) == (None, None)
    checkpointer.close()


def test_keeps_the_last_k_plus_the_best_validation_step(tmp_path):
    import flax
    import grain
    import jax.numpy as jnp

    @flax.struct.dataclass
    class State:
        params: dict
        opt_state: dict

    checkpointer = Checkpointer(str(tmp_path), CheckpointConfig(keep=1, keep_best=True))
    iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
    kept = []
    for step, val_loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 4.0)]:
        state = State({"w": jnp.full(3, float(step))}, {"m": jnp.zeros(2)})
        checkpointer.save(step, state, iterator, {}, metrics={"val_loss": val_loss})
        checkpointer.wait()
        kept.append(checkpointer.all_steps())
    checkpointer.close()
    assert kept == [[1], [2], [2, 3], [2, 4]]  # Step 2 has the best validation loss.


def test_relative_workdir(tmp_path, monkeypatch):
    import flax
    import grain
    import jax.numpy as jnp

    @flax.struct.dataclass
    class State:
        params: dict
        opt_state: dict

    monkeypatch.chdir(tmp_path)
    checkpointer = Checkpointer("relative/run", CheckpointConfig())
    iterator = iter(grain.MapDataset.range(4).to_iter_dataset())
    checkpointer.save(1, State({"w": jnp.ones(3)}, {"m": jnp.zeros(2)}), iterator, {})
    checkpointer.wait()
    checkpointer.close()
    assert (tmp_path / "relative" / "run" / "ckpt" / "1" / "commit_success.txt").exists()


def test_snapshot_save_keeps_the_state_and_data_position_of_its_step(tmp_path):
    """The loop goes on (donating the state, advancing the data) while the thread saves."""
    import flax
    import grain
    import jax.numpy as jnp

    @flax.struct.dataclass
    class State:
        params: dict
        opt_state: dict

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state):  # A stand-in train step that donates (overwrites) its input buffers.
        return jax.tree.map(lambda x: x * 2 + 1, state)

    checkpointer = Checkpointer(str(tmp_path), CheckpointConfig())
    assert checkpointer.snapshot_save  # On by default; CPUs report no memory limit.
    iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
    for _ in range(7):
        next(iterator)
    state = State({"w": jnp.arange(6.0)}, {"m": jnp.full(4, 3.0)})
    want = jax.tree.map(np.asarray, state)
    checkpointer.save(1, state, iterator, {})
    for _ in range(3):
        state = step(state)
        next(iterator)
    checkpointer.wait()
    restored_iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
    params, opt_state = checkpointer.restore(
        1, jax.tree.map(jnp.zeros_like, state), restored_iterator
    )
    checkpointer.close()
    np.testing.assert_array_equal(params["w"], want.params["w"])
    np.testing.assert_array_equal(opt_state["m"], want.opt_state["m"])
    assert next(restored_iterator) == 7  # The position at save time, not 10.
