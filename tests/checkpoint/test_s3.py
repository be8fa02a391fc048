"""s3:// workdirs against a real S3 server (moto, its own process) on 127.0.0.1."""

import datetime
import subprocess

import botocore.session
import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from launch.config import ROOT
from research.checkpoint import (
    CheckpointConfig,
    Checkpointer,
    abstract_with_shardings,
    checkpoint_dir,
    load_model,
    move_aside,
    restore_latest_usable,
)
from research.errors import UserError
from tests.checkpoint.test_resume import _command, _env, corpus  # noqa: F401
from tests.storage_emulators import free_port, moto_s3_server, s3_environment


@flax.struct.dataclass
class State:
    params: dict
    opt_state: dict


@pytest.fixture(scope="module")
def s3():
    with moto_s3_server(buckets=("bucket",)) as url:
        yield url


def _client():
    return botocore.session.get_session().create_client("s3")  # Endpoint from the environment.


def _keys(prefix):
    pages = _client().get_paginator("list_objects_v2").paginate(Bucket="bucket", Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def _state(mesh, scale):
    """A train state sharded over both mesh axes, and one replicated leaf."""
    w = jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8) * scale
    params = {
        "w": jax.device_put(w, NamedSharding(mesh, P("a", "b"))),
        "b": jax.device_put(jnp.full(8, scale, jnp.bfloat16), NamedSharding(mesh, P())),
    }
    opt_state = {"m": jax.device_put(w / 2, NamedSharding(mesh, P("b", None)))}
    return State(params, opt_state)


def _abstract(state, mesh, specs):
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)
    return abstract_with_shardings(state, shardings)


def _iterator():
    return iter(grain.MapDataset.range(100).shuffle(seed=3).to_iter_dataset())


def test_sharded_round_trip_keep_and_resume_position(s3):
    mesh = jax.make_mesh((4, 2), ("a", "b"), devices=jax.devices()[:8])
    workdir = "s3://bucket/roundtrip"
    checkpointer = Checkpointer(workdir, CheckpointConfig(keep=2))
    iterator = _iterator()
    for step in (1, 2, 3):
        next(iterator)
        checkpointer.save(step, _state(mesh, step), iterator, {"note": "s3"})
    checkpointer.wait()
    expected_next = next(iterator)
    checkpointer.close()
    # Only committed steps, the last two; the arrays are S3 objects under the step.
    assert _keys("roundtrip/ckpt/3/commit_success.txt")
    assert any("/params/" in key and "/d/" in key for key in _keys("roundtrip/ckpt/3/"))
    assert not _keys("roundtrip/ckpt/1/")

    saved = _state(mesh, 3)
    # Restore onto a different mesh and different shardings than the ones saved.
    other = jax.make_mesh((2, 4), ("a", "b"), devices=jax.devices()[:8])
    abstract = State(
        _abstract(saved.params, other, {"w": P("b", "a"), "b": P("a")}),
        _abstract(saved.opt_state, other, {"m": P(None, "b")}),
    )
    checkpointer = Checkpointer(workdir, CheckpointConfig())
    assert checkpointer.all_steps() == [2, 3] and checkpointer.latest_step() == 3
    assert checkpointer.read_meta(3) == {"note": "s3", "step": 3}
    restored_iterator = _iterator()
    params, opt_state = checkpointer.restore(3, abstract, restored_iterator)
    checkpointer.close()
    assert next(restored_iterator) == expected_next  # The data position comes back too.
    for got, want in zip(
        jax.tree.leaves((params, opt_state)), jax.tree.leaves((saved.params, saved.opt_state)),
        strict=True,
    ):  # fmt: skip
        assert got.dtype == want.dtype and got.sharding.mesh.shape == other.shape
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert params["w"].sharding.spec == P("b", "a")


@pytest.mark.slow
def test_launch_train_checkpoints_to_s3_and_resumes(s3, corpus, tmp_path):  # noqa: F811
    workdir = "s3://bucket/runs/cli"
    extra = ["--gin_bindings=train.task_eval_every = 0"]
    # The second run reuses the first one's compilations: this test is about storage.
    env = dict(
        _env(), JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )  # fmt: skip
    first = subprocess.run(
        _command(workdir, corpus, tmp_path / "c", 3) + extra, cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    root = epath.Path(workdir)
    assert (root / "ckpt" / "3" / "commit_success.txt").exists()
    second = subprocess.run(
        _command(workdir, corpus, tmp_path / "c", 6) + extra, cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 3" in second.stdout
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in
             (root / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (root / "tokenizer" / "tokenizer.json").exists()
    assert (root / "config.gin").exists() and (root / "plots" / "loss.png").exists()
    assert list((root / "tensorboard").iterdir())
    # The saved model loads straight from S3, tokenizer included.
    loaded = load_model(workdir, log=lambda _: None)
    assert loaded.step == 6 and loaded.tokenizer is not None
    assert loaded.model_config.d_model == 32


def test_half_written_step_is_ignored_and_can_be_saved_again(s3):
    mesh = jax.make_mesh((8,), ("a",), devices=jax.devices()[:8])
    workdir = "s3://bucket/half"

    def state(scale):
        w = jax.device_put(jnp.full(16, scale), NamedSharding(mesh, P("a")))
        return State({"w": w}, {"m": jnp.zeros(2)})

    checkpointer = Checkpointer(workdir, CheckpointConfig(async_save=False))
    checkpointer.save(2, state(2.0), _iterator(), {})
    checkpointer.close()
    # Written behind this process's back (another host, a copy): step 5, complete, and step 8,
    # a crash mid-save: every object of the step except its commit files.
    client = _client()
    for key in _keys("half/ckpt/2/"):
        for target_step in (5, 8):
            if target_step == 8 and key.endswith("commit_success.txt"):
                continue
            target = key.replace("half/ckpt/2/", f"half/ckpt/{target_step}/")
            client.copy_object(Bucket="bucket", Key=target, CopySource=f"bucket/{key}")
    assert _keys("half/ckpt/8/")

    checkpointer = Checkpointer(workdir, CheckpointConfig(async_save=False))
    assert checkpointer.all_steps() == [2, 5] and checkpointer.latest_step() == 5
    abstract = {"w": jax.ShapeDtypeStruct((16,), jnp.float32, sharding=NamedSharding(mesh, P("a")))}
    step, params = restore_latest_usable(
        checkpointer, lambda s: checkpointer.restore_params(s, abstract)
    )
    assert step == 5
    np.testing.assert_array_equal(np.asarray(params["w"]), np.full(16, 2.0))
    # The next save of that step replaces the leftovers and commits.
    checkpointer.save(8, state(8.0), _iterator(), {})
    checkpointer.wait()
    assert checkpointer.all_steps() == [2, 5, 8]
    np.testing.assert_array_equal(
        np.asarray(checkpointer.restore_params(8, abstract)["w"]), np.full(16, 8.0)
    )
    checkpointer.close()


def test_corrupt_latest_step_falls_back_with_a_warning(s3):
    mesh = jax.make_mesh((8,), ("a",), devices=jax.devices()[:8])
    workdir = "s3://bucket/corrupt"
    sharding = NamedSharding(mesh, P("a"))
    checkpointer = Checkpointer(workdir, CheckpointConfig(keep=5, async_save=False))
    for step in (1, 2):
        w = jax.device_put(jnp.full(64, float(step)), sharding)
        checkpointer.save(step, State({"w": w}, {"m": jnp.zeros(2)}), _iterator(), {})
    checkpointer.close()
    client = _client()
    data = [key for key in _keys("corrupt/ckpt/2/params/") if "/d/" in key]
    assert data
    for key in data:  # Truncated array files, as a crashed copy would leave them.
        body = client.get_object(Bucket="bucket", Key=key)["Body"].read()
        client.put_object(Bucket="bucket", Key=key, Body=body[:8])

    abstract = {"w": jax.ShapeDtypeStruct((64,), jnp.float32, sharding=sharding)}
    checkpointer = Checkpointer(workdir, CheckpointConfig())
    warnings = []
    step, params = restore_latest_usable(
        checkpointer, lambda s: checkpointer.restore_params(s, abstract), log=warnings.append
    )
    assert step == 1
    np.testing.assert_array_equal(np.asarray(params["w"]), np.full(64, 1.0))
    assert any("step 2" in w and "unusable" in w for w in warnings)
    for key in _keys("corrupt/ckpt/1/params/"):
        if "/d/" in key:
            client.delete_object(Bucket="bucket", Key=key)
    with pytest.raises(UserError, match="no usable checkpoint"):
        restore_latest_usable(
            checkpointer, lambda s: checkpointer.restore_params(s, abstract), log=warnings.append
        )
    checkpointer.close()


def test_objects_written_by_others_are_seen_at_once(s3):
    """s3fs caches directory listings; another host's (or TensorStore's) writes must not hide."""
    Checkpointer("s3://bucket/listing", CheckpointConfig()).close()
    directory = epath.Path("s3://bucket/listing/ckpt/7")
    (directory / "a").write_text("a")
    assert [p.name for p in directory.iterdir()] == ["a"]
    _client().put_object(Bucket="bucket", Key="listing/ckpt/7/b", Body=b"b")
    assert sorted(p.name for p in directory.iterdir()) == ["a", "b"]
    assert (directory / "b").exists()


def test_missing_bucket_is_a_clear_error(s3):
    with pytest.raises(
        UserError, match=r"bucket s3://no-such-bucket does not exist.*Create it"
    ) as error:
        Checkpointer("s3://no-such-bucket/run", CheckpointConfig())
    assert s3 in str(error.value)  # The message names the endpoint it used.


def test_unreachable_endpoint_is_a_clear_error(s3, monkeypatch):
    closed = f"http://127.0.0.1:{free_port()}"  # Nothing listens there.
    for name, value in s3_environment(closed).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=r"cannot reach s3://bucket.*AWS_ENDPOINT_URL"):
        Checkpointer("s3://bucket/run", CheckpointConfig())


def test_launch_train_refuses_a_missing_bucket_before_creating_it(s3):
    from launch import config as gin_config
    from launch.train import prepare_run

    gin_config.parse([], [])
    with pytest.raises(UserError, match="bucket s3://typo-bucket does not exist"):
        prepare_run("s3://typo-bucket/run")
    assert not epath.Path("s3://typo-bucket").exists()  # Not created by a mkdir.


def test_move_aside_keeps_every_object(s3):
    """--fresh on s3://: no rename there, so every object is copied, then the original removed."""
    workdir = "s3://bucket/fresh"
    checkpointer = Checkpointer(workdir, CheckpointConfig(async_save=False))
    checkpointer.save(1, State({"w": jnp.ones(4)}, {"m": jnp.zeros(2)}), _iterator(), {})
    checkpointer.close()
    before = sorted(key.removeprefix("fresh/ckpt/") for key in _keys("fresh/ckpt/"))
    now = datetime.datetime(2026, 12, 5, 3, 45, 0, tzinfo=datetime.UTC)
    moved = move_aside(checkpoint_dir(workdir), now=now)
    assert moved == "s3://bucket/fresh/ckpt.old-20261205-034500"
    prefix = "fresh/ckpt.old-20261205-034500/"
    assert sorted(key.removeprefix(prefix) for key in _keys(prefix)) == before
    assert "1/commit_success.txt" in before and _keys("fresh/ckpt/") == []
    checkpointer = Checkpointer(workdir, CheckpointConfig())
    assert checkpointer.all_steps() == []
    checkpointer.close()
