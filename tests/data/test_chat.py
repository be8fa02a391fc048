"""Chat fine-tuning's data: conversations rendered by real templates, loss masks, the audit."""

import json

import numpy as np
import pytest
import tokenizers
from tokenizers import pre_tokenizers

from research.checkpoint import gguf
from research.data import default_corpus_documents, train_tokenizer
from research.data.chat import (
    ChatTemplate,
    audit,
    check_conversation,
    encode_conversation,
)
from research.data.tokenizer import Tokenizer
from research.errors import UserError
from tests.checkpoint.test_gguf import smollm2_path

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
]
# Meta's Llama 3 format, reduced to its turn structure.
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Llama 3's pre-tokenizer split: newlines stay together ("\n\n" is one piece), unlike GPT-2's.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    tokenizer, extra = gguf.tokenizer_from_gguf(gguf._reader(smollm2_path()), log=print)
    return tokenizer, extra["chat_template"]


@pytest.fixture(scope="module")
def cirrus_tokenizer():
    return train_tokenizer(default_corpus_documents()[:40], 400)


def _llama3_tokenizer(base: Tokenizer) -> Tokenizer:
    """A byte-level BPE with Llama 3's special tokens and pre-tokenizer split."""
    hf = tokenizers.Tokenizer.from_str(base.hf_tokenizer.to_str())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.add_special_tokens(LLAMA3_SPECIALS)
    return Tokenizer(hf, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def _masked_text(tokenizer, ids, loss) -> str:
    return tokenizer.hf_tokenizer.decode(ids[loss == 1].tolist(), skip_special_tokens=False)


def test_smollm2_chatml_masks_assistant_contents_and_their_end_of_turn(smollm2_tokenizer):
    tokenizer, source = smollm2_tokenizer
    template = ChatTemplate(tokenizer, source)
    ids, loss = encode_conversation(template, CONVERSATION)
    text = template.render(CONVERSATION, add_generation_prompt=False)
    assert tokenizer.hf_tokenizer.decode(ids.tolist(), skip_special_tokens=False) == text
    assert _masked_text(tokenizer, ids, loss) == "Hello! How can I help?<|im_end|>Blue.<|im_end|>"
    im_end = tokenizer.hf_tokenizer.token_to_id("<|im_end|>")
    assert int((ids[loss == 1] == im_end).sum()) == 2  # The model learns to stop.
    ids_last, loss_last = encode_conversation(template, CONVERSATION, mask="last")
    assert _masked_text(tokenizer, ids_last, loss_last) == "Blue.<|im_end|>"
    _, loss_all = encode_conversation(template, CONVERSATION, mask="all")
    assert loss_all.all()
    report = audit(template, CONVERSATION)
    assert report.ok and report.masked == int(loss.sum()), report.describe()
    # SmolLM2's template adds its own system turn when there is none; masks still hold.
    ids2, loss2 = encode_conversation(template, CONVERSATION[1:])
    assert "You are a helpful AI assistant" in tokenizer.hf_tokenizer.decode(ids2.tolist())
    assert _masked_text(tokenizer, ids2, loss2) == "Hello! How can I help?<|im_end|>Blue.<|im_end|>"


def test_llama3_style_audit_passes_with_its_special_tokens(cirrus_tokenizer):
    tokenizer = _llama3_tokenizer(cirrus_tokenizer)
    template = ChatTemplate(tokenizer, LLAMA3)
    ids, loss = encode_conversation(template, CONVERSATION)
    assert _masked_text(tokenizer, ids, loss) == "Hello! How can I help?<|eot_id|>Blue.<|eot_id|>"
    assert ids[0] == tokenizer.bos_id and (ids == tokenizer.bos_id).sum() == 1  # One bos.
    assert audit(template, CONVERSATION).ok


def test_audit_reports_where_whole_and_turn_by_turn_tokens_differ(
    smollm2_tokenizer, cirrus_tokenizer
):
    # Llama 3's markers are plain text to SmolLM2's BPE: '><' merges across a turn boundary.
    tokenizer, _ = smollm2_tokenizer
    report = audit(ChatTemplate(tokenizer, LLAMA3), CONVERSATION)
    assert not report.ok and report.position > 0
    assert "MISMATCH at token" in report.describe() and "('><')" in report.detail
    # With its special tokens but GPT-2's split, the header's "\n\n" is one token in the
    # prompt a server sends and "\n" + "\nHello" inside the whole conversation.
    hf = tokenizers.Tokenizer.from_str(cirrus_tokenizer.hf_tokenizer.to_str())
    hf.add_special_tokens(LLAMA3_SPECIALS)
    gpt2_split = Tokenizer(hf, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    report = audit(ChatTemplate(gpt2_split, LLAMA3), CONVERSATION)
    assert not report.ok and "('\\n\\n')" in report.detail, report.detail


def test_cirrus_default_template_audit_passes(cirrus_tokenizer):
    template = ChatTemplate(cirrus_tokenizer, None)
    ids, loss = encode_conversation(template, CONVERSATION)
    assert ids[0] == cirrus_tokenizer.bos_id
    assert _masked_text(cirrus_tokenizer, ids, loss) == (
        "Hello! How can I help?<|im_end|>Blue.<|im_end|>"
    )
    assert audit(template, CONVERSATION).ok


def test_a_template_that_rewrites_earlier_turns_is_refused(cirrus_tokenizer):
    # Renders every assistant turn but the last without its content (as reasoning templates
    # drop earlier thoughts): a turn's text is then not a prefix of the whole conversation.
    rewriting = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "{{ '<|im_start|>assistant\n<|im_end|>\n' }}{% else %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    template = ChatTemplate(cirrus_tokenizer, rewriting)
    with pytest.raises(ValueError, match="renders turn 2 differently"):
        encode_conversation(template, CONVERSATION)
    np.testing.assert_array_equal(encode_conversation(template, CONVERSATION, "all")[1], 1)


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([], "non-empty list"),
        ([{"role": "bot", "content": "x"}], "messages[0].role='bot'"),
        ([{"role": "user", "content": 3}], "messages[0].content must be a string"),
        ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ],
)
def test_bad_conversations_name_the_line_and_field(messages, fragment):
    with pytest.raises(UserError, match="chat.jsonl:7") as error:
        check_conversation(messages, "chat.jsonl:7")
    assert fragment in str(error.value)


def _chat_data(tmp_path, tokenizer, lines, **overrides):
    from research.data import DataConfig, prepare_data

    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save(str(tokenizer_dir))
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = DataConfig(
        format="chat", sources=(str(path),), tokenizer_path=str(tokenizer_dir),
        validation_fraction=0.2, test_fraction=0.0, num_shards=1, **overrides,
    )  # fmt: skip
    logs = []
    return prepare_data(config, str(tmp_path / "prepared"), log=logs.append), logs


def _dialogs(count):
    return [
        {"messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"It is {2 * i}."},
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": f"You are welcome, number {i}."},
        ]}
        for i in range(count)
    ]  # fmt: skip


@pytest.mark.parametrize("mask", ["assistant", "last"])
def test_prepared_chat_batches_weigh_only_the_masked_targets(cirrus_tokenizer, tmp_path, mask):
    from research.data import make_dataset

    prepared, logs = _chat_data(tmp_path, cirrus_tokenizer, _dialogs(10), chat_loss_mask=mask)
    assert any("template audit: 10 of 10 conversations ok" in line for line in logs), logs
    assert prepared.manifest["chat"]["loss_mask"] == mask
    template = ChatTemplate(cirrus_tokenizer, None)
    batch = next(iter(make_dataset(prepared.directory, "train", seq_len=256, batch_size=2)))
    decode = cirrus_tokenizer.hf_tokenizer.decode
    for row in range(2):
        segments = batch["segment_ids"][row]
        for segment in set(segments[segments > 0].tolist()):
            here = segments == segment
            targets = batch["targets"][row][here]
            weights = batch["weights"][row][here]
            inputs = batch["inputs"][row][here]
            assert inputs[0] == cirrus_tokenizer.bos_id  # The template's one bos, no second.
            text = decode(np.concatenate([inputs[:1], targets]).tolist(), skip_special_tokens=False)
            number = text.split("What is ")[1].split(" ")[0]
            messages = _dialogs(int(number) + 1)[int(number)]["messages"]
            _, expected = encode_conversation(template, messages, mask)
            np.testing.assert_array_equal(weights, expected[1:])
            learned = decode(targets[weights == 1].tolist(), skip_special_tokens=False)
            wanted = f"It is {2 * int(number)}.<|im_end|>" if mask == "assistant" else ""
            assert learned == wanted + f"You are welcome, number {number}.<|im_end|>"


def test_chat_data_errors_name_the_file_line_and_field(cirrus_tokenizer, tmp_path):
    bad = _dialogs(3)
    bad[1]["messages"][1]["role"] = "robot"
    with pytest.raises(UserError, match=r"chat.jsonl:2: messages\[1\].role='robot'"):
        _chat_data(tmp_path, cirrus_tokenizer, bad)
    from research.data import DataConfig, prepare_data

    with pytest.raises(UserError, match="data.tokenizer_path"):
        prepare_data(DataConfig(format="chat"), str(tmp_path / "x"), log=lambda _: None)
    with pytest.raises(UserError, match="data.chat_loss_mask='user'"):
        DataConfig(format="chat", chat_loss_mask="user")


def test_the_bundled_dialogs_are_conversations():
    from research.data.corpus import default_chat_conversations

    conversations = default_chat_conversations()
    assert len(conversations) > 1500
    for _, messages in conversations:
        check_conversation(messages, "chatterbot")
        assert [m["role"] for m in messages[:2]] == ["user", "assistant"]


def test_a_template_without_stable_turns_is_a_user_error_in_prepare(cirrus_tokenizer, tmp_path):
    broken = tokenizers.Tokenizer.from_str(cirrus_tokenizer.hf_tokenizer.to_str())
    tokenizer = Tokenizer(broken, bos_token="<|bos|>", eos_token="<|endoftext|>")
    directory = tmp_path / "tok"
    tokenizer.save(str(directory))
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = "{{ messages }}"  # Python's list repr: the closing ] moves.
    config_path.write_text(json.dumps(config))
    report = audit(ChatTemplate(tokenizer, "{{ messages }}"), CONVERSATION)
    assert not report.ok and "renders turn 2 differently" in report.detail
    from research.data import DataConfig, prepare_data

    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in _dialogs(6)))
    config = DataConfig(format="chat", sources=(str(path),), tokenizer_path=str(directory))
    with pytest.raises(UserError, match="data.chat_loss_mask = 'all'"):
        prepare_data(config, str(tmp_path / "p"), log=lambda _: None)
    everything = DataConfig(
        format="chat", sources=(str(path),), tokenizer_path=str(directory), chat_loss_mask="all"
    )
    assert prepare_data(everything, str(tmp_path / "q"), log=lambda _: None).manifest["loss_bits"]
