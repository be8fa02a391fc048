"""README's own commands, run as written: every `python -m launch.*` line of README.md's code
blocks, in order, with temp workdirs for its /tmp paths, a tiny model and 2 training steps
(appended bindings win over earlier ones), launch.pod and launch.sweep as --dry_run, and
launch.serve started, asked /ready and stopped. A README example cannot rot unnoticed.
README's launch.local pod (4 processes x 2 devices) is also tests/launch/test_local.py's
many-hosts case: each host must join jax.distributed and the job see every device.
"""

import concurrent.futures
import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest
import transformers

from launch.config import ROOT
from research.data import train_tokenizer
from tests.launch.test_train_cli import TINY_RUN
from tests.serving.server_fixtures import start_server, stop_server

README = os.path.join(ROOT, "README.md")
TEXT = "Once more unto the breach, dear friends, once more; or close the wall up with our dead."
TINY_MODEL = [b for b in TINY_RUN if b.startswith(("model.", "data."))]
# SmolLM2's chat format (ChatML), so that README's chat fine-tuning runs as it does there.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_STEPS = ["train.num_steps = 2", "train.batch_size = 8", "train.seq_len = 32"]
TINY_STEPS += ["train.log_every = 1", "train.eval_every = 0", "train.eval_batches = 1"]


def readme_commands(path: str = README) -> list[tuple[int, list[str]]]:
    """(line number, argv) of every `python -m launch.*` command in README's code blocks,
    backslash continuations joined and trailing comments dropped."""
    commands, in_block, pending, start = [], False, "", 0
    with open(path) as readme:
        for number, line in enumerate(readme, 1):
            if line.startswith("```"):
                in_block = not in_block
                continue
            if not in_block:
                continue
            if not pending:
                start = number
            pending += line.rstrip("\n")
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            argv = shlex.split(pending, comments=True)
            pending = ""
            if argv[:2] == [".venv/bin/python", "-m"] and argv[2].startswith("launch."):
                commands.append((start, argv))
            elif "-m launch." in " ".join(argv):
                raise AssertionError(f"README.md:{start}: run launch.* as .venv/bin/python -m")
    return commands


def test_readme_commands_are_found():
    modules = [argv[2] for _, argv in readme_commands()]
    for module in ("launch.train", "launch.sample", "launch.serve", "launch.pod"):
        assert module in modules


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """What README's commands name that a test must provide: a text directory and a GGUF."""
    from tests.checkpoint.test_gguf import LLAMA, Q8_0, write_llama_gguf
    from tests.checkpoint.test_hf import randomize

    root = tmp_path_factory.mktemp("readme")
    texts = root / "texts"
    texts.mkdir()
    for index in range(12):
        (texts / f"part{index}.txt").write_text(f"Part {index}. " + (TEXT + " ") * 8)
    tokenizer = train_tokenizer([TEXT] * 20, 300)
    # Three layers: README's depth-pruning example removes one (the first and last stay).
    config = transformers.LlamaConfig(
        **dict(LLAMA, vocab_size=tokenizer.vocab_size, num_hidden_layers=3)
    )
    model = randomize(transformers.LlamaForCausalLM(config))
    write_llama_gguf(
        root / "model.gguf", model, "llama", Q8_0, tokenizer=tokenizer, chat_template=CHATML
    )
    # Preference pairs short enough for the tiny model's 64 positions (README's DPO).
    pairs = [{"prompt": f"Hi {i}", "chosen": "Yes.", "rejected": "No!"} for i in range(4)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    return root


def _adapt(argv: list[str], root, cache: str) -> tuple[list[str], str]:
    """README's argv made runnable here; returns (argv, how to run it: run | serve)."""
    module = argv[2]
    text = shlex.join(argv[1:])  # The interpreter is ours (its path may lie under /tmp).
    text = re.sub(r"(?<![\w/])/tmp/(\w+)", lambda m: str(root / "tmp" / m.group(1)), text)
    text = text.replace("/path/to/texts", str(root / "texts"))
    text = re.sub(r"=model\.gguf\b", f"={root / 'model.gguf'}", text)
    text = text.replace("$SMOLLM2", str(root / "model.gguf"))
    argv = [sys.executable, *shlex.split(text)]
    bindings = [f"data.cache_dir = '{cache}'"]
    if module in ("launch.train", "launch.local", "launch.prepare_data"):
        bindings = TINY_MODEL + bindings
        if "--init_from" in text:  # The model is the imported one's; its tokenizer too.
            bindings = [b for b in bindings if not b.startswith(("model.", "data.vocab_size"))]
    if module in ("launch.train", "launch.local"):
        bindings += TINY_STEPS
    if module == "launch.local":
        argv += ["--grace_s=10"]
    if module in ("launch.pod", "launch.sweep") and "--dry_run" not in argv:
        argv.append("--dry_run")
    if module in ("launch.train", "launch.local", "launch.prepare_data"):
        argv += [f"--gin_bindings={b}" for b in bindings]
    if module == "launch.sample":
        argv.append("--max_new_tokens=8")
    if module == "launch.apps":  # The tiny model holds 64 tokens: no chat prompt fits.
        argv += ["--apps=text", "--gin_bindings=apps.text_paragraphs = 2"]
        argv += ["--gin_bindings=apps.text_max_chars = 40"]
    if module == "launch.compress":  # Small evaluation and timing; one layer to prune.
        quick = ["eval_tokens = 1024", "eval_window = 64", "speed_tokens = 8", "speed_reps = 1"]
        quick += ["calibration_sequences = 4", "calibration_len = 32", "prune_layers = 1"]
        quick += ["distill_steps = 2", "distill_seq_len = 16"]
        quick += ["prune_mlp_dim = 64", "prune_kv_heads = 1"]  # The tiny model's 96 and 2.
        argv += [f"--gin_bindings=compress.{b}" for b in quick]
    if module in ("launch.train", "launch.local"):
        argv += ["--", "--sample_prompt="] if module == "launch.local" else ["--sample_prompt="]
    if module == "launch.dpo":  # Two steps on short pairs (the demo's need a real tokenizer).
        dpo = [f"dpo.data = ['{root / 'pairs.jsonl'}']", "dpo.min_prompt_tokens = 8"]
        dpo += ["dpo.validation_fraction = 0.0", "train.seq_len = 64"]
        argv += [f"--gin_bindings={b}" for b in TINY_STEPS + dpo]
    return argv, "serve" if module == "launch.serve" else "run"


def _serve(argv, env) -> tuple[int, str]:
    """Starts the server, waits for /ready, stops it by PID; (exit code, output)."""
    try:
        server = start_server(argv[3:], env=env, timeout_s=180)
    except RuntimeError as error:  # Exited, or never ready: the log is in the message.
        return 99, str(error)
    return stop_server(server), server.log()


def _run(argv, how, env, deps) -> tuple[int, str, float]:
    for dep in deps:
        dep.result()
    started = time.monotonic()
    if how == "serve":
        code, output = _serve(argv, env)
    else:
        result = subprocess.run(
            argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )
        code, output = result.returncode, result.stdout + result.stderr
    return code, output, time.monotonic() - started


def _missing_hosts(argv: list[str], output: str) -> list[str]:
    """What launch.local's output lacks to be one job of --num_hosts processes (each joined
    jax.distributed) over every device of them all."""
    flags = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    hosts, per_host = int(flags.get("num_hosts", 2)), int(flags.get("devices_per_host", 1))
    wanted = [f"[host {h}] jax.distributed: process {h}/{hosts}" for h in range(hosts)]
    wanted.append(f"on {hosts * per_host} cpu devices, {hosts} process(es)")
    wanted.append(f"(hosts: {[0] * hosts})")  # Every host exited 0.
    return [line for line in wanted if line not in output]


@pytest.mark.slow
def test_every_readme_command_runs(inputs, tmp_path):
    """Two at a time: a command waits for every earlier one that names the same /tmp path
    (README's order is the data flow: train, then sample the run)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cache = str(tmp_path / "data_cache")
    runs, last_user = [], {}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for line, readme_argv in readme_commands():
            argv, how = _adapt(readme_argv, inputs, cache)
            paths = set(re.findall(r"(?<![\w/])/tmp/\w+", shlex.join(readme_argv)))
            deps = [last_user[path] for path in paths if path in last_user]
            future = pool.submit(_run, argv, how, env, deps)
            last_user.update(dict.fromkeys(paths, future))
            runs.append((line, readme_argv[2], argv, future))
    failures = []
    for line, module, argv, future in runs:
        code, output, seconds = future.result()
        print(f"README.md:{line} {module}: exit {code} in {seconds:.1f}s")
        if code != 0 or "Traceback" in output:
            failures.append(f"README.md:{line}: {shlex.join(argv)}\nexit {code}\n{output[-2000:]}")
        elif module == "launch.local" and (missing := _missing_hosts(argv, output)):
            failures.append(f"README.md:{line}: launch.local: {missing}\n{output[-3000:]}")
    assert not failures, "\n\n".join(failures)
