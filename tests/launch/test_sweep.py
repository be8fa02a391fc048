"""launch.sweep: expansion, stable trial directories, validation before anything runs, re-runs."""

import csv
import json
import os
import subprocess
import sys

import pytest

from launch import sweep
from launch.config import ROOT
from research.errors import UserError
from tests.launch.test_train_cli import TINY_RUN
from tests.xla_flags import with_devices


def test_product_and_zip_expansion():
    sweeps = sweep.parse_sweeps(["train.learning_rate=1e-3,3e-4", "model.num_layers=2,4"])
    assert sweep.expand(sweeps, "product") == [
        {"train.learning_rate": "1e-3", "model.num_layers": "2"},
        {"train.learning_rate": "1e-3", "model.num_layers": "4"},
        {"train.learning_rate": "3e-4", "model.num_layers": "2"},
        {"train.learning_rate": "3e-4", "model.num_layers": "4"},
    ]
    assert sweep.expand(sweeps, "zip") == [
        {"train.learning_rate": "1e-3", "model.num_layers": "2"},
        {"train.learning_rate": "3e-4", "model.num_layers": "4"},
    ]
    with pytest.raises(UserError, match="equal length"):
        sweep.expand(sweep.parse_sweeps(["a.b=1,2", "c.d=1"]), "zip")


def test_values_keep_tuples_and_quoted_commas():
    assert sweep.split_values("(2, 1, 1),(-1, 1, 1)") == ["(2, 1, 1)", "(-1, 1, 1)"]
    assert sweep.split_values("'a,b', \"c\"") == ["'a,b'", '"c"']
    with pytest.raises(UserError, match="--sweep='learning_rate'"):
        sweep.parse_sweeps(["learning_rate"])


def test_trial_directories_are_stable_and_readable():
    name = sweep.trial_dirname({"train.learning_rate": "1e-3", "model.num_layers": "2"})
    assert name.startswith("learning_rate_1e-3__num_layers_2-")
    assert name == sweep.trial_dirname({"train.learning_rate": "1e-3", "model.num_layers": "2"})
    assert name != sweep.trial_dirname({"train.learning_rate": "1e-3", "model.num_layers": "4"})


def test_misspelt_binding_names_the_trial():
    trials = sweep.expand(sweep.parse_sweeps(["train.learnig_rate=1e-3,3e-4"]))
    with pytest.raises(UserError, match="trial train.learnig_rate=1e-3: .*learnig_rate"):
        sweep.validate_bindings(["configs/experiment/demo.gin"], [], trials)
    bad_value = sweep.expand(sweep.parse_sweeps(["train.learning_rate=1e-3,-1"]))
    with pytest.raises(UserError, match="train.learning_rate=-1"):
        sweep.validate_bindings(["configs/experiment/demo.gin"], [], bad_value)


def test_train_flags_are_checked():
    sweep.validate_train_flags(["--sample_tokens=8", "--nofresh", "--sample_prompt="])
    with pytest.raises(UserError, match="unknown launch.train flag '--sample_tokenz=8'"):
        sweep.validate_train_flags(["--sample_tokenz=8"])
    with pytest.raises(UserError, match="--sample_tokens=many"):
        sweep.validate_train_flags(["--sample_tokens=many"])
    with pytest.raises(UserError, match="set by the sweep"):
        sweep.validate_train_flags(["--workdir=/tmp/x"])


def _sweep(args):
    return subprocess.run(
        [sys.executable, "-m", "launch.sweep", *args],
        cwd=ROOT,
        env=dict(os.environ, XLA_FLAGS=with_devices(1)),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_misspelt_sweep_fails_before_anything_starts(tmp_path):
    result = _sweep(
        ["--gin_file=configs/experiment/demo.gin", f"--root={tmp_path}"]
        + ["--sweep=model.num_layrs=2,4"]
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "num_layrs" in result.stderr and "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_sweep_runs_summarizes_and_reruns_idempotently(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index in range(12):
        text = f"Scene {index}. " + "Once more unto the breach, dear friends, once more. " * 8
        (corpus / f"scene{index}.md").write_text(f"# Scene {index}\n\n**KING**\n{text}\n")
    bindings = [b for b in TINY_RUN if not b.startswith("train.num_steps")] + [
        "train.num_steps = 2",
        f"data.sources = ('{corpus}',)",
        f"data.cache_dir = '{tmp_path}/cache'",
    ]
    args = (
        ["--gin_file=configs/experiment/demo.gin", f"--root={tmp_path}/sweeps"]
        + [f"--gin_bindings={b}" for b in bindings]
        + ["--sweep=train.learning_rate=1e-3,3e-4", "--", "--sample_prompt="]
    )
    first = _sweep(args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    experiment = tmp_path / "sweeps" / "demo"
    trials = sorted(d for d in os.listdir(experiment) if d != "summary.csv")
    assert len(trials) == 2 and trials[0].startswith("learning_rate_1e-3-")
    trial = json.loads((experiment / trials[0] / "trial.json").read_text())
    assert trial["status"] == "done" and trial["overrides"] == {"train.learning_rate": "1e-3"}
    rows = list(csv.DictReader((experiment / "summary.csv").read_text().splitlines()))
    assert [r["train.learning_rate"] for r in rows] == ["1e-3", "3e-4"]
    assert all(r["step"] == "2" and float(r["loss"]) > 0 for r in rows)
    assert "learning_rate_1e-3" in first.stdout and "test_loss" in first.stdout
    # Again: the same directories, nothing re-trained.
    again = _sweep(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already done, skipped") == 2
    assert sorted(d for d in os.listdir(experiment) if d != "summary.csv") == trials
