"""launch.sweep --backend=pod: each trial a launch.pod job; dry run without gcloud, validation
before anything starts, and the trial bookkeeping (trial.json, summary.csv, re-runs) on a
gs:// root served by fake-gcs-server on 127.0.0.1."""

import csv
import json
import os
import shlex
import subprocess
import sys

import pytest
from etils import epath

from launch import pod, sweep
from launch.config import ROOT
from research.errors import UserError
from tests.storage_emulators import fake_gcs_server

DEMO = "configs/experiment/demo.gin"


def _pod_sweep(root, **changes) -> sweep.Sweep:
    fields = dict(
        root=root,
        gin_files=(DEMO,),
        gin_bindings=("train.batch_size = 8",),
        train_args=("--sample_prompt=",),
        sweeps=("train.learning_rate=1e-3,3e-4",),
        backend="pod",
        tpu="v5p-8",
        zone="us-east5-a",
        project="proj",
        pod_flags=("--spot",),
    )
    return sweep.Sweep(**(fields | changes))


def _never(command, **_):
    raise AssertionError(f"nothing may run: {command}")


def test_dry_run_prints_every_trials_pod_commands_without_gcloud(tmp_path):
    empty_path = tmp_path / "bin"
    empty_path.mkdir()
    root = f"gs://bucket/sweeps-{tmp_path.name}"
    result = subprocess.run(
        [sys.executable, "-m", "launch.sweep", "--backend=pod", f"--root={root}"]
        + ["--tpu=v5p-8", "--zone=us-east5-a", "--project=proj", "--pod_flag=--spot"]
        + [f"--gin_file={DEMO}", "--sweep=train.learning_rate=1e-3,3e-4", "--dry_run"]
        + ["--", "--sample_prompt="],
        cwd=ROOT,
        env=dict(os.environ, PATH=str(empty_path)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    where = "--zone=us-east5-a --project=proj"
    for value in ("1e-3", "3e-4"):
        workdir = f"{root}/demo/" + sweep.trial_dirname({"train.learning_rate": value})
        run_id = pod.default_run_id(workdir)
        name = "cirrus-" + run_id.removeprefix("pod-")
        command = shlex.join(
            [sys.executable, "-m", "launch.pod", "--tpu=v5p-8", "--zone=us-east5-a"]
            + ["--project=proj", "--spot", f"--workdir={workdir}", f"--gin_file={DEMO}"]
            + [f"--gin_bindings=train.learning_rate = {value}", "--", "--sample_prompt="]
        )
        assert f"sweep: {workdir.rsplit('/', 1)[1]}: {command}" in lines
        for expected in [
            f"gcloud compute tpus queued-resources create {name} --node-id={name} "
            f"--accelerator-type=v5p-8 --runtime-version=v2-alpha-tpuv5 --spot {where}",
            f"gcloud compute tpus tpu-vm ssh {name} --worker=all "
            f"'--command=bash ~/cirrus-{run_id}.sh run' {where}",
            f"gcloud storage cp --recursive {workdir}/logs /tmp/cirrus-pod/{run_id}/logs",
            f"gcloud compute tpus queued-resources delete {name} --force --quiet {where}",
        ]:
            assert "    " + expected in lines
        assert not os.path.exists(f"/tmp/cirrus-pod/{run_id}")
    assert result.stdout.count("queued-resources create") == 2


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(root="/tmp/sweeps"), "--root=/tmp/sweeps must be a gs:// path with --backend=pod"),
        (dict(zone=None), "--zone is required"),
        (dict(project=""), "--project is required"),
        (dict(tpu="v5p-7"), "--tpu=v5p-7 is not a known TPU type"),
        (
            dict(sweeps=("train.mesh_shape=(4, 1, 1),(8, 1, 1)",)),
            r"trial train.mesh_shape=\(8, 1, 1\): --tpu=v5p-8 has 4 devices",
        ),
        (dict(gin_bindings=("train.batch_size = 6",)), "train.batch_size=6"),
        (dict(pod_flags=("--spott",)), "--pod_flag: Unknown command line flag 'spott'"),
        (dict(pod_flags=("--name=x",)), "--pod_flag='--name=x'"),
        (dict(pod_flags=("--spot", "--reserved")), "--spot, --reserved and --best_effort"),
        (dict(trial_hosts=2), "--trial_hosts is for --backend=local"),
        (dict(train_args=("--sample_tokenz=3",)), "unknown launch.train flag"),
    ],
)
def test_pod_sweep_errors_before_anything_runs(changes, message):
    with pytest.raises(UserError, match=message):
        sweep.run_sweep(_pod_sweep(**{"root": "gs://bucket/sweeps"} | changes), call=_never)


def test_local_backend_refuses_a_gs_root():
    with pytest.raises(UserError, match="--backend=local needs a local directory"):
        sweep.run_sweep(_pod_sweep("gs://bucket/s", backend="local", tpu=None), call=_never)


@pytest.fixture(scope="module")
def gcs():
    with fake_gcs_server(buckets=("bucket",)) as url:
        yield url


def test_pod_trials_record_and_rerun_on_gcs(gcs):
    calls = []

    def fake_pod(command, cwd):
        """Stands in for launch.pod: the trial's job writes its metrics to its gs:// workdir."""
        calls.append(command)
        assert command[1:3] == ["-m", "launch.pod"] and cwd == ROOT
        workdir = next(a for a in command if a.startswith("--workdir=")).split("=", 1)[1]
        loss = 2.5 if any("1e-3" in arg for arg in command) else 3.0
        record = {"step": 10, "loss": loss, "val_loss": loss + 0.5}
        (epath.Path(workdir) / "metrics.jsonl").write_text(json.dumps(record) + "\n")
        return 0 if loss < 3 else 42

    spec = _pod_sweep("gs://bucket/runs")
    assert sweep.run_sweep(spec, call=fake_pod, log=lambda _: None) == 42
    assert len(calls) == 2
    experiment = epath.Path("gs://bucket/runs/demo")
    done = sweep.trial_dirname({"train.learning_rate": "1e-3"})
    trial = json.loads((experiment / done / "trial.json").read_text())
    assert trial["status"] == "done" and trial["command"] == calls[0]
    assert "--tpu=v5p-8" in trial["command"] and "--spot" in trial["command"]
    failed = sweep.trial_dirname({"train.learning_rate": "3e-4"})
    assert json.loads((experiment / failed / "trial.json").read_text())["status"] == "failed (42)"
    rows = list(csv.DictReader((experiment / "summary.csv").read_text().splitlines()))
    assert [(r["train.learning_rate"], r["status"], r["loss"]) for r in rows] == [
        ("1e-3", "done", "2.5000"),
        ("3e-4", "failed (42)", "3.0000"),
    ]
    # Again: the finished trial is skipped, the failed one runs again (and resumes).
    calls.clear()
    lines = []
    assert sweep.run_sweep(spec, call=fake_pod, log=lines.append) == 42
    assert len(calls) == 1 and any("3e-4" in arg for arg in calls[0])
    assert any("already done, skipped" in line for line in lines)
    assert any("running (resuming)" in line for line in lines)
