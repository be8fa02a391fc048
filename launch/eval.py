"""Evaluates a trained run's latest checkpoint: text metrics, multiple choice, generation.

  python -m launch.eval --workdir=DIR [--gin_bindings="eval.stride=64"] \
      [--gin_bindings="eval.choice_tasks=('my_task.jsonl',)"]

By default: loss, perplexity, bits per byte and next-token accuracy of the run's held-out
validation split (sliding window), and the LAMBADA-style cloze task built from it. Settings
are `eval.*` (research.evaluation.EvalConfig). Writes eval_report.json and eval_report.md
to the workdir and prints the table.
"""

import dataclasses
import json
import sys
import time

from absl import app, logging
from etils import epath

from launch import cli
from launch import config as gin_config
from research.errors import UserError
from research.evaluation import EvalConfig, build_suite, markdown_table, run_suite

REPORT_JSON = "eval_report.json"
REPORT_MARKDOWN = "eval_report.md"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; pass settings as --gin_bindings.")
    workdir = cli.WORKDIR.value
    if not workdir:
        raise UserError("--workdir is required: the training run to evaluate.")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore detail at INFO.
    gin_config.parse(cli.GIN_FILES.value, cli.GIN_BINDINGS.value)
    config = gin_config.build(EvalConfig)

    from research.checkpoint import load_model

    loaded = load_model(workdir, log=_log)
    if loaded.tokenizer is None:
        raise UserError(f"{workdir} has no tokenizer/ directory; evaluation needs it.")
    data_dir = loaded.data_dir
    if config.split and (data_dir is None or not epath.Path(data_dir).exists()):
        raise UserError(
            f"eval.split={config.split!r} needs the run's prepared data, but "
            f"{data_dir or 'no directory'} is not available here; prepare it again with the "
            "run's data.* config, or set eval.split='' and eval.text_files=('PATH',)."
        )
    start = time.perf_counter()
    suite = build_suite(config, loaded.model_config, loaded.tokenizer, data_dir=data_dir)
    results = run_suite(suite, loaded.graphdef, loaded.params)
    seconds = time.perf_counter() - start
    table = markdown_table(results)
    report = {
        "workdir": str(workdir),
        "step": loaded.step,
        "seconds": round(seconds, 2),
        "config": dataclasses.asdict(config),
        "metrics": results,
    }
    workdir_path = epath.Path(workdir)
    (workdir_path / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    header = f"# Evaluation of {workdir} at step {loaded.step}\n\n"
    (workdir_path / REPORT_MARKDOWN).write_text(header + table)
    print(table, end="", flush=True)
    _log(f"evaluated in {seconds:.1f}s; wrote {workdir_path / REPORT_JSON} and {REPORT_MARKDOWN}")


if __name__ == "__main__":
    app.run(cli.guarded(main))
