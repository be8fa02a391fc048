"""Answer metrics of generation tasks: SQuAD's exact match and token F1 (Rajpurkar et al. 2016)."""

import collections
import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the SQuAD v1.1 script)."""
    text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers) -> float:
    """1.0 if the normalized prediction equals any normalized answer."""
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def f1(prediction: str, answers) -> float:
    """The best token-overlap F1 of the prediction against the answers."""
    predicted = normalize_answer(prediction).split()
    best = 0.0
    for answer in answers:
        reference = normalize_answer(answer).split()
        if not predicted or not reference:
            best = max(best, float(predicted == reference))
            continue
        common = sum((collections.Counter(predicted) & collections.Counter(reference)).values())
        if common:
            precision, recall = common / len(predicted), common / len(reference)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best
