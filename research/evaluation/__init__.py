"""Evaluation: loss / perplexity / bits per byte of text, multiple choice, generation tasks.

suite.py            EvalConfig, build_suite + run_suite (launch.eval and the training loop)
perplexity.py       sliding-window loss, perplexity, bits per byte, next-token accuracy
multiple_choice.py  log-likelihood scoring of choices (raw and byte-normalized accuracy)
generation.py       greedy answers scored by exact match and F1 (metrics.py)
memorization.py     training-split windows: greedy continuation vs the true suffix
tasks.py            JSONL task readers and the LAMBADA-style cloze task from held-out text
scoring.py          packed, jitted log-probabilities of target tokens
applications.py     chat, QA, translation, moderation, text: shipped sets (app_data/), metrics
app_backends.py     the apps' backends: an OpenAI-compatible server, or the model in process
"""

from research.evaluation.app_backends import InProcessBackend, OpenAIBackend
from research.evaluation.applications import APPS, AppConfig, run_app
from research.evaluation.generation import evaluate_generation
from research.evaluation.memorization import evaluate_memorization, training_snippets
from research.evaluation.metrics import exact_match, f1, normalize_answer
from research.evaluation.multiple_choice import choice_spans, evaluate_choices
from research.evaluation.perplexity import (
    document_tokens,
    evaluate_documents,
    evaluate_texts,
    windows,
)
from research.evaluation.scoring import Span, SpanScores, score_spans
from research.evaluation.suite import EvalConfig, EvalSuite, build_suite, markdown_table, run_suite
from research.evaluation.tasks import (
    ChoiceItem,
    GenerationItem,
    cloze_task,
    read_choice_task,
    read_generation_task,
)

__all__ = [
    "APPS",
    "AppConfig",
    "InProcessBackend",
    "OpenAIBackend",
    "run_app",
    "ChoiceItem",
    "EvalConfig",
    "EvalSuite",
    "GenerationItem",
    "Span",
    "SpanScores",
    "build_suite",
    "choice_spans",
    "cloze_task",
    "document_tokens",
    "evaluate_choices",
    "evaluate_documents",
    "evaluate_generation",
    "evaluate_memorization",
    "evaluate_texts",
    "exact_match",
    "f1",
    "markdown_table",
    "normalize_answer",
    "read_choice_task",
    "read_generation_task",
    "run_suite",
    "score_spans",
    "training_snippets",
    "windows",
]
