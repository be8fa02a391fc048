"""launch.sample and launch.eval as a user runs them, on a tiny run trained by launch.train."""

import json
import os
import subprocess
import sys

import pytest

from launch.config import ROOT
from tests.launch.test_train_cli import TINY_RUN
from tests.xla_flags import with_devices


def run_module(module, args, timeout=300):
    """`python -m module args` from the repo root on 2 CPU devices; the CompletedProcess."""
    env = dict(os.environ, XLA_FLAGS=with_devices(2))
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 12-step tiny run (with its prepared data) in a temporary workdir."""
    root = tmp_path_factory.mktemp("sample_eval")
    corpus = root / "corpus"
    corpus.mkdir()
    for index in range(12):
        text = f"Scene {index}. " + "Once more unto the breach, dear friends, once more. " * 8
        (corpus / f"scene{index}.md").write_text(f"# Scene {index}\n\n**KING**\n{text}\n")
    workdir = root / "run"
    bindings = TINY_RUN + [f"data.sources = ('{corpus}',)", f"data.cache_dir = '{root}/cache'"]
    result = run_module(
        "launch.train",
        ["--gin_file=configs/experiment/demo.gin", f"--workdir={workdir}", "--sample_prompt="]
        + [f"--gin_bindings={b}" for b in bindings],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.mark.slow
def test_sample_streams_every_sample(trained):
    result = run_module(
        "launch.sample",
        [f"--workdir={trained}", "--prompt=Once more", "--max_new_tokens=12"]
        + ["--temperature=0.9", "--top_k=20", "--top_p=0.95", "--seed=3", "--num_samples=2"],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--- sample 1/2 (seed 3) ---\nOnce more" in result.stdout
    assert "--- sample 2/2 (seed 4) ---\nOnce more" in result.stdout
    assert result.stdout.count("tokens, ") == 2


@pytest.mark.slow
def test_sample_on_a_tensor_parallel_mesh_equals_one_device(trained):
    greedy = [
        f"--workdir={trained}",
        "--prompt=Once more",
        "--max_new_tokens=12",
        "--temperature=0",
    ]
    one = run_module("launch.sample", greedy)
    mesh = run_module("launch.sample", [*greedy, "--mesh_shape=1,1,2"])
    assert one.returncode == 0 and mesh.returncode == 0, (one.stderr + mesh.stderr)[-3000:]
    assert "--- sample 1/1 (seed 0) ---\nOnce more" in one.stdout
    assert mesh.stdout == one.stdout


@pytest.mark.slow
def test_eval_writes_json_and_markdown_reports(trained, tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text(
        json.dumps({"context": "Once more unto the", "choices": [" breach", " sea"], "answer": 0})
    )
    result = run_module(
        "launch.eval",
        [f"--workdir={trained}", "--gin_bindings=eval.stride = 16"]
        + [f"--gin_bindings=eval.choice_tasks = ('{task}',)", "--gin_bindings=eval.cloze_items=8"],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((trained / "eval_report.json").read_text())
    metrics = report["metrics"]
    assert {"validation/loss", "validation/bits_per_byte", "task/accuracy"} <= set(metrics)
    # The memorisation check on 32 windows of the train split (32 + 32 tokens: the context).
    assert metrics["memorization/snippets"] == 32 and metrics["memorization/suffix_tokens"] == 32
    assert 0 <= metrics["memorization/exact_fraction"] <= 1
    assert (
        "memorisation: " in result.stderr and "| memorization | exact_fraction |" in result.stdout
    )
    assert report["config"]["stride"] == 16 and report["config"]["memorization_prefix"] == 32
    assert "| validation | bits_per_byte |" in (trained / "eval_report.md").read_text()
    assert "| task | accuracy |" in result.stdout


@pytest.mark.parametrize(
    "module, args, fragment",
    [
        ("launch.sample", ["--prompt=x", "--top_p=1.5"], "top_p"),
        ("launch.sample", ["--prompt=x", "--temperature=-1"], "temperature"),
        ("launch.sample", ["--prompt=x", "--max_new_tokens=0"], "max_new_tokens"),
        ("launch.sample", ["--prompt="], "--prompt is empty"),
        ("launch.sample", ["--prompt=x", "--mesh_shape=1,2"], "--mesh_shape='1,2' must be"),
        ("launch.sample", ["--prompt=x", "--mesh_shape=1,1,4"], "needs 4 devices but 2"),
        (
            "launch.sample",
            ["--prompt=x", "--gin_bindings=serve.kv_cache_dtype='int4'"],
            "serve.kv_cache_dtype='int4' is not a KV cache dtype; use 'auto'",
        ),
        ("launch.eval", ["--gin_bindings=eval.strid = 3"], "strid"),
        ("launch.eval", ["--gin_bindings=eval.batch_size = 0"], "eval.batch_size"),
    ],
)
def test_bad_flags_exit_1_with_a_message(module, args, fragment, tmp_path):
    result = run_module(module, [f"--workdir={tmp_path}", *args], timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert fragment in result.stderr and "Traceback" not in result.stderr


def test_memorisation_without_a_training_split_is_a_user_error(tmp_path):
    from tests.serving.server_fixtures import write_tiny_workdir

    workdir = write_tiny_workdir(tmp_path / "imported")  # A run with no prepared data.
    result = run_module("launch.eval", [f"--workdir={workdir}", "--gin_bindings=eval.split=''"])
    assert result.returncode == 1, result.stderr[-3000:]
    assert "eval.memorization_snippets=32 checks the run's training split" in result.stderr
    assert "records no training split" in result.stderr and "Traceback" not in result.stderr


def test_missing_checkpoint_is_a_user_error(tmp_path):
    result = run_module("launch.sample", [f"--workdir={tmp_path}", "--prompt=x"], timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "no checkpoint" in result.stderr
