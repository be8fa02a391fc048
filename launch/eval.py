"""Evaluates a model: text metrics, multiple choice, generation.

  python -m launch.eval --workdir=DIR|HF_DIR|FILE.gguf [--gin_bindings="eval.stride=64"] \
      [--gin_bindings="eval.choice_tasks=('my_task.jsonl',)"] [--report_dir=DIR]

By default: loss, perplexity, bits per byte and next-token accuracy of the run's held-out
validation split (sliding window), the LAMBADA-style cloze task built from it, and the
memorisation check (research/evaluation/memorization.py: eval.memorization_snippets windows
of the train split, prefix of eval.memorization_prefix tokens in, greedy continuation out,
the fraction that reproduces all eval.memorization_suffix tokens; 0 snippets = off). A model
without prepared data (imported) evaluates eval.text_files / eval.choice_tasks instead.
Settings are `eval.*` (research.evaluation.EvalConfig). Writes eval_report.json and
eval_report.md to --report_dir (default: the workdir of a Cirrus run, else the current
directory) and prints the table. Memory is bounded by window x block (attention and the LM
head run a block at a time), so the model's full context works as eval.seq_len.
"""

import dataclasses
import json
import resource
import sys
import time

from absl import app, flags
from etils import epath

from launch import cli
from launch import config as gin_config
from research.errors import UserError
from research.evaluation import EvalConfig, build_suite, markdown_table, run_suite

REPORT_DIR = flags.DEFINE_string(
    "report_dir", None, "Where to write the reports (default: the run's workdir, else '.')."
)
REPORT_JSON = "eval_report.json"
REPORT_MARKDOWN = "eval_report.md"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; pass settings as --gin_bindings.")
    workdir = cli.WORKDIR.value
    if not workdir:
        raise UserError("--workdir is required: the run (or HF directory, or .gguf) to evaluate.")
    gin_config.parse(cli.GIN_FILES.value, cli.GIN_BINDINGS.value)
    config = gin_config.build(EvalConfig)

    from research.checkpoint import load

    loaded = load(workdir, log=_log)
    if loaded.tokenizer is None:
        raise UserError(f"{workdir} has no tokenizer; evaluation needs it.")
    data_dir = loaded.data_dir
    if data_dir is None and (config.text_files or config.choice_tasks):
        if config.split or config.memorization_snippets:
            _log(
                f"{workdir} has no prepared data (an imported model): eval.split and the "
                "memorisation check are skipped"
            )
        config = dataclasses.replace(config, split="", memorization_snippets=0)
    if config.memorization_snippets and (data_dir is None or not epath.Path(data_dir).exists()):
        where = (
            f"prepared data at {data_dir}, which is not available here (prepare it again with "
            "the run's data.* config)"
            if data_dir
            else "no training split (an imported or preference-tuned model)"
        )
        raise UserError(
            f"eval.memorization_snippets={config.memorization_snippets} checks the run's "
            f"training split, but {workdir} records {where}. Set "
            "eval.memorization_snippets=0 to evaluate without the check."
        )
    if config.split and (data_dir is None or not epath.Path(data_dir).exists()):
        raise UserError(
            f"eval.split={config.split!r} needs the run's prepared data, but "
            f"{data_dir or 'no directory'} is not available here; prepare it again with the "
            "run's data.* config, or set eval.split='' and eval.text_files=('PATH',)."
        )
    start = time.perf_counter()
    suite = build_suite(config, loaded.model_config, loaded.tokenizer, data_dir=data_dir)
    results = run_suite(suite, loaded.graphdef, loaded.params)
    if config.memorization_snippets:
        results.update(_memorization(config, loaded, data_dir))
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    table = markdown_table(results)
    report = {
        "workdir": str(workdir),
        "step": loaded.step,
        "seconds": round(seconds, 2),
        "peak_memory_gb": round(peak_gb, 2),
        "config": dataclasses.asdict(config),
        "metrics": results,
    }
    default_dir = workdir if loaded.step is not None else "."
    report_dir = epath.Path(REPORT_DIR.value or default_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    at = f" at step {loaded.step}" if loaded.step is not None else ""
    (report_dir / REPORT_MARKDOWN).write_text(f"# Evaluation of {workdir}{at}\n\n" + table)
    print(table, end="", flush=True)
    _log(
        f"evaluated in {seconds:.1f}s (peak memory {peak_gb:.2f} GB); wrote "
        f"{report_dir / REPORT_JSON} and {REPORT_MARKDOWN}"
    )


def _memorization(config: EvalConfig, loaded, data_dir: str) -> dict[str, float]:
    """The memorisation check's metrics as "memorization/<name>"; a summary line printed."""
    from research.evaluation import evaluate_memorization, training_snippets
    from research.serving import Sampler

    window = config.memorization_prefix + config.memorization_suffix
    if window > loaded.model_config.max_seq_len:
        raise UserError(
            f"eval.memorization_prefix + eval.memorization_suffix = {window} tokens exceed "
            f"model.max_seq_len={loaded.model_config.max_seq_len}; lower them."
        )
    snippets = training_snippets(
        data_dir,
        num_snippets=config.memorization_snippets,
        prefix_len=config.memorization_prefix,
        suffix_len=config.memorization_suffix,
        seed=config.seed,
    )
    sampler = Sampler(
        loaded.model_config,
        loaded.graphdef,
        loaded.params,
        num_slots=config.num_slots,
        max_len=window,
        steps_per_call=min(config.memorization_suffix, 32),
    )
    metrics = evaluate_memorization(sampler, snippets, prefix_len=config.memorization_prefix)
    _log(
        f"memorisation: {metrics['exact_fraction']:.1%} of {metrics['snippets']} training "
        f"windows reproduced verbatim ({metrics['suffix_tokens']} tokens after a "
        f"{metrics['prefix_tokens']}-token prefix); mean {metrics['mean_matched_tokens']:.1f} "
        "leading tokens matched"
    )
    return {f"memorization/{name}": float(value) for name, value in metrics.items()}


if __name__ == "__main__":
    app.run(cli.guarded(main))
