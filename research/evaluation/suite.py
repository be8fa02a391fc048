"""Everything `launch.eval` and the training loop evaluate, configured by one EvalConfig.

    suite = build_suite(EvalConfig(), model_config, tokenizer, data_dir=prepared.directory)
    metrics = run_suite(suite, graphdef, params)     # e.g. {"validation/loss": 3.1, ...}

`build_suite` reads and tokenizes the text and tasks once; `run_suite` only runs the model
(one compiled forward per shape, reused across calls), so the training loop can call it at an
interval cheaply. Metric names are "<task>/<metric>" with task one of: the split name,
"text_files", "cloze", and each JSONL task's file stem.
"""

import dataclasses
import glob
import os

from research.data import load_prepared, read_documents
from research.errors import UserError
from research.evaluation import tasks
from research.evaluation.generation import evaluate_generation
from research.evaluation.multiple_choice import choice_spans, evaluate_choices
from research.evaluation.perplexity import document_tokens, evaluate_documents


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What to evaluate; bound in gin as `eval.*`."""

    split: str = "validation"  # Held-out split of the run's prepared data ("" = none).
    text_files: tuple[str, ...] = ()  # More text to score: files, directories, globs.
    seq_len: int = 0  # Window length in tokens (0 = model.max_seq_len).
    stride: int = 0  # Sliding-window stride (0 = seq_len: disjoint windows).
    batch_size: int = 8  # Rows of seq_len tokens per jitted call.
    max_documents: int = 0  # Documents per text source (0 = all).
    append_eos: bool = True  # Score each document's end-of-text token too (as training does).
    cloze_items: int = 200  # LAMBADA-style items built from the split's text (0 = none).
    cloze_choices: int = 4
    choice_tasks: tuple[str, ...] = ()  # Multiple-choice JSONL files (context, choices, answer).
    generation_tasks: tuple[str, ...] = ()  # Generation JSONL files (prompt, answer).
    max_new_tokens: int = 32  # Per generation-task answer (greedy, stops at a newline).
    num_slots: int = 8  # Sampler slots for generation tasks (and the memorisation check).
    seed: int = 0
    # launch.eval's memorisation check (memorization.py): windows drawn with `seed` from the
    # run's train split, greedy continuation of the prefix, exact match of the suffix.
    memorization_snippets: int = 32  # Windows checked (0 = off).
    memorization_prefix: int = 32  # Tokens given to the model.
    memorization_suffix: int = 32  # Tokens it must reproduce.

    def __post_init__(self):
        names = ("seq_len", "stride", "max_documents", "cloze_items", "seed")
        for name in (*names, "memorization_snippets"):
            if getattr(self, name) < 0:
                raise UserError(f"eval.{name}={getattr(self, name)} must be >= 0.")
        for name in ("batch_size", "max_new_tokens", "num_slots", "memorization_prefix",
                     "memorization_suffix"):  # fmt: skip
            if getattr(self, name) < 1:
                raise UserError(f"eval.{name}={getattr(self, name)} must be >= 1.")
        if self.cloze_choices < 2:
            raise UserError(f"eval.cloze_choices={self.cloze_choices} must be >= 2.")
        if self.stride and self.seq_len and self.stride > self.seq_len:
            raise UserError(f"eval.stride={self.stride} must be <= eval.seq_len={self.seq_len}.")


@dataclasses.dataclass
class EvalSuite:
    """Tokenized data of every task (see build_suite)."""

    config: EvalConfig
    model_config: object
    tokenizer: object
    seq_len: int
    stride: int
    documents: dict  # name -> (token documents, bytes)
    choice_tasks: dict  # name -> (items, spans)
    generation_tasks: dict  # name -> items
    samplers: dict = dataclasses.field(default_factory=dict)  # graphdef -> Sampler


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _texts_of_split(data_dir: str, split: str) -> list[str]:
    import json

    path = load_prepared(data_dir).text_path(split)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def build_suite(config: EvalConfig, model_config, tokenizer, *, data_dir: str | None = None):
    """Reads and tokenizes every source and task of `config` (see the module docstring)."""
    seq_len = config.seq_len or model_config.max_seq_len
    if seq_len > model_config.max_seq_len:
        raise UserError(
            f"eval.seq_len={seq_len} exceeds model.max_seq_len={model_config.max_seq_len}."
        )
    stride = config.stride or seq_len
    if stride > seq_len:
        raise UserError(f"eval.stride={stride} must be <= the window ({seq_len} tokens).")
    sources = {}
    split_texts = []
    if config.split:
        if data_dir is None:
            raise UserError(
                f"eval.split={config.split!r} needs the run's prepared data, but none is known; "
                "set eval.split='' and give eval.text_files instead."
            )
        split_texts = _texts_of_split(data_dir, config.split)
        sources[config.split] = split_texts
    if config.text_files:
        files = [
            p
            for pattern in config.text_files
            for p in (glob.glob(os.path.expanduser(pattern)) or [pattern])
        ]
        sources["text_files"] = read_documents(files)
    documents = {}
    for name, texts in sources.items():
        if config.max_documents:
            texts = texts[: config.max_documents]
        docs = [document_tokens(tokenizer, t, append_eos=config.append_eos) for t in texts]
        documents[name] = (docs, sum(len(t.encode("utf-8")) for t in texts))
    choice = {}
    if config.cloze_items and split_texts:
        items = tasks.cloze_task(
            split_texts,
            num_items=config.cloze_items,
            num_choices=config.cloze_choices,
            seed=config.seed,
        )
        if items:
            choice["cloze"] = items
    for path in config.choice_tasks:
        choice[_stem(path)] = tasks.read_choice_task(path)
    choice = {
        name: (items, choice_spans(tokenizer, items, seq_len)) for name, items in choice.items()
    }
    generation = {_stem(p): tasks.read_generation_task(p) for p in config.generation_tasks}
    if not documents and not choice and not generation:
        raise UserError(
            "nothing to evaluate: set eval.split, eval.text_files, eval.choice_tasks or "
            "eval.generation_tasks."
        )
    return EvalSuite(
        config, model_config, tokenizer, seq_len, stride, documents, choice, generation
    )


def run_suite(suite: EvalSuite, graphdef, params, *, mesh=None) -> dict[str, float]:
    """Every metric of the suite for these parameters, as {"<task>/<metric>": value}."""
    from research.serving import Sampler

    config = suite.config
    common = dict(seq_len=suite.seq_len, batch_size=config.batch_size, mesh=mesh)
    results = {}
    for name, (docs, num_bytes) in suite.documents.items():
        metrics = evaluate_documents(
            graphdef, params, docs, num_bytes=num_bytes, stride=suite.stride, **common
        )
        results.update({f"{name}/{k}": float(v) for k, v in metrics.items()})
    for name, (items, spans) in suite.choice_tasks.items():
        metrics = evaluate_choices(graphdef, params, suite.tokenizer, items, spans=spans, **common)
        results.update({f"{name}/{k}": float(v) for k, v in metrics.items()})
    if suite.generation_tasks:
        key = (graphdef, id(mesh))
        if key not in suite.samplers:  # One compilation for all calls.
            suite.samplers[key] = Sampler(
                suite.model_config,
                graphdef,
                params,
                num_slots=config.num_slots,
                steps_per_call=min(config.max_new_tokens, 32),
                mesh=mesh,
            )
        sampler = suite.samplers[key]
        sampler.set_params(params)
        for name, items in suite.generation_tasks.items():
            metrics = evaluate_generation(
                sampler, suite.tokenizer, items, max_new_tokens=config.max_new_tokens
            )
            results.update({f"{name}/{k}": float(v) for k, v in metrics.items()})
    return results


def markdown_table(results: dict[str, float]) -> str:
    """A short Markdown table: one row per task, one column per metric."""
    rows: dict[str, dict] = {}
    for key, value in results.items():
        task, metric = key.split("/", 1)
        rows.setdefault(task, {})[metric] = value
    lines = ["| task | metric | value |", "|---|---|---|"]
    for task, metrics in rows.items():
        for metric, value in metrics.items():
            shown = (
                f"{value:,.0f}" if float(value).is_integer() and abs(value) >= 1 else f"{value:.4f}"
            )
            lines.append(f"| {task} | {metric} | {shown} |")
    return "\n".join(lines) + "\n"
