"""Trains a model from gin configs.

  python -m launch.train --gin_file=configs/experiment/demo.gin \
      --gin_bindings='train.num_steps=200' --workdir=/tmp/demo

Prepares the configured data first when it is not cached yet, writes the operative gin
config, metrics.jsonl, TensorBoard events and a loss-curve PNG to the workdir, then evaluates
the final model on the held-out test split and prints a sample.
"""

import json
import os
import sys
import tempfile

from absl import app, flags
from etils import epath

from launch import cli, distributed
from launch import config as gin_config
from launch.pretrained import bind_pretrained, source_meta
from research import storage
from research.checkpoint import CheckpointConfig, checkpoint_dir, move_aside
from research.data import DataConfig, ensure_prepared
from research.errors import UserError
from research.model import ModelConfig
from research.train import NonFiniteLossError, TrainConfig, evaluate, train
from research.train.loop import Preempted, PreemptionNotice, eval_batches

SAMPLE_PROMPT = flags.DEFINE_string(
    "sample_prompt", "ROMEO\n", "Prompt for the sample printed after training ('' skips)."
)
SAMPLE_TOKENS = flags.DEFINE_integer("sample_tokens", 96, "New tokens in the final sample.")
FRESH = flags.DEFINE_bool(
    "fresh",
    False,
    "Start from step 0 instead of resuming: the workdir's checkpoints (ckpt/) are moved aside "
    "to ckpt.old-<UTC time>/ next to them, not deleted.",
)
INIT_FROM = flags.DEFINE_string(
    "init_from",
    None,
    "Start from pretrained weights: a Cirrus workdir, a Hugging Face model directory or a "
    ".gguf file. Its model shape and tokenizer replace the gin model.* and data.tokenizer_path.",
)
TEACHER = flags.DEFINE_string(
    "teacher",
    None,
    "Distil from this model (a Cirrus workdir, HF directory or .gguf sharing the data's "
    "tokenizer): the loss becomes distill_alpha * T^2 * KL(teacher || student) + (1 - "
    "distill_alpha) * cross-entropy, the teacher running frozen in the same jitted step, "
    "sharded on the same mesh. The student is the gin model (any shape) or --init_from.",
)
DISTILL_ALPHA = flags.DEFINE_float(
    "distill_alpha", 0.9, "With --teacher: weight of the KD term (0: cross-entropy only)."
)
DISTILL_TEMPERATURE = flags.DEFINE_float(
    "distill_temperature", 1.0, "With --teacher: the softmax temperature T of both models."
)


def _log(message: str) -> None:
    print(message, flush=True)


def prepare_run(workdir: str):
    """Builds the configs and prepared data, writes config.gin; returns what train() needs."""
    storage.check_bucket(workdir)  # First: gcsfs and s3fs would create a typo's bucket on mkdir.
    model_config = gin_config.build(ModelConfig)
    data_config = gin_config.build(DataConfig)
    train_config = gin_config.build(TrainConfig)
    prepared = ensure_prepared(data_config, log=_log)
    tokenizer = prepared.tokenizer
    if tokenizer.vocab_size > model_config.vocab_size:
        raise UserError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
            f"{model_config.vocab_size}; set model.vocab_size >= {tokenizer.vocab_size} (or "
            f"lower data.vocab_size)."
        )
    if train_config.seq_len > model_config.max_seq_len:
        raise UserError(
            f"train.seq_len={train_config.seq_len} exceeds model.max_seq_len="
            f"{model_config.max_seq_len}; lower train.seq_len or raise model.max_seq_len."
        )
    workdir_path = epath.Path(workdir)
    workdir_path.mkdir(parents=True, exist_ok=True)
    if distributed.is_chief():  # Shared files: one writer.
        with tempfile.TemporaryDirectory() as local:
            tokenizer.save(local)
            _keep_chat_template(data_config.tokenizer_path, local)
            storage.upload_dir(local, workdir_path / "tokenizer")
        (workdir_path / "config.gin").write_text(gin_config.operative_config())
    return model_config, train_config, prepared


def _keep_chat_template(tokenizer_path: str, directory: str) -> None:
    """Carries the source tokenizer's chat_template (e.g. an imported model's, which chat
    fine-tuning rendered its data with) into the run's saved tokenizer, so that launch.serve
    chats with the template the model was trained on rather than the ChatML default."""
    from research.data.tokenizer import read_chat_template

    source = os.path.expanduser(tokenizer_path or "")
    template = read_chat_template(source) if os.path.isdir(source) else None
    if template is None:
        return
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({**config, "chat_template": template}, f, indent=2)


def _task_eval(train_config, model_config, prepared):
    """The evaluation suite (`eval.*`) as a callable for the loop, or None when it is off."""
    if not train_config.task_eval_every:
        return None
    import jax

    from research.evaluation import EvalConfig, build_suite, run_suite

    if jax.process_count() > 1:
        _log("train.task_eval_every: the evaluation suite runs single-process only; skipped.")
        return None
    suite = build_suite(
        gin_config.build(EvalConfig),
        model_config,
        prepared.tokenizer,
        data_dir=prepared.directory,
    )
    return lambda graphdef, params, mesh: run_suite(suite, graphdef, params, mesh=mesh)


def main(argv):
    distributed.initialize(log=_log)  # Before any JAX computation (launch/distributed.py).
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; pass settings as --gin_bindings.")
    workdir = cli.WORKDIR.value
    if not workdir:
        raise UserError("--workdir is required: the directory for this run's outputs.")
    gin_config.parse(cli.GIN_FILES.value, cli.GIN_BINDINGS.value)
    pretrained = bind_pretrained(INIT_FROM.value, log=_log) if INIT_FROM.value else None
    init_params = pretrained.params if pretrained else None
    model_config, train_config, prepared = prepare_run(workdir)
    checkpoint_config = gin_config.build(CheckpointConfig)
    if FRESH.value and distributed.is_chief():
        _move_checkpoints_aside(workdir)
    if FRESH.value:
        distributed.barrier("fresh")  # No host restores while the chief moves the old steps.
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    task_eval = _task_eval(train_config, model_config, prepared)
    objective = _teacher(TEACHER.value, model_config, prepared) if TEACHER.value else None
    try:
        trainer, state, _ = train(
            model_config,
            train_config,
            data_dir=prepared.directory,
            workdir=workdir,
            log=_log,
            checkpoint=checkpoint_config,
            meta={
                "config_gin": gin_config.operative_config(),
                **(source_meta(pretrained) if pretrained else {}),
            },
            preemption=PreemptionNotice().install(),
            init_params=init_params,
            task_eval=task_eval,
            objective=objective,
        )
    except NonFiniteLossError as error:
        raise UserError(str(error)) from None
    except Preempted as preempted:
        _log(f"{preempted}; exiting with code {cli.EXIT_PREEMPTED} so that a supervisor restarts")
        sys.exit(cli.EXIT_PREEMPTED)

    test = evaluate(trainer, state.params, eval_batches(prepared.directory, "test", train_config))
    _log(
        f"test split: loss {test['loss']:.4f}  perplexity {test['perplexity']:.2f}  "
        f"accuracy {100 * test['accuracy']:.1f}%  ({int(test['tokens']):,} tokens)"
    )
    # Parameters sharded over other hosts are gathered by every host (a collective) first.
    sample_params = _host_params(state.params) if SAMPLE_PROMPT.value else None
    if not distributed.is_chief():
        return
    (epath.Path(workdir) / "eval_test.json").write_text(json.dumps(test, indent=2))
    if SAMPLE_PROMPT.value:
        _print_sample(trainer, sample_params, model_config, prepared.tokenizer)
    _log(
        f"\nworkdir      {os.path.abspath(workdir)}\n"
        f"config       {os.path.join(workdir, 'config.gin')}\n"
        f"metrics      {metrics_path}\n"
        f"tensorboard  tensorboard --logdir {os.path.join(workdir, 'tensorboard')}\n"
        f"loss curve   {os.path.join(workdir, 'plots', 'loss.png')}"
    )


def _move_checkpoints_aside(workdir: str) -> None:
    """--fresh: the old steps go to ckpt.old-<UTC time>/, so the run starts at step 0."""
    directory = checkpoint_dir(workdir)
    if not epath.Path(directory).exists():
        _log(f"--fresh: no checkpoints in {directory}; starting at step 0")
        return
    moved = move_aside(directory)
    _log(f"--fresh: moved the old checkpoints {directory} to {moved}; starting at step 0")


def _host_params(params):
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        return multihost_utils.process_allgather(params, tiled=True)
    return jax.device_get(params)


def _print_sample(trainer, params, model_config, tokenizer):
    """Streams a sample from the KV-cache Sampler (the one launch.sample and serving use)."""
    from research.serving import Sampler, SamplingParams, complete

    prompt_ids = tokenizer.encode_prompt(SAMPLE_PROMPT.value)
    max_len = min(model_config.max_seq_len, len(prompt_ids) + SAMPLE_TOKENS.value)
    sampler = Sampler(model_config, trainer.graphdef, params, num_slots=1, max_len=max_len)
    request = SamplingParams(
        max_new_tokens=SAMPLE_TOKENS.value,
        temperature=0.8,
        seed=0,
        stop_token_ids=(tokenizer.eos_id,),
    )
    print("\n--- sample (temperature 0.8) ---\n" + SAMPLE_PROMPT.value, end="", flush=True)
    complete(
        sampler,
        [prompt_ids],
        request,
        tokenizer=tokenizer,
        on_text=lambda _, text: print(text, end="", flush=True),
    )
    _log("\n--- end of sample ---")


def _teacher(source: str, model_config, prepared):
    """--teacher: the distillation objective (research/compression/distill.py) around the
    loaded teacher, after checking it can score the student's tokens."""
    from research.checkpoint import load_pretrained
    from research.compression.distill import distill_objective
    from research.compression.quantize import dequantize_params
    from research.train.state import abstract_model

    alpha, temperature = DISTILL_ALPHA.value, DISTILL_TEMPERATURE.value
    if not 0 <= alpha <= 1 or not temperature > 0:
        raise UserError(
            f"--distill_alpha={alpha} must be in [0, 1] and --distill_temperature="
            f"{temperature} positive."
        )
    teacher = load_pretrained(source, log=_log)
    config, params = teacher.model_config, teacher.params
    if config.quant != "none":
        config, params = dequantize_params(config, params)
    if config.vocab_size != model_config.vocab_size:
        raise UserError(
            f"--teacher={source} has vocab_size {config.vocab_size}, the student "
            f"model.vocab_size={model_config.vocab_size}; distillation compares their logits "
            "token for token, so both need the same vocabulary (and tokenizer)."
        )
    if teacher.tokenizer is not None and teacher.tokenizer.vocab_size != (
        prepared.tokenizer.vocab_size
    ):
        raise UserError(
            f"--teacher={source} has a {teacher.tokenizer.vocab_size}-token tokenizer but the "
            f"data is tokenized with {prepared.tokenizer.vocab_size} tokens; prepare the data "
            "with the teacher's tokenizer (data.tokenizer_path)."
        )
    graphdef, _ = abstract_model(config)
    _log(
        f"--teacher: {source} ({config.num_layers} layers, d_model {config.d_model}); "
        f"loss = {alpha} * T^2 * KL + {1 - alpha:g} * CE at T = {temperature}"
    )
    return distill_objective(config, graphdef, params, alpha=alpha, temperature=temperature)


if __name__ == "__main__":
    app.run(distributed.exit_promptly(cli.guarded(main)))
