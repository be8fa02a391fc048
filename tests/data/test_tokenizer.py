"""Tokenizer: training, exact round trips, Hugging Face save/load, sentencepiece conversion."""

import json
import struct

import pytest
import tokenizers

from research.data import Tokenizer, train_tokenizer
from research.errors import UserError

TEXTS = [
    "If music be the food of love, play on; give me excess of it.",
    "O, it came o'er my ear like the sweet sound that breathes upon a bank of violets.",
    "Naïve café owners say “déjà vu” — 日本語のテキスト and emoji 🎭🎉 too.",
    "tabs\tand\nnew lines\n\n  and double  spaces  ",
] * 5
UNICODE_TEXT = "Ünïcödé → 東京 🎭 ‘quotes’\ttab\r\n  two  spaces, <|endoftext|> literal"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


def test_special_ids_and_vocab(tokenizer):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert 259 < tokenizer.vocab_size <= 300
    assert tokenizer.decode([tokenizer.bos_id, tokenizer.eos_id]) == ""


def test_round_trip_is_exact_for_unseen_unicode(tokenizer):
    ids = tokenizer.encode(UNICODE_TEXT)
    assert tokenizer.decode(ids) == UNICODE_TEXT
    # Text spelling a special token is plain text, never the eos id.
    assert tokenizer.eos_id not in ids and tokenizer.bos_id not in ids
    assert tokenizer.encode_batch([UNICODE_TEXT, "play on"]) == [ids, tokenizer.encode("play on")]


def test_merges_shorten_training_text(tokenizer):
    text = TEXTS[0]
    assert len(tokenizer.encode(text)) < len(text.encode("utf-8")) * 0.8


def test_save_writes_hugging_face_directory(tokenizer, tmp_path):
    directory = tokenizer.save(str(tmp_path / "tok"), model_max_length=512)
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["model_max_length"] == 512
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<|bos|>",
        "<|endoftext|>",
        "<|pad|>",
    )
    special = json.loads((tmp_path / "tok" / "special_tokens_map.json").read_text())
    assert special["eos_token"] == "<|endoftext|>"

    hf = tokenizers.Tokenizer.from_file(f"{directory}/tokenizer.json")
    for text in TEXTS[:4]:
        assert hf.encode(text, add_special_tokens=False).ids == tokenizer.encode(text)
        # Hugging Face users get bos first by default, as the model saw in training.
        assert hf.encode(text).ids == [tokenizer.bos_id] + tokenizer.encode(text)
        assert hf.decode(tokenizer.encode(text)) == text

    for path in (directory, f"{directory}/tokenizer.json"):
        loaded = Tokenizer.load(path)
        assert loaded.encode(UNICODE_TEXT) == tokenizer.encode(UNICODE_TEXT)
        assert (loaded.pad_id, loaded.bos_id, loaded.eos_id) == (0, 1, 2)
        assert loaded.vocab_size == tokenizer.vocab_size


def test_load_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="data.tokenizer_path.*does not exist"):
        Tokenizer.load(str(tmp_path / "nope.json"))
    with pytest.raises(UserError, match="without tokenizer.json"):
        Tokenizer.load(str(tmp_path))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="not a loadable tokenizer.json"):
        Tokenizer.load(str(tmp_path / "bad.json"))


# A sentencepiece ModelProto written by hand (the wire format of sentencepiece_model.proto).
def _varint(value):
    out = b""
    while True:
        byte, value = value & 0x7F, value >> 7
        out += bytes([byte | (0x80 if value else 0)])
        if not value:
            return out


def _field(number, value):
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    return _varint(number << 3 | 2) + _varint(len(value)) + value


NORMAL, UNKNOWN, CONTROL = 1, 2, 3
PIECES = [
    ("<unk>", 0.0, UNKNOWN),
    ("<s>", 0.0, CONTROL),
    ("</s>", 0.0, CONTROL),
    ("▁", -2.0, NORMAL),
    ("a", -3.0, NORMAL),
    ("b", -3.0, NORMAL),
    ("▁a", -1.0, NORMAL),
    ("ab", -1.5, NORMAL),
    ("▁ab", -0.5, NORMAL),
]


def _write_model(path, model_type):
    pieces = b"".join(
        _field(1, _field(1, p.encode()) + _field(2, s) + _field(3, t)) for p, s, t in PIECES
    )
    trainer = _field(2, _field(3, model_type) + _field(4, len(PIECES)))
    normalizer = _field(3, _field(1, b"identity") + _field(3, 1) + _field(4, 1))
    path.write_bytes(pieces + trainer + normalizer)
    return str(path)


@pytest.mark.parametrize("model_type", [1, 2], ids=["unigram", "bpe"])
def test_sentencepiece_model_is_converted(tmp_path, model_type):
    tokenizer = Tokenizer.load(_write_model(tmp_path / "spm.model", model_type))
    assert tokenizer.vocab_size == len(PIECES)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    ids = tokenizer.encode("ab a")
    assert ids == [8, 6]  # ▁ab ▁a
    assert tokenizer.decode(ids) == "ab a"
    assert tokenizer.decode([1] + ids + [2]) == "ab a"
    tokenizer.save(str(tmp_path / "converted"))
    assert Tokenizer.load(str(tmp_path / "converted")).encode("ab a") == ids


def test_corrupt_sentencepiece_model_is_a_user_error(tmp_path):
    (tmp_path / "bad.model").write_bytes(b"\x0a\xff\xff\xff")
    with pytest.raises(UserError, match="not a valid sentencepiece model"):
        Tokenizer.load(str(tmp_path / "bad.model"))
