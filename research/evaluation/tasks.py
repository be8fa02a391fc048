"""Task files: multiple choice / cloze and generation items, read from JSONL or built from text.

Multiple choice, one JSON object per line:
  {"context": "The capital of France is", "choices": [" Paris", " Rome"], "answer": 0}
`answer` is the index of the right choice (or its exact text). Choices are scored as
continuations of the context, so give them their leading space.

Generation, one JSON object per line:
  {"prompt": "Q: Who wrote Hamlet?\\nA:", "answer": "Shakespeare"}
`answer` may be a list of acceptable answers.

A bad line raises UserError naming the file, the line number and the field.
"""

import dataclasses
import json
import os
import re

import numpy as np

from research.errors import UserError


@dataclasses.dataclass(frozen=True)
class ChoiceItem:
    context: str
    choices: tuple[str, ...]
    answer: int


@dataclasses.dataclass(frozen=True)
class GenerationItem:
    prompt: str
    answers: tuple[str, ...]


def _lines(path: str):
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise UserError(f"task file {path!r} does not exist; give a JSONL file.")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{number}: not valid JSON ({error}).") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{number}: expected a JSON object, got {line[:60]!r}.")
            yield number, record


def _field(path, number, record, name, kind, example):
    if name not in record:
        raise UserError(
            f"{path}:{number}: missing field {name!r}; each line needs it, e.g. {example}."
        )
    value = record[name]
    if not isinstance(value, kind):
        raise UserError(
            f"{path}:{number}: field {name!r} has the wrong type ({type(value).__name__}); "
            f"e.g. {example}."
        )
    return value


def read_choice_task(path: str) -> list[ChoiceItem]:
    """Multiple-choice items from a JSONL file (see the module docstring)."""
    example = '{"context": "...", "choices": [" a", " b"], "answer": 0}'
    items = []
    for number, record in _lines(path):
        context = _field(path, number, record, "context", str, example)
        choices = _field(path, number, record, "choices", list, example)
        answer = _field(path, number, record, "answer", (int, str), example)
        if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise UserError(f"{path}:{number}: field 'choices' needs at least 2 non-empty strings.")
        if isinstance(answer, str):
            if answer not in choices:
                raise UserError(f"{path}:{number}: field 'answer' {answer!r} is not a choice.")
            answer = choices.index(answer)
        if isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise UserError(
                f"{path}:{number}: field 'answer'={answer} must index 'choices' "
                f"(0 to {len(choices) - 1})."
            )
        items.append(ChoiceItem(context, tuple(choices), int(answer)))
    if not items:
        raise UserError(f"task file {path} has no items.")
    return items


def read_generation_task(path: str) -> list[GenerationItem]:
    """Generation items from a JSONL file (see the module docstring)."""
    example = '{"prompt": "...", "answer": "..."}'
    items = []
    for number, record in _lines(path):
        prompt = _field(path, number, record, "prompt", str, example)
        answer = _field(path, number, record, "answer", (str, list), example)
        answers = (answer,) if isinstance(answer, str) else tuple(answer)
        if not prompt or not answers or not all(isinstance(a, str) for a in answers):
            raise UserError(
                f"{path}:{number}: 'prompt' must be non-empty and 'answer' a string or a "
                "non-empty list of strings."
            )
        items.append(GenerationItem(prompt, answers))
    if not items:
        raise UserError(f"task file {path} has no items.")
    return items


_LAST_WORD = re.compile(r"(\s+)([A-Za-z][A-Za-z']*)[^A-Za-z']*$")


def cloze_task(
    texts: list[str],
    *,
    num_items: int = 200,
    num_choices: int = 4,
    min_words: int = 20,
    max_context_chars: int = 600,
    seed: int = 0,
) -> list[ChoiceItem]:
    """A LAMBADA-style task (Paperno et al. 2016) from held-out text: the last word of a
    paragraph, among distractors that end other paragraphs.

    Paragraphs are blank-line separated blocks of at least `min_words` words; about the
    last max_context_chars characters, from a word start, are kept as context. Choices carry
    the whitespace before the word; trailing punctuation is not scored. Deterministic for a
    seed.
    """
    rng = np.random.default_rng(seed)
    candidates = []
    for text in texts:
        for paragraph in re.split(r"\n\s*\n", text):
            paragraph = paragraph.strip()
            match = _LAST_WORD.search(paragraph)
            if match and len(paragraph.split()) >= min_words and len(match.group(2)) > 2:
                context = paragraph[: match.start()]
                if len(context) > max_context_chars:  # Keep whole words at the start.
                    context = context[-max_context_chars:].split(" ", 1)[-1]
                candidates.append((context, match.group(1), match.group(2)))
    words = sorted({word for _, _, word in candidates})
    if len(words) < num_choices:
        return []
    order = rng.permutation(len(candidates))[:num_items]
    items = []
    for index in sorted(order):
        context, space, word = candidates[index]
        pool = rng.choice(words, size=min(len(words), num_choices + 4), replace=False)
        distractors = [str(w) for w in pool if w.lower() != word.lower()][: num_choices - 1]
        if len(distractors) < num_choices - 1:
            continue
        answer = int(rng.integers(num_choices))
        choices = distractors[:answer] + [word] + distractors[answer:]
        items.append(ChoiceItem(context, tuple(space + c for c in choices), answer))
    return items
