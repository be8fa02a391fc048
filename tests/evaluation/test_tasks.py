"""Task files: clear errors with line numbers; the cloze task; answer metrics."""

import json

import pytest

from research.errors import UserError
from research.evaluation import (
    cloze_task,
    exact_match,
    f1,
    read_choice_task,
    read_generation_task,
)


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines))
    return str(path)


def test_choice_task_reads_index_and_text_answers(tmp_path):
    path = _write(
        tmp_path,
        "mc.jsonl",
        [
            {"context": "a", "choices": [" b", " c"], "answer": 1},
            "",
            {"context": "d", "choices": [" e", " f", " g"], "answer": " e"},
        ],
    )
    items = read_choice_task(path)
    assert [(i.choices, i.answer) for i in items] == [((" b", " c"), 1), ((" e", " f", " g"), 0)]


@pytest.mark.parametrize(
    "record, fragment",
    [
        ({"choices": [" a", " b"], "answer": 0}, ":2: missing field 'context'"),
        ({"context": "x", "answer": 0}, ":2: missing field 'choices'"),
        ({"context": "x", "choices": [" a", " b"]}, ":2: missing field 'answer'"),
        ({"context": "x", "choices": [" a"], "answer": 0}, "at least 2"),
        ({"context": "x", "choices": [" a", " b"], "answer": 2}, "'answer'=2 must index"),
        ({"context": "x", "choices": [" a", " b"], "answer": " z"}, "is not a choice"),
        ({"context": 3, "choices": [" a", " b"], "answer": 0}, "'context' has the wrong type"),
        ("{not json", ":2: not valid JSON"),
    ],
)
def test_choice_task_errors_name_line_and_field(tmp_path, record, fragment):
    good = {"context": "x", "choices": [" a", " b"], "answer": 0}
    path = _write(tmp_path, "mc.jsonl", [good, record])
    with pytest.raises(UserError, match=fragment):
        read_choice_task(path)


def test_generation_task_errors_and_answers(tmp_path):
    items = read_generation_task(
        _write(tmp_path, "g.jsonl", [{"prompt": "p", "answer": ["x", "y"]}])
    )
    assert items[0].answers == ("x", "y")
    with pytest.raises(UserError, match=":1: missing field 'answer'"):
        read_generation_task(_write(tmp_path, "g.jsonl", [{"prompt": "p"}]))
    with pytest.raises(UserError, match=":1: missing field 'prompt'"):
        read_generation_task(_write(tmp_path, "g.jsonl", [{"answer": "p"}]))
    with pytest.raises(UserError, match="does not exist"):
        read_generation_task(str(tmp_path / "missing.jsonl"))


def test_cloze_task_hides_the_last_word_among_distractors():
    words = ["king", "queen", "crown", "sword", "rose", "moon", "night", "storm", "heart", "grave"]
    texts = [
        "\n\n".join(
            f"SPEAKER {i}\n" + " ".join(words[(i + j) % 10] for j in range(25)) + f" {word}s."
            for i, word in enumerate(words)
        )
    ]
    items = cloze_task(texts, num_items=5, num_choices=4, seed=1)
    assert len(items) == 5
    for item in items:
        assert len(set(item.choices)) == 4 and all(c.startswith(" ") for c in item.choices)
        answer = item.choices[item.answer].strip()
        paragraph = next(p for p in texts[0].split("\n\n") if p.endswith(answer + "."))
        assert paragraph.startswith(item.context) or paragraph.endswith(
            item.context + " " + answer + "."
        )
    assert cloze_task(texts, num_items=5, seed=1) == items


def test_exact_match_and_f1():
    assert exact_match("The Tempest!", ["tempest"]) == 1.0
    assert exact_match("Tempest storm", ["tempest"]) == 0.0
    assert f1("the king of Denmark", ["king Denmark Hamlet"]) == pytest.approx(2 / 3)
    assert f1("", [""]) == 1.0 and f1("x", ["y", "x"]) == 1.0
