"""Measures applications (chat, QA, translation, moderation, text generation) on a model in
this process or on any OpenAI-compatible server, with the same scorer and the same numbers.

  python -m launch.apps --workdir=DIR|HF_DIR|FILE.gguf [--apps=qa,translation] [--report=F]
  python -m launch.apps --base_url=http://127.0.0.1:8000/v1 [--model=NAME] [--apps=...]

Apps and metrics (research/evaluation/applications.py; sets in research/evaluation/app_data/):
chat (keyword accuracy), qa (exact match, F1), translation (chrF), moderation (accuracy),
text (perplexity). Replies are greedy (temperature 0). Settings are `apps.*` (AppConfig:
max_tokens, text_paragraphs, text_max_chars, data_dir, num_slots). Prints a table and writes
the metrics with every item's reply to --report (default apps_report.json).
"""

import dataclasses
import json
import sys
import time

from absl import app, flags

from launch import cli
from launch import config as gin_config
from research.errors import UserError
from research.evaluation import APPS, AppConfig, InProcessBackend, OpenAIBackend, run_app

APPS_FLAG = flags.DEFINE_list("apps", list(APPS), f"Apps to run, of {','.join(APPS)}.")
BASE_URL = flags.DEFINE_string(
    "base_url", None, "An OpenAI-compatible server's /v1 URL; unset = the --workdir model here."
)
MODEL = flags.DEFINE_string("model", "", "Model name for --base_url ('' = the server's first).")
API_KEY = flags.DEFINE_string("api_key", "unused", "Bearer key for --base_url.")
REPORT = flags.DEFINE_string("report", "apps_report.json", "Where to write the JSON report.")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_backend(config: AppConfig):
    """The OpenAI backend of --base_url, else the --workdir model in process."""
    if BASE_URL.value:
        return OpenAIBackend(BASE_URL.value, MODEL.value, API_KEY.value), BASE_URL.value
    workdir = cli.WORKDIR.value
    if not workdir:
        raise UserError("give --workdir (a model to load here) or --base_url (a server).")
    from research.checkpoint import load

    loaded = load(workdir, log=_log)
    if loaded.tokenizer is None:
        raise UserError(f"{workdir} has no tokenizer; the apps need it.")
    return InProcessBackend(loaded, num_slots=config.num_slots), str(workdir)


def table(results: dict) -> str:
    """Markdown: one row per app and metric."""
    lines = ["| app | metric | value |", "| --- | --- | --- |"]
    for name, result in results.items():
        for metric, value in result["metrics"].items():
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"| {name} | {metric} | {shown} |")
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; pass settings as flags or gin.")
    unknown = [a for a in APPS_FLAG.value if a not in APPS]
    if unknown:
        raise UserError(f"--apps has unknown {unknown}; choose from {','.join(APPS)}.")
    gin_config.parse(cli.GIN_FILES.value, cli.GIN_BINDINGS.value)
    config = gin_config.build(AppConfig)
    backend, source = make_backend(config)
    results = {}
    for name in APPS_FLAG.value:
        start = time.perf_counter()
        results[name] = run_app(name, backend, config)
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
        _log(f"{name}: {results[name]['metrics']} in {results[name]['seconds']} s")
    report = {"source": source, "config": dataclasses.asdict(config), "apps": results}
    with open(REPORT.value, "w", encoding="utf-8") as f:
        f.write(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(table(results), end="", flush=True)
    _log(f"wrote {REPORT.value}")


if __name__ == "__main__":
    app.run(cli.guarded(main))
