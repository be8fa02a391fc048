"""launch.train as a user runs it: a subprocess, real flags, exit codes, files in the workdir."""

import json
import os
import subprocess
import sys

import pytest

from launch.config import ROOT
from tests.xla_flags import with_devices

TINY_RUN = [
    "model.vocab_size = 320",
    "model.d_model = 32",
    "model.num_layers = 2",
    "model.num_heads = 4",
    "model.num_kv_heads = 2",
    "model.mlp_dim = 64",
    "model.max_seq_len = 64",
    "data.vocab_size = 320",
    "data.min_chars = 16",
    "train.num_steps = 12",
    "train.batch_size = 4",
    "train.seq_len = 32",
    "train.log_every = 4",
    "train.eval_every = 6",
    "train.eval_batches = 1",
    "train.peak_flops_per_device = 1e11",
]


def _run(args, env_extra=None, timeout=300):
    env = dict(os.environ, XLA_FLAGS=with_devices(2))
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "launch.train", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    for index in range(12):
        text = f"Scene {index}. " + "Once more unto the breach, dear friends, once more. " * 8
        (directory / f"scene{index}.md").write_text(f"# Scene {index}\n\n**KING**\n{text}\n")
    return directory


@pytest.mark.slow
def test_train_cli_end_to_end(corpus, tmp_path):
    workdir = tmp_path / "run"
    bindings = TINY_RUN + [f"data.sources = ('{corpus}',)", f"data.cache_dir = '{tmp_path}/c'"]
    # The evaluation suite at the end: bits per byte of the validation split.
    bindings += ["train.task_eval_every = 12", "eval.cloze_items = 0"]
    result = _run(
        ["--gin_file=configs/experiment/demo.gin", f"--workdir={workdir}", "--sample_tokens=8"]
        + [f"--gin_bindings={b}" for b in bindings]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ETA" in result.stdout and "tok/s" in result.stdout
    assert "test split: loss" in result.stdout and "--- sample" in result.stdout
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12]
    assert "val_loss" in records[-1]
    assert records[-1]["validation/bits_per_byte"] > 0 and "step 12 evaluation" in result.stdout
    config_text = (workdir / "config.gin").read_text()
    assert "train.num_steps = 12" in config_text and "model.d_model = 32" in config_text
    assert (workdir / "plots" / "loss.png").exists()
    assert (workdir / "tokenizer" / "tokenizer.json").exists()
    assert os.listdir(workdir / "tensorboard")
    # The prepared data is cached: a second run does not prepare it again. It distils a
    # one-layer student from the first run (--teacher: the teacher in the same jitted step).
    student = ["train.num_steps = 2", "model.num_layers = 1"]
    again = _run(
        ["--gin_file=configs/experiment/demo.gin", f"--workdir={tmp_path / 'run2'}"]
        + ["--sample_prompt=", f"--teacher={workdir}", "--distill_alpha=0.5"]
        + [f"--gin_bindings={b}" for b in bindings + student]
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training tokenizer" not in again.stdout.lower()
    assert "--teacher:" in again.stdout and "  kd " in again.stdout
    record = json.loads((tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 2 and record["kd"] > 0
    # A student whose vocabulary differs from the teacher's is refused before training.
    other = _run(
        ["--gin_file=configs/experiment/demo.gin", f"--workdir={tmp_path / 'run3'}"]
        + ["--sample_prompt=", f"--teacher={workdir}"]
        + [f"--gin_bindings={b}" for b in bindings + [*student, "model.vocab_size = 384"]]
    )
    assert other.returncode == 1 and "--teacher=" in other.stderr, other.stderr[-2000:]
    assert "Traceback" not in other.stderr
    # Chat fine-tuning of the first run with LoRA adapters (the base frozen): conversations
    # through its tokenizer and the default ChatML template, loss on assistant turns,
    # validation loss before and after; then the adapters exported in PEFT's layout.
    chats = tmp_path / "chats.jsonl"
    chats.write_text(
        "".join(
            json.dumps({"messages": [
                {"role": "user", "content": f"Say once more, {i}."},
                {"role": "assistant", "content": "Once more unto the breach, dear friends."},
            ]}) + "\n"
            for i in range(40)
        )
    )  # fmt: skip
    sft = [b for b in bindings if not b.startswith(("model.", "data.vocab_size", "data.sources"))]
    sft += [f"data.sources = ('{chats}',)", "data.format = 'chat'", "train.learning_rate = 3e-2"]
    sft += ["model.lora_rank = 8", "model.lora_targets = ['q_proj', 'v_proj', 'o_proj', 'up_proj']"]
    sft += ["train.eval_every = 12", "train.eval_batches = 0", "data.validation_fraction = 0.1"]
    tuned = _run(
        ["--gin_file=configs/experiment/demo.gin", f"--workdir={tmp_path / 'sft'}"]
        + ["--sample_prompt=", f"--init_from={workdir}"]
        + [f"--gin_bindings={b}" for b in sft]
    )
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert "template audit: 40 of 40 conversations ok" in tuned.stdout
    assert "LoRA rank 8 (alpha 16)" in tuned.stdout
    assert "checkpoints hold the LoRA adapters only" in tuned.stdout
    records = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").open()]
    assert records[0]["step"] == 0 and "step 0 (initial weights): val" in tuned.stdout
    # (Full fine-tuning of this 2-layer model gets under 0.8x in these 12 steps.)
    assert records[-1]["val_loss"] < 0.93 * records[0]["val_loss"], records
    exported = subprocess.run(
        [sys.executable, "-m", "launch.convert", f"--workdir={tmp_path / 'sft'}"]
        + [f"--to_peft={tmp_path / 'peft'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    adapter = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["target_modules"] == [
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]


@pytest.mark.parametrize(
    "bindings, fragment",
    [
        (["train.num_stpes = 3"], "num_stpes"),
        (["train.batch_size = 6", "train.mesh_shape = (4, 1, 1)"], "train.batch_size"),
        (["data.sources = ('/nonexistent/corpus',)"], "/nonexistent/corpus"),
        (["train.mesh_shape = (3, 1, 1)"], "train.mesh_shape"),
        (["model.vocab_size = 100"], "model.vocab_size"),
    ],
)
def test_user_errors_exit_1_with_a_message(bindings, fragment, tmp_path):
    result = _run(
        ["--gin_file=configs/experiment/demo.gin", f"--workdir={tmp_path}"]
        + [f"--gin_bindings={b}" for b in bindings + [f"data.cache_dir = '{tmp_path}/c'"]],
        env_extra={"XLA_FLAGS": with_devices(4)},
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr


def test_the_run_keeps_the_source_tokenizers_chat_template(tmp_path):
    from launch.train import _keep_chat_template
    from research.data import train_tokenizer
    from research.data.tokenizer import read_chat_template

    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    source, run = tmp_path / "source", tmp_path / "run"
    tokenizer = train_tokenizer(["Once more unto the breach."] * 10, 280)
    tokenizer.save(str(source))
    config = json.loads((source / "tokenizer_config.json").read_text())
    (source / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    tokenizer.save(str(run))  # What launch.train writes to WORKDIR/tokenizer: no template.
    assert read_chat_template(str(run)) is None
    _keep_chat_template(str(source), str(run))
    assert read_chat_template(str(run)) == template
    _keep_chat_template("", str(run))  # A trained-from-scratch run: nothing to carry.
    assert read_chat_template(str(run)) == template
