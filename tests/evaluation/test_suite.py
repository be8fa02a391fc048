"""Multiple-choice scoring against the full forward; generation tasks; the whole suite."""

import json
import math

import numpy as np
import pytest

from research.errors import UserError
from research.evaluation import (
    ChoiceItem,
    EvalConfig,
    GenerationItem,
    build_suite,
    evaluate_choices,
    evaluate_generation,
    markdown_table,
    run_suite,
)
from research.serving import SamplingParams, complete
from tests.evaluation.helpers import CharTokenizer
from tests.serving.helpers import LLAMA, full_logits, random_split

ITEMS = [
    ChoiceItem("the king", (" is", " was dead", " of"), 1),
    ChoiceItem("a rose", (" by any", " smells"), 0),
    ChoiceItem("", (" to be", " or not"), 1),
]


@pytest.fixture(scope="module")
def model():
    return random_split(LLAMA, seed=5, scale=0.5)


def test_choices_are_scored_by_the_full_forward_log_likelihood(model):
    graphdef, params = model
    tokenizer = CharTokenizer()
    raw = norm = greedy = 0
    for item in ITEMS:
        totals, all_argmax = [], []
        for choice in item.choices:
            context = [tokenizer.bos_id, *tokenizer.encode(item.context)]
            tokens = context + tokenizer.encode(choice)
            logits = full_logits(graphdef, params, np.asarray([tokens]))[0].astype(np.float64)
            log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            rows = range(len(context) - 1, len(tokens) - 1)
            totals.append(sum(log_probs[t, tokens[t + 1]] for t in rows))
            all_argmax.append(all(np.argmax(logits[t]) == tokens[t + 1] for t in rows))
        sizes = np.array([len(c.encode()) for c in item.choices])
        raw += np.argmax(totals) == item.answer
        norm += np.argmax(np.array(totals) / sizes) == item.answer
        greedy += all_argmax[item.answer]
    got = evaluate_choices(graphdef, params, tokenizer, ITEMS, seq_len=16, batch_size=2)
    assert got == pytest.approx(
        {"accuracy": raw / 3, "accuracy_norm": norm / 3, "greedy_accuracy": greedy / 3, "items": 3}
    )


def test_suite_runs_every_task_and_generation_scores_answers(model, tmp_path):
    graphdef, params = model
    (tmp_path / "a.txt").write_text("the king is dead, long live the king.\n" * 3)
    (tmp_path / "mc.jsonl").write_text(
        "\n".join(
            json.dumps({"context": i.context, "choices": i.choices, "answer": i.answer})
            for i in ITEMS
        )
    )
    (tmp_path / "qa.jsonl").write_text(json.dumps({"prompt": "the king", "answer": "zzz"}))
    config = EvalConfig(
        split="",
        text_files=(str(tmp_path / "*.txt"),),
        choice_tasks=(str(tmp_path / "mc.jsonl"),),
        generation_tasks=(str(tmp_path / "qa.jsonl"),),
        max_new_tokens=5,
        num_slots=2,
        seq_len=16,
        stride=8,
    )
    suite = build_suite(config, LLAMA, CharTokenizer())
    results = run_suite(suite, graphdef, params)
    assert set(results) >= {
        "text_files/loss", "text_files/bits_per_byte", "text_files/perplexity",
        "text_files/accuracy", "mc/accuracy", "mc/accuracy_norm", "qa/exact_match", "qa/f1",
    }  # fmt: skip
    assert all(math.isfinite(v) for v in results.values())
    assert results["qa/exact_match"] == 0.0 and results["text_files/documents"] == 1
    table = markdown_table(results)
    assert "| text_files | bits_per_byte |" in table and "| mc | accuracy |" in table
    # The greedy answer itself scores 1; a second run reuses the compiled sampler.
    (sampler,) = suite.samplers.values()
    request = SamplingParams(
        max_new_tokens=5, temperature=0.0, stop_token_ids=(2,), stop_strings=("\n",)
    )
    (completion,) = complete(
        sampler,
        [[1, *CharTokenizer().encode("the king")]],
        request,
        tokenizer=CharTokenizer(),
    )
    items = [GenerationItem("the king", (completion.text.strip(),)), GenerationItem("x", ("zzz",))]
    got = evaluate_generation(sampler, CharTokenizer(), items, max_new_tokens=5)
    assert got["exact_match"] == 0.5 and got["f1"] >= 0.5
    run_suite(suite, graphdef, params)
    assert len(suite.samplers) == 1


def test_config_errors_name_the_field():
    with pytest.raises(UserError, match="eval.stride"):
        EvalConfig(seq_len=8, stride=9)
    with pytest.raises(UserError, match="eval.batch_size"):
        EvalConfig(batch_size=0)
    with pytest.raises(UserError, match="eval.split"):
        build_suite(EvalConfig(), LLAMA, CharTokenizer(), data_dir=None)
    with pytest.raises(UserError, match="nothing to evaluate"):
        build_suite(EvalConfig(split="", cloze_items=0), LLAMA, CharTokenizer())
