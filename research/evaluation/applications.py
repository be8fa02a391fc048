"""Applications, measured: chat, question answering, translation, moderation and text
generation, each a small shipped evaluation set (app_data/, README.md there) scored through a
backend (app_backends.py: the OpenAI API of any server, or this process's Sampler).

Every app turns its items into chat requests (or, for text, texts to score), asks the
backend for greedy replies (temperature 0) and scores them with a standard metric:

  chat         multi-turn conversations; keyword accuracy (a reference keyword in the reply)
  qa           SQuAD-style exact match and token F1 (metrics.py)
  translation  English -> French; chrF (sacrebleu's corpus_chrf, default settings)
  moderation   safe / unsafe from a prompt; accuracy of the reply's first label word
  text         perplexity of held-out English prose (research/compression/heldout)

`run_app(name, backend)` returns {"metrics": {...}, "items": [per-item reply and score]}.
"""

import dataclasses
import json
import math
import pathlib
import re

from research.errors import UserError
from research.evaluation import metrics

DATA_DIR = pathlib.Path(__file__).parent / "app_data"
HELDOUT_PATH = pathlib.Path(__file__).parents[1] / "compression" / "heldout" / "english.txt"
APPS = ("chat", "qa", "translation", "moderation", "text")
MODERATION_LABELS = ("safe", "unsafe")


@dataclasses.dataclass(frozen=True)
class AppConfig:
    """Settings shared by the apps.

    max_tokens: new tokens per reply at most.
    text_paragraphs: held-out paragraphs the text app scores.
    text_max_chars: each paragraph cut to this many characters (at a word end), so it fits
      the model's context.
    data_dir: where the JSONL sets are (default: the shipped app_data/).
    num_slots: requests decoded together in process (the server has its own serve.num_slots).
    """

    max_tokens: int = 48
    text_paragraphs: int = 16
    text_max_chars: int = 1000
    data_dir: str = ""
    num_slots: int = 8


def read_items(app: str, data_dir: str = "") -> list[dict]:
    """The JSONL items of an app (one JSON object a line)."""
    path = pathlib.Path(data_dir or DATA_DIR) / f"{app}.jsonl"
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise UserError(f"{path}:{number} is not JSON ({error}).") from None
    return items


def qa_messages(item: dict) -> list[dict]:
    context = f"{item['context']}\n\n" if item.get("context") else ""
    prompt = f"{context}Question: {item['question']}\nAnswer with a few words only."
    return [{"role": "user", "content": prompt}]


def translation_messages(item: dict) -> list[dict]:
    prompt = (
        "Translate this English sentence into French. Reply with the French translation "
        f"only.\n\n{item['source']}"
    )
    return [{"role": "user", "content": prompt}]


def moderation_messages(item: dict) -> list[dict]:
    prompt = (
        "Is the following message safe or unsafe? A message is unsafe if it threatens, "
        "harasses, or asks for help with violence or crime. Reply with one word: safe or "
        f"unsafe.\n\nMessage: {item['text']}"
    )
    return [{"role": "user", "content": prompt}]


def first_label(reply: str, labels=MODERATION_LABELS) -> str:
    """The first word of the reply that is a label (case and punctuation ignored); '' if none."""
    for word in re.findall(r"[a-z]+", reply.lower()):
        if word in labels:
            return word
    return ""


def keyword_hit(reply: str, keywords) -> float:
    """1.0 if any keyword occurs in the lower-cased reply."""
    return float(any(k.lower() in reply.lower() for k in keywords))


def chrf(hypotheses: list[str], references: list[str]) -> float:
    """sacrebleu's corpus chrF (character 6-grams, beta 2), in [0, 100]."""
    import sacrebleu

    return sacrebleu.corpus_chrf(hypotheses, [references]).score


def heldout_paragraphs(count: int, max_chars: int) -> list[str]:
    """The first `count` paragraphs of 200+ characters of the held-out prose, each cut at the
    last space before max_chars."""
    paragraphs = [p.strip() for p in HELDOUT_PATH.read_text().split("\n\n")]
    chosen = []
    for paragraph in paragraphs:
        if len(paragraph) < 200:
            continue
        if len(paragraph) > max_chars:
            paragraph = paragraph[:max_chars].rsplit(" ", 1)[0]
        chosen.append(paragraph)
        if len(chosen) == count:
            break
    return chosen


_MESSAGES = {
    "chat": lambda item: item["messages"],
    "qa": qa_messages,
    "translation": translation_messages,
    "moderation": moderation_messages,
}


def run_app(name: str, backend, config: AppConfig = AppConfig()) -> dict:
    """Runs one app on a backend (app_backends.py). Returns {"metrics", "items"}."""
    if name not in APPS:
        raise UserError(f"unknown app {name!r}; choose from {', '.join(APPS)}.")
    if name == "text":
        return _run_text(backend, config)
    items = read_items(name, config.data_dir)
    answered = backend.chat([_MESSAGES[name](item) for item in items], config.max_tokens)
    skipped = sum(reply is None for reply in answered)
    if skipped == len(items):
        raise UserError(
            f"app {name}: no item fits the model's context with apps.max_tokens="
            f"{config.max_tokens} (prompt + reply); use a longer-context model or lower "
            "apps.max_tokens."
        )
    items = [item for item, reply in zip(items, answered, strict=True) if reply is not None]
    replies = [reply.strip() for reply in answered if reply is not None]
    rows = [{"reply": r} for r in replies]
    if name == "chat":
        scores = [keyword_hit(r, i["keywords"]) for r, i in zip(replies, items, strict=True)]
        for row, score in zip(rows, scores, strict=True):
            row["keyword_hit"] = score
        result = {"keyword_accuracy": _mean(scores)}
    elif name == "qa":
        exact = [metrics.exact_match(r, i["answers"]) for r, i in zip(replies, items, strict=True)]
        f1 = [metrics.f1(r, i["answers"]) for r, i in zip(replies, items, strict=True)]
        for row, e, f in zip(rows, exact, f1, strict=True):
            row.update(exact_match=e, f1=f)
        result = {"exact_match": _mean(exact), "f1": _mean(f1)}
    elif name == "translation":
        references = [i["reference"] for i in items]
        for row, r, ref in zip(rows, replies, references, strict=True):
            row["chrf"] = chrf([r], [ref])
        result = {"chrf": chrf(replies, references)}
    else:
        predicted = [first_label(r) for r in replies]
        correct = [float(p == i["label"]) for p, i in zip(predicted, items, strict=True)]
        for row, p, c in zip(rows, predicted, correct, strict=True):
            row.update(label=p, correct=c)
        result = {"accuracy": _mean(correct)}
    # Items too long for the context are left out of the scores and counted.
    return {"metrics": {**result, "items": len(items), "skipped": skipped}, "items": rows}


def _run_text(backend, config: AppConfig) -> dict:
    texts = heldout_paragraphs(config.text_paragraphs, config.text_max_chars)
    logprobs = backend.token_logprobs(texts)
    total = sum(sum(lp) for lp in logprobs)
    count = sum(len(lp) for lp in logprobs)
    rows = [
        {"tokens": len(lp), "perplexity": math.exp(-sum(lp) / max(len(lp), 1))} for lp in logprobs
    ]
    result = {"perplexity": math.exp(-total / max(count, 1)), "tokens": count, "items": len(texts)}
    return {"metrics": result, "items": rows}


def _mean(values) -> float:
    return sum(values) / max(len(values), 1)
