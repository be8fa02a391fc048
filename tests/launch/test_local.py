"""launch.local: N launch.train processes on this machine through the jax.distributed contract.

Each multi-process run costs ~30 s of process start-up and compilation on 2 cores, so the
runs are shared: one uninterrupted 2-host run is the reference for the single-process losses
and for the parameters of the preempted-and-resumed run. Four hosts (README's pod) run in
tests/launch/test_readme.py.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from launch import distributed, local
from launch.config import ROOT
from research import sharding
from research.errors import UserError
from tests.launch.test_train_cli import TINY_RUN

NUM_STEPS = 60
BASE = [b for b in TINY_RUN if not b.startswith(("train.num_steps", "train.log_every"))] + [
    f"train.num_steps = {NUM_STEPS}",
    "train.log_every = 1",
    "train.eval_every = 30",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    for index in range(24):
        text = f"Scene {index}. " + f"Once more unto breach {index}, dear friends, once more. " * 6
        (directory / f"scene{index}.md").write_text(f"# Scene {index}\n\n**KING**\n{text}\n")
    cache = tmp_path_factory.mktemp("cache")
    return [f"data.sources = ('{directory}',)", f"data.cache_dir = '{cache}'"]


def _launch(workdir, bindings, *flags, extra=("--sample_prompt=",)):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "launch.local", f"--workdir={workdir}"]
        + ["--gin_file=configs/experiment/demo.gin", "--num_hosts=2", "--devices_per_host=2"]
        + [f"--gin_bindings={b}" for b in bindings]
        + list(flags)
        + ["--", *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(path, text, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {path}")


def _pids(workdir):
    return json.loads((workdir / "logs" / "pids.json").read_text())["pids"]


def _losses(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory):
    """An uninterrupted 2-host x 2-device run."""
    workdir = tmp_path_factory.mktemp("reference")
    process = _launch(workdir, BASE + data)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-5000:]
    return workdir, output


@pytest.mark.slow
def test_two_hosts_match_one_process(reference_run, data):
    workdir, output = reference_run
    assert "[host 0] jax.distributed: process 0/2" in output
    assert "[host 1] jax.distributed: process 1/2" in output
    assert "on 4 cpu devices, 2 process(es)" in output
    host_1 = (workdir / "logs" / "host_1.log").read_text()
    assert f"step {NUM_STEPS}/{NUM_STEPS}" in host_1 and "[host" not in host_1
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, NUM_STEPS + 1))
    # The same global batch in one process: each host's shard, side by side, on a 4-device
    # mesh of the same shape (and the same num_steps: it shapes the learning-rate schedule).
    reference, params = _single_process_run(workdir, data, num_hosts=2)
    np.testing.assert_allclose([losses[s] for s in sorted(losses)], reference, rtol=2e-5)
    # The checkpoint the 2 hosts wrote restores in this one process, onto another mesh, and
    # holds the parameters the single-process run ended with.
    from research.checkpoint import load_model

    mesh = sharding.make_mesh((1, 1, 2), devices=jax.devices()[:2])
    loaded = load_model(str(workdir), mesh=mesh, log=lambda _: None)
    assert loaded.step == NUM_STEPS
    for got, want in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-3, atol=1e-5)


def _single_process_run(workdir, data_bindings, num_hosts):
    """The same training in this process: (logged losses, final parameters)."""
    from launch import config as gin_config
    from research.data import DataConfig, ensure_prepared, make_dataset
    from research.model import ModelConfig
    from research.train import TrainConfig, loop

    gin_config.parse(["configs/experiment/demo.gin"], BASE + data_bindings)
    model_config = gin_config.build(ModelConfig)
    config = gin_config.build(TrainConfig).replace(eval_every=0)
    prepared = ensure_prepared(gin_config.build(DataConfig), log=lambda _: None)

    def host_batches(directory, split, *, batch_size, **kwargs):
        hosts = [
            iter(
                make_dataset(
                    directory,
                    split,
                    batch_size=batch_size // num_hosts,
                    shard_index=host,
                    shard_count=num_hosts,
                    **kwargs,
                )
            )
            for host in range(num_hosts)
        ]
        while True:
            parts = [next(host) for host in hosts]
            yield {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    mesh = sharding.make_mesh((4, 1, 1), devices=jax.devices()[:4])
    records = []
    original = loop.make_dataset
    loop.make_dataset = host_batches
    try:

        class Writer:
            def __init__(self, *args, **kwargs):
                pass

            def write(self, step, record):
                records.append(record["loss"])

            def close(self):
                pass

        original_writer = loop.MetricsWriter
        loop.MetricsWriter = Writer
        try:
            _, state, _ = loop.train(
                model_config,
                config.replace(log_every=1),
                data_dir=prepared.directory,
                workdir=str(workdir / "single"),
                log=lambda _: None,
                mesh=mesh,
            )
        finally:
            loop.MetricsWriter = original_writer
    finally:
        loop.make_dataset = original
    return records, state.params


@pytest.mark.slow
def test_sigterm_to_one_host_saves_everywhere_and_resumes(reference_run, data, tmp_path):
    workdir = tmp_path / "preempted"
    process = _launch(workdir, BASE + data, "--grace_s=20")
    _wait_for(workdir / "logs" / "host_1.log", f"step 10/{NUM_STEPS}")
    host_1 = _pids(workdir)[1]
    os.kill(host_1, signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-5000:]
    assert "attempt 0 ended with code 42 (hosts: [42, 42])" in output
    assert "attempt 1 ended with code 0" in output
    saved = set()
    for host in range(2):
        log = (workdir / "logs" / f"host_{host}.log").read_text()
        line = next(x for x in log.splitlines() if "preempted: saved a checkpoint" in x)
        saved.add(int(line.split("at step ")[1].split(";")[0]))
        assert "resumed from step" in log
    assert len(saved) == 1 and 10 <= saved.pop() < NUM_STEPS
    expected, resumed = _final_params(reference_run[0]), _final_params(workdir)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


def _final_params(workdir):
    from research.checkpoint.load import load_model

    loaded = load_model(str(workdir), log=lambda _: None)
    assert loaded.step == NUM_STEPS
    return jax.device_get(loaded.params)


@pytest.mark.slow
def test_sigkill_of_one_host_stops_the_job(data, tmp_path):
    workdir = tmp_path / "killed"
    process = _launch(workdir, BASE + data, "--grace_s=3", "--preemption_budget=0")
    _wait_for(workdir / "logs" / "host_0.log", f"step 5/{NUM_STEPS}")
    pids = _pids(workdir)
    killed_at = time.monotonic()
    os.kill(pids[0], signal.SIGKILL)
    output, _ = process.communicate(timeout=120)
    assert time.monotonic() - killed_at < 20, output[-3000:]
    assert process.returncode == 137, output[-3000:]
    assert "host 0 exited with code 137; stopping every host" in output
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)


def test_mesh_the_hosts_cannot_fill_is_a_user_error(data):
    with pytest.raises(UserError, match="--num_hosts=3 x --devices_per_host=2"):
        local.validate(
            3, 2, ["configs/experiment/demo.gin"], BASE + data + ["train.mesh_shape = (4, 1, 1)"]
        )
    with pytest.raises(UserError, match="num_stpes"):
        local.validate(2, 1, ["configs/experiment/demo.gin"], ["train.num_stpes = 3"])


def test_exit_codes_and_environment_contract():
    assert local.exit_code(-9) == 137 and local.exit_code(-15) == 143
    assert local.job_code([0, 42], [0, 1]) == 42
    assert local.job_code([137, 143], [0, 1]) == 137
    assert local.job_code([0, 0], [1, 0]) == 0
    env = distributed.local_env(4711, 4, 3, 2, "run")
    assert env == {
        "CIRRUS_COORDINATOR": "127.0.0.1:4711",
        "CIRRUS_NUM_PROCESSES": "4",
        "CIRRUS_PROCESS_ID": "3",
        "CIRRUS_CPU_DEVICES": "2",
        "CIRRUS_RUN_ID": "run",
    }
    with pytest.raises(UserError, match="CIRRUS_PROCESS_ID"):
        distributed.initialize({"CIRRUS_COORDINATOR": "127.0.0.1:1", "CIRRUS_NUM_PROCESSES": "2"})
    with pytest.raises(UserError, match=r"CIRRUS_PROCESS_ID=2 must be in \[0"):
        distributed.initialize(
            {
                "CIRRUS_COORDINATOR": "127.0.0.1:1",
                "CIRRUS_NUM_PROCESSES": "2",
                "CIRRUS_PROCESS_ID": "2",
            }
        )


@pytest.mark.slow
def test_a_killed_launcher_leaves_no_host_behind(data, tmp_path):
    """SIGKILL of launch.local itself (no handler runs): the hosts get the parent-death
    signal, save, and exit."""
    workdir = tmp_path / "orphaned"
    process = _launch(workdir, BASE + data, "--grace_s=3")
    _wait_for(workdir / "logs" / "host_0.log", f"step 3/{NUM_STEPS}")
    pids = _pids(workdir)
    process.kill()
    process.communicate(timeout=30)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(local.command_line(p) for p in pids):
        time.sleep(0.2)
    assert not [p for p in pids if local.command_line(p)]
    # They saved first (their console, the dead launcher's pipe, going quiet, not raising).
    assert any(name.isdigit() for name in os.listdir(workdir / "ckpt"))


def _sleeper(*argv):
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", *argv], start_new_session=True
    )
    threading.Thread(target=process.wait, daemon=True).start()  # Reaped once killed.
    # Popen returns once exec has begun; /proc/PID/cmdline is empty until the kernel has
    # set up the new program's arguments (a window a loaded machine can hit).
    deadline = time.monotonic() + 30
    while "time.sleep" not in (local.command_line(process.pid) or ""):
        assert time.monotonic() < deadline, "the sleeper never started"
        time.sleep(0.01)
    return process


def test_a_new_launcher_stops_hosts_an_earlier_one_left(tmp_path):
    workdir, logs = str(tmp_path / "run"), tmp_path / "run" / "logs"
    logs.mkdir(parents=True)
    hosts = [_sleeper("-m", "launch.train", f"--workdir={workdir}") for _ in range(2)]
    stranger = _sleeper("-m", "launch.train", "--workdir=/elsewhere")  # Not this workdir's.
    dead_launcher = subprocess.Popen(["true"])
    dead_launcher.wait()
    pids = [p.pid for p in (*hosts, stranger)]
    record = {"run_id": "r", "attempt": 0, "launcher_pid": dead_launcher.pid, "pids": pids}
    (logs / "pids.json").write_text(json.dumps(record))
    messages = []
    try:
        assert local.stop_leftovers(str(logs), workdir, 5.0, log=messages.append) == pids[:2]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(h.poll() is None for h in hosts):
            time.sleep(0.05)
        assert all(h.poll() is not None for h in hosts)
        assert stranger.poll() is None
        assert f"stopping host processes {pids[:2]}" in messages[0]
        # While the launcher that started them still runs, refuse and name it.
        launcher = _sleeper("-m", "launch.local", f"--workdir={workdir}")
        (logs / "pids.json").write_text(json.dumps(dict(record, launcher_pid=launcher.pid)))
        with pytest.raises(UserError, match=f"launch.local pid {launcher.pid} is still running"):
            local.stop_leftovers(str(logs), workdir, 5.0)
        launcher.kill()
    finally:
        for process in (*hosts, stranger):
            process.kill()
