"""Multiple-choice / cloze scoring by the log-likelihood of each choice as a continuation.

accuracy: the choice with the highest total log-probability is the answer.
accuracy_norm: the same with log-probability per UTF-8 byte of the choice (lm-eval-harness's
  acc_norm, byte-normalized): long choices are not penalized for their length.
greedy_accuracy: every token of the right choice is the model's argmax (LAMBADA's metric).
Contexts too long for the window lose tokens from the left.
"""

import numpy as np

from research.evaluation.scoring import Span, score_spans
from research.evaluation.tasks import ChoiceItem


def choice_spans(tokenizer, items: list[ChoiceItem], seq_len: int) -> list[Span]:
    """One span per (item, choice): the context as a prompt (bos where the tokenizer adds
    it) + choice, scoring the choice's tokens."""
    spans = []
    for item in items:
        # As lm-evaluation-harness: an empty context is the document boundary token alone.
        context = tokenizer.document(item.context, append_eos=False) or [tokenizer.bos_id]
        for choice in item.choices:
            continuation = tokenizer.encode(choice)[:seq_len]
            tokens = (context + continuation)[-(seq_len + 1) :]
            spans.append(Span(np.asarray(tokens, np.int32), len(tokens) - 1 - len(continuation)))
    return spans


def evaluate_choices(
    graphdef,
    params,
    tokenizer,
    items: list[ChoiceItem],
    *,
    seq_len: int,
    batch_size: int = 8,
    mesh=None,
    spans: list[Span] | None = None,
) -> dict:
    """{"accuracy", "accuracy_norm", "greedy_accuracy", "items"} over the items.

    `spans` (from `choice_spans`) may be passed to skip tokenizing again.
    """
    spans = choice_spans(tokenizer, items, seq_len) if spans is None else spans
    scores = iter(
        score_spans(graphdef, params, spans, seq_len=seq_len, batch_size=batch_size, mesh=mesh)
    )
    raw = norm = greedy = 0
    for item in items:
        item_scores = [next(scores) for _ in item.choices]
        totals = np.array([s.logprobs.sum() for s in item_scores])
        sizes = np.array([max(len(c.encode("utf-8")), 1) for c in item.choices])
        raw += int(np.argmax(totals) == item.answer)
        norm += int(np.argmax(totals / sizes) == item.answer)
        greedy += int(item_scores[item.answer].correct.all())
    count = max(len(items), 1)
    return {
        "accuracy": raw / count,
        "accuracy_norm": norm / count,
        "greedy_accuracy": greedy / count,
        "items": len(items),
    }
