"""launch.dpo as a user runs it: a subprocess on a tiny model, the workdir a normal run, and
user mistakes exiting 1 with a message that names the field."""

import json
import os
import subprocess
import sys

import pytest
from flax import nnx

from launch.config import ROOT
from research.checkpoint.pretrained import Pretrained, save_as_run
from research.data import train_tokenizer
from research.model import Decoder, ModelConfig
from tests.xla_flags import with_devices

TINY = ModelConfig(
    vocab_size=320, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
    max_seq_len=64,
)  # fmt: skip
RUN = [
    "train.num_steps = 8",
    "train.batch_size = 4",
    "train.seq_len = 48",
    "train.learning_rate = 1e-2",
    "train.schedule = 'constant'",
    "train.warmup_steps = 0",
    "train.weight_decay = 0.0",
    "train.log_every = 2",
    "train.task_eval_every = 8",
    "train.peak_flops_per_device = 1e11",
    "dpo.validation_fraction = 0.2",
    "model.lora_rank = 4",
    "model.lora_targets = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', "
    "'down_proj']",
]


def _run(args, timeout=300):
    env = dict(os.environ, XLA_FLAGS=with_devices(2))
    return subprocess.run(
        [sys.executable, "-m", "launch.dpo", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A random tiny model saved as a run (its tokenizer, ChatML by default) and 20 pairs."""
    root = tmp_path_factory.mktemp("dpo")
    texts = [f"<|im_start|>user\nSay hello, {i}.<|im_end|>\n" for i in range(20)]
    texts += ["<|im_start|>assistant\nHello there, friend.<|im_end|>\nGo away."] * 20
    params = nnx.state(Decoder(TINY, rngs=nnx.Rngs(0)), nnx.Param)
    pretrained = Pretrained(
        TINY, params, {"format": "cirrus", "path": "random"}, train_tokenizer(texts, 320)
    )
    save_as_run(str(root / "init"), pretrained, log=lambda _: None)
    pairs = [
        {"prompt": f"Say hello, {i}.", "chosen": "Hello there, friend.", "rejected": f"No, {i}."}
        for i in range(20)
    ]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return root


def _args(inputs, workdir, bindings=()):
    bindings = [*RUN, f"dpo.data = ['{inputs / 'pairs.jsonl'}']", *bindings]
    return [f"--init_from={inputs / 'init'}", f"--workdir={workdir}"] + [
        f"--gin_bindings={b}" for b in bindings
    ]


@pytest.fixture(scope="module")
def tuned(inputs, tmp_path_factory):
    """(workdir, finished process) of one LoRA DPO run."""
    workdir = tmp_path_factory.mktemp("tuned") / "run"
    return workdir, _run(_args(inputs, workdir))


@pytest.mark.slow
def test_dpo_cli_raises_the_margin_and_leaves_a_normal_run(tuned):
    workdir, result = tuned
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "dpo: 20 of 20 pairs kept" in out and "dpo: reference log-probs of 20 pairs" in out
    assert "LoRA rank 4" in out and "reward_accuracy" in out and "tok/s" in out and "ETA" in out
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    margins = [r["reward_margin"] for r in records]
    assert margins[-1] > margins[0] and margins[-1] > 0.1, margins
    assert records[-1]["reward_accuracy"] == 1.0
    assert records[-1]["validation_pairs/accuracy"] == 1.0  # 4 held-out pairs.
    assert "dpo.beta = 0.1" in (workdir / "config.gin").read_text()
    # A normal run: the loader every launch.* entry uses reads it, adapters merged.
    from research.checkpoint import load

    loaded = load(str(workdir), log=lambda _: None)
    assert loaded.step == 8 and loaded.model_config.lora_rank == 0
    assert loaded.tokenizer is not None and loaded.tokenizer.vocab_size <= TINY.vocab_size


@pytest.mark.slow
def test_dpo_cli_resumes_with_the_stored_reference(inputs, tuned):
    workdir, first = tuned
    assert first.returncode == 0, first.stderr[-3000:]
    again = _run(_args(inputs, workdir))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reference log-probs of 20 pairs read from" in again.stdout  # Not recomputed.
    assert "resumed from step 8" in again.stdout


@pytest.mark.parametrize(
    "data, bindings, fragment",
    [
        ("missing.jsonl", [], "dpo.data entry"),
        ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a",', [],
         "bad.jsonl:2 is not valid JSON"),
        ('{"prompt": "a", "rejected": "c"}\n', [], 'bad.jsonl:1 has no "chosen" field'),
        ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n', ["dpo.beta = 0.0"], "dpo.beta"),
    ],
)  # fmt: skip
def test_user_mistakes_exit_1_naming_the_field(inputs, tmp_path, data, bindings, fragment):
    path = tmp_path / data if data == "missing.jsonl" else tmp_path / "bad.jsonl"
    if data != "missing.jsonl":
        path.write_text(data)
    args = [f"--init_from={inputs / 'init'}", f"--workdir={tmp_path / 'run'}"]
    args += [f"--gin_bindings={b}" for b in [f"dpo.data = ['{path}']", *bindings]]
    result = _run(args, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert fragment in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
