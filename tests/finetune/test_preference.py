"""DPO's data: preference JSONL read with file:line errors, pairs tokenized through real chat
templates against the usual bugs (duplicated bos / end-of-turn, a repeated system prompt,
prompt tokens that differ between chosen and rejected or leak into the loss)."""

import json

import numpy as np
import pytest

from research.checkpoint import gguf
from research.data.chat import ChatTemplate
from research.errors import UserError
from research.finetune import encode_pairs, pair_batch, read_preferences
from research.finetune.preference import Preference
from tests.checkpoint.test_gguf import smollm2_path
from tests.data.test_chat import LLAMA3, _llama3_tokenizer

SYSTEM = {"role": "system", "content": "You are terse."}
USER = {"role": "user", "content": "What is the capital of France?"}
CHOSEN = "Paris."
REJECTED = "Seriously? It is Paris, look it up."


@pytest.fixture(scope="module")
def smollm2():
    tokenizer, extra = gguf.tokenizer_from_gguf(gguf._reader(smollm2_path()), log=print)
    return ChatTemplate(tokenizer, extra["chat_template"])


@pytest.fixture(scope="module")
def llama3():
    from research.data import default_corpus_documents, train_tokenizer

    return ChatTemplate(
        _llama3_tokenizer(train_tokenizer(default_corpus_documents()[:40], 400)), LLAMA3
    )


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _ids(template, text: str) -> int:
    return template.tokenizer.hf_tokenizer.token_to_id(text)


def _count(row, sequence) -> int:
    """Occurrences of the token sequence `sequence` in `row`."""
    n = len(sequence)
    return sum(row[i : i + n].tolist() == sequence for i in range(len(row) - n + 1))


def test_smollm2_rows_share_the_prompt_which_stays_outside_the_loss(smollm2, tmp_path):
    path = _write(
        tmp_path / "p.jsonl",
        [{"prompt": [SYSTEM, USER], "chosen": [{"role": "assistant", "content": CHOSEN}],
          "rejected": [{"role": "assistant", "content": REJECTED}]}],
    )  # fmt: skip
    pairs, report = encode_pairs(smollm2, read_preferences([path]), seq_len=96)
    assert report.kept == 1 and report.mismatched == 0, report.describe()
    prompt_len = int(pairs.prompt_lengths[0])
    prompt = smollm2.encode([SYSTEM, USER])  # The server's prompt, generation header included.
    decode = smollm2.tokenizer.hf_tokenizer.decode
    im_start, im_end = _ids(smollm2, "<|im_start|>"), _ids(smollm2, "<|im_end|>")
    batch = pair_batch(pairs, [0])
    for row, text in enumerate((CHOSEN, REJECTED)):
        tokens = pairs.tokens[0, row, : pairs.lengths[0, row]]
        assert tokens[:prompt_len].tolist() == prompt
        # The loss covers the response and its end-of-turn, nothing of the prompt.
        mask = batch["loss_mask"][0, row]
        targets = batch["targets"][0, row][mask == 1]
        assert decode(targets.tolist(), skip_special_tokens=False) == text + "<|im_end|>"
        assert mask[: prompt_len - 1].sum() == 0 and mask.sum() == len(tokens) - prompt_len
        # One end-of-turn per response, last; the given system prompt once (SmolLM2's
        # template adds its own only when there is none).
        response = tokens[prompt_len:]
        assert (response == im_end).sum() == 1 and response[-1] == im_end
        system = smollm2.tokenize("<|im_start|>system")[0]
        assert _count(tokens, system) == 1 and (tokens == im_start).sum() == 3
        assert "helpful AI assistant" not in decode(tokens.tolist())
    assert pairs.tokens[0, 0, :prompt_len].tolist() == pairs.tokens[0, 1, :prompt_len].tolist()


def test_trl_forms_give_the_same_tokens_and_one_system_prompt(smollm2, tmp_path):
    assistant = {"role": "assistant"}
    forms = [
        {"prompt": [SYSTEM, USER], "chosen": [{**assistant, "content": CHOSEN}],
         "rejected": [{**assistant, "content": REJECTED}]},
        # TRL's implicit prompt: whole conversations, equal up to the response.
        {"chosen": [SYSTEM, USER, {**assistant, "content": CHOSEN}],
         "rejected": [SYSTEM, USER, {**assistant, "content": REJECTED}]},
        # A prompt given AND repeated inside each response: rendered once.
        {"prompt": [SYSTEM, USER], "chosen": [SYSTEM, USER, {**assistant, "content": CHOSEN}],
         "rejected": [SYSTEM, USER, {**assistant, "content": REJECTED}]},
    ]  # fmt: skip
    pairs, report = encode_pairs(
        smollm2, read_preferences([_write(tmp_path / "p.jsonl", forms)]), seq_len=96
    )
    assert report.kept == 3
    for index in (1, 2):
        np.testing.assert_array_equal(pairs.tokens[index], pairs.tokens[0])
    text = smollm2.tokenizer.hf_tokenizer.decode(pairs.tokens[2, 0].tolist())
    assert text.count("You are terse.") == 1 and text.count("capital of France") == 1
    # Text prompt and responses: one user message, assistant contents.
    plain = _write(tmp_path / "q.jsonl", [{"prompt": USER["content"], "chosen": CHOSEN,
                                           "rejected": REJECTED}])  # fmt: skip
    (preference,) = read_preferences([plain])
    assert preference.prompt == [USER] and preference.chosen["content"] == CHOSEN


def test_llama3_rows_hold_one_bos_and_one_end_of_turn(llama3):
    preference = Preference("x:1", [SYSTEM, USER], {"role": "assistant", "content": CHOSEN},
                            {"role": "assistant", "content": REJECTED})  # fmt: skip
    pairs, report = encode_pairs(llama3, [preference], seq_len=200)
    assert report.kept == 1
    bos, eot = llama3.tokenizer.bos_id, _ids(llama3, "<|eot_id|>")
    for row in range(2):
        tokens = pairs.tokens[0, row, : pairs.lengths[0, row]]
        assert tokens[0] == bos and (tokens == bos).sum() == 1
        response = tokens[pairs.prompt_lengths[0] :]
        assert (response == eot).sum() == 1 and response[-1] == eot


def test_control_tokens_in_the_data_are_refused_naming_the_field(smollm2, llama3, tmp_path):
    eos_in_data = [{"prompt": "Capital of France?", "chosen": "Paris.<|im_end|>", "rejected": "?"}]
    with pytest.raises(UserError, match=r'p\.jsonl:1: "chosen" contains \'<\|im_end\|>\''):
        encode_pairs(smollm2, read_preferences([_write(tmp_path / "p.jsonl", eos_in_data)]),
                     seq_len=96)  # fmt: skip
    bos_in_data = Preference("q.jsonl:3", [{"role": "user", "content": "<|begin_of_text|>Hi"}],
                             {"role": "assistant", "content": "Hello."},
                             {"role": "assistant", "content": "Go away."})  # fmt: skip
    with pytest.raises(UserError, match='q.jsonl:3: "prompt message 0" contains'):
        encode_pairs(llama3, [bos_in_data], seq_len=96)


def test_long_prompts_are_cut_from_the_left_and_unfit_pairs_dropped(llama3):
    def pair(prompt, chosen, rejected="Go away."):
        return Preference("x:1", [{"role": "user", "content": prompt}],
                          {"role": "assistant", "content": chosen},
                          {"role": "assistant", "content": rejected})  # fmt: skip

    long_prompt = " ".join(f"word{i}" for i in range(60)) + " END"
    preferences = [
        pair(long_prompt, "Fine."),
        pair("Hi", " ".join(["very long answer"] * 40)),  # The response does not fit.
        pair("Hi", "Same.", "Same."),  # Nothing to prefer.
    ]
    pairs, report = encode_pairs(llama3, preferences, seq_len=48, min_prompt_tokens=8)
    assert (report.kept, report.truncated, report.too_long, report.identical) == (1, 1, 1, 1)
    tokens = pairs.tokens[0, 0, : pairs.lengths[0, 0]]
    assert pairs.lengths.max() <= 48 and tokens[0] == llama3.tokenizer.bos_id
    kept_prompt = llama3.tokenizer.hf_tokenizer.decode(
        tokens[1 : pairs.prompt_lengths[0]].tolist(), skip_special_tokens=False
    )  # The end of the prompt stays, after the bos: its last words and the assistant header.
    assert kept_prompt.endswith(" END<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "word0 " not in kept_prompt and "<|begin_of_text|>" not in kept_prompt


@pytest.mark.parametrize(
    "line, fragment",
    [
        ('{"prompt": "a", "chosen": "b"', "p.jsonl:2 is not valid JSON"),
        ('{"prompt": "a", "chosen": "b"}', 'p.jsonl:2 has no "rejected" field'),
        ('{"prompt": "a", "chosen": 3, "rejected": "c"}', 'p.jsonl:2: "chosen" must be'),
        ('{"chosen": "b", "rejected": "c"}', 'p.jsonl:2 has no "prompt" field'),
        ('{"prompt": "a", "chosen": [{"role": "user", "content": "b"}], "rejected": "c"}',
         'p.jsonl:2: "chosen" must be one assistant message'),
    ],
)  # fmt: skip
def test_bad_lines_name_file_line_and_field(tmp_path, line, fragment):
    good = json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"})
    (tmp_path / "p.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(UserError, match=fragment.replace("(", r"\(")):
        read_preferences([str(tmp_path / "p.jsonl")])
    with pytest.raises(UserError, match="dpo.data entry"):
        read_preferences([str(tmp_path / "missing.jsonl")])
