"""Preference tuning (DPO) of a pretrained chat model on prompt / chosen / rejected pairs.

  python -m launch.dpo --gin_file=configs/experiment/dpo_smollm2.gin \
      --init_from=SmolLM2-135M-Instruct.Q4_1.gguf --workdir=runs/dpo

Reads the pairs (`dpo.data`; research/finetune/preference.py) and tokenizes them through the
model's chat template; scores every response once with the initial model, the reference
(kept with the pairs in WORKDIR/dpo_pairs.npz and reused when the run resumes); then trains
in the common loop (research/train/loop.py: checkpoints, resume, metrics.jsonl, progress
lines) with the DPO objective (research/finetune/dpo.py). `model.lora_rank > 0` trains LoRA
adapters only. Held-out pairs (`dpo.validation_fraction`) are scored every
`train.task_eval_every` steps and at the end. The workdir is a normal run: launch.sample,
launch.serve, launch.eval and launch.convert load it.
"""

import hashlib
import json
import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags
from etils import epath

from launch import cli
from launch import config as gin_config
from launch.pretrained import bind_pretrained, source_meta
from research import sharding, storage
from research.checkpoint import CheckpointConfig
from research.checkpoint.hf import copy_tokenizer_files
from research.data import DataConfig, Tokenizer
from research.data.chat import ChatTemplate
from research.data.tokenizer import read_chat_template
from research.errors import UserError
from research.finetune import (
    DPOConfig,
    PreferencePairs,
    dpo_objective,
    encode_pairs,
    pair_dataset,
    pair_evaluator,
    read_preferences,
    reference_logprobs,
)
from research.model import ModelConfig
from research.train import NonFiniteLossError, TrainConfig, train
from research.train.loop import Preempted, PreemptionNotice, check_batch_layout

INIT_FROM = flags.DEFINE_string(
    "init_from",
    None,
    "The model to tune, which is also DPO's reference: a Cirrus workdir, a Hugging Face model "
    "directory or a .gguf file. Its shape, tokenizer and chat template are used.",
)
PAIRS_FILE = "dpo_pairs.npz"


def _log(message: str) -> None:
    print(message, flush=True)


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; pass settings as --gin_bindings.")
    workdir = cli.WORKDIR.value
    if not workdir:
        raise UserError("--workdir is required: the directory for this run's outputs.")
    if not INIT_FROM.value:
        raise UserError(
            "--init_from is required: the model to tune (a workdir, HF directory or .gguf); "
            "DPO measures every step against it."
        )
    if os.environ.get("CIRRUS_NUM_PROCESSES", "1") != "1":
        raise UserError("launch.dpo runs as one process (on any number of its devices).")
    gin_config.parse(cli.GIN_FILES.value, cli.GIN_BINDINGS.value)
    dpo_config = gin_config.build(DPOConfig)
    if not dpo_config.data:
        raise UserError(
            "dpo.data is empty; give preference JSONL files, e.g. "
            "--gin_bindings=\"dpo.data = ['prefs.jsonl']\" (one "
            '{"prompt": ..., "chosen": ..., "rejected": ...} a line).'
        )
    preferences = read_preferences(_resolve(dpo_config.data))
    _log(f"dpo: read {len(preferences)} preference pairs from {', '.join(dpo_config.data)}")
    storage.check_bucket(workdir)
    pretrained = bind_pretrained(INIT_FROM.value, log=_log)
    model_config = gin_config.build(ModelConfig)
    train_config = gin_config.build(TrainConfig)
    checkpoint_config = gin_config.build(CheckpointConfig)
    if train_config.seq_len > model_config.max_seq_len:
        raise UserError(
            f"train.seq_len={train_config.seq_len} exceeds model.max_seq_len="
            f"{model_config.max_seq_len}; lower train.seq_len."
        )
    tokenizer_path = gin_config.build(DataConfig).tokenizer_path
    tokenizer = Tokenizer.load(tokenizer_path)
    chat_template = read_chat_template(tokenizer_path)
    template = ChatTemplate(tokenizer, chat_template)
    which = "the model's" if chat_template else "ChatML (the model has none)"
    _log(f"dpo: chat template: {which}")
    pairs, report = encode_pairs(
        template,
        preferences,
        seq_len=train_config.seq_len,
        min_prompt_tokens=dpo_config.min_prompt_tokens,
    )
    _log(f"dpo: {report.describe()}")
    if len(pairs) == 0:
        raise UserError(
            "dpo.data: no usable pair (see the counts above); raise train.seq_len or lower "
            "dpo.min_prompt_tokens if the responses are too long."
        )
    mesh = sharding.make_mesh(train_config.mesh_shape)
    check_batch_layout(train_config, mesh)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    pairs = _with_reference(pairs, pretrained, model_config, train_config, mesh, workdir)
    train_pairs, validation_pairs = _split(pairs, dpo_config.validation_fraction, train_config.seed)
    _log(
        f"dpo: {len(train_pairs)} training pairs, {len(validation_pairs)} held out; beta "
        f"{dpo_config.beta:g}; {train_config.batch_size} pairs a step"
    )
    _write_run_files(workdir, tokenizer, tokenizer_path)
    objective = dpo_objective(dpo_config.beta)
    task_eval = None
    if len(validation_pairs) and train_config.task_eval_every:
        evaluate = pair_evaluator(objective, validation_pairs, train_config.batch_size)

        def task_eval(graphdef, params, mesh):
            results = evaluate(graphdef, params, mesh)
            return {f"validation_pairs/{name}": value for name, value in results.items()}

    try:
        train(
            model_config,
            train_config,
            data_dir=None,
            dataset=pair_dataset(train_pairs, train_config.batch_size, train_config.seed),
            workdir=workdir,
            log=_log,
            mesh=mesh,
            checkpoint=checkpoint_config,
            meta={
                "config_gin": gin_config.operative_config(),
                "dpo_pairs": len(pairs),
                **source_meta(pretrained),
            },
            preemption=PreemptionNotice().install(),
            init_params=pretrained.params,
            task_eval=task_eval,
            objective=objective,
        )
    except NonFiniteLossError as error:
        raise UserError(str(error)) from None
    except Preempted as preempted:
        _log(f"{preempted}; exiting with code {cli.EXIT_PREEMPTED} so that a supervisor restarts")
        sys.exit(cli.EXIT_PREEMPTED)
    _log(
        f"\nworkdir      {os.path.abspath(workdir)}\n"
        f"metrics      {os.path.join(workdir, 'metrics.jsonl')}\n"
        f"serve it:    python -m launch.serve --workdir={workdir}\n"
        f"sample it:   python -m launch.sample --workdir={workdir} --prompt='Hello'"
    )


def _resolve(sources) -> list[str]:
    """dpo.data entries as given, or under the repository when only there (the demo set)."""
    resolved = []
    for source in sources:
        in_repo = os.path.join(gin_config.ROOT, source)
        missing = not os.path.exists(os.path.expanduser(source))
        resolved.append(in_repo if missing and os.path.exists(in_repo) else source)
    return resolved


def _with_reference(pairs, pretrained, model_config, train_config, mesh, workdir):
    """The pairs with their reference log-probs: from WORKDIR/dpo_pairs.npz when it holds
    these pairs scored by this model, else computed now (and saved there)."""
    path = epath.Path(workdir) / PAIRS_FILE
    identity = {"source": pretrained.source, "dtype": model_config.dtype}
    if os.path.exists(str(pretrained.source.get("path", ""))):
        stat = os.stat(pretrained.source["path"])
        identity["stat"] = [stat.st_size, stat.st_mtime_ns]
    text = pairs.fingerprint() + json.dumps(identity, sort_keys=True, default=str)
    key = hashlib.sha256(text.encode()).hexdigest()
    saved = PreferencePairs.load(path, key)
    if saved is not None:
        _log(f"dpo: reference log-probs of {len(saved)} pairs read from {path}")
        return saved
    start = time.perf_counter()
    pairs.reference = reference_logprobs(
        model_config, pretrained.params, pairs, batch_size=train_config.batch_size, mesh=mesh
    )
    chosen, rejected = pairs.reference.mean(axis=0)
    _log(
        f"dpo: reference log-probs of {len(pairs)} pairs in {time.perf_counter() - start:.1f}s "
        f"(mean chosen {chosen:.2f}, rejected {rejected:.2f}); saved to {path}"
    )
    pairs.save(path, key)
    return pairs


def _split(pairs, fraction: float, seed: int):
    """(training, held-out) pairs; the held-out ones drawn by `seed`, at least one when the
    fraction is positive, never all."""
    count = min(round(fraction * len(pairs)), len(pairs) - 1) if fraction else 0
    if fraction and count == 0 and len(pairs) > 1:
        count = 1
    order = np.random.default_rng(seed).permutation(len(pairs))
    return pairs.take(np.sort(order[count:])), pairs.take(np.sort(order[:count]))


def _write_run_files(workdir: str, tokenizer, tokenizer_path: str) -> None:
    """config.gin and tokenizer/ (with the chat template), as launch.train writes them."""
    workdir_path = epath.Path(workdir)
    with tempfile.TemporaryDirectory() as local:
        if os.path.isdir(tokenizer_path):
            copy_tokenizer_files(tokenizer_path, local)
        else:
            tokenizer.save(local)
        storage.upload_dir(local, workdir_path / "tokenizer")
    (workdir_path / "config.gin").write_text(gin_config.operative_config())


if __name__ == "__main__":
    app.run(cli.guarded(main))
