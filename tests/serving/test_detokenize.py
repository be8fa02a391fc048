"""Streaming text: no broken characters, exact stop strings, same text as one decode."""

import pytest

from research.data import train_tokenizer
from research.serving import IncrementalDetokenizer, StopStrings, TextStream

TEXTS = [
    "Où est la café? Voilà: 日本語のテキスト, emoji 🎭🌹 and plain words.",
    "The king is dead. Long live the king! Naïve façade, crème brûlée.",
] * 4
SAMPLE = "Voilà 🌹 the naïve king: 日本語 café 🎭! END here"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


def test_streamed_text_is_never_broken_and_equals_the_full_decode(tokenizer):
    ids = tokenizer.encode(SAMPLE)
    assert len(ids) > len(SAMPLE.split())  # multi-byte characters span several tokens
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids=[tokenizer.bos_id])
    pieces = [detokenizer.add(token) for token in ids] + [detokenizer.flush()]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == SAMPLE == tokenizer.decode(ids)


def test_prompt_context_is_not_emitted(tokenizer):
    prompt = tokenizer.encode("Long live")
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    text = "".join(detokenizer.add(t) for t in tokenizer.encode(" the king")) + detokenizer.flush()
    assert text == " the king"


def test_stop_strings_cut_exactly_and_hold_back_possible_starts():
    stops = StopStrings(["END", "\n\n"])
    assert stops.add("abc E") == "abc "  # "E" may start "END"
    assert stops.add("N") == ""
    assert stops.add("Dx") == "" and stops.stopped
    assert stops.flush() == ""
    stops = StopStrings(["END"])
    assert stops.add("ab EN") == "ab " and stops.add("d") == "ENd" and not stops.stopped
    assert stops.add("E") == "" and stops.flush() == "E"


def test_text_stream_stops_inside_a_token(tokenizer):
    stream = TextStream(tokenizer, [tokenizer.bos_id], stop_strings=("king: 日",))
    emitted = ""
    for token in tokenizer.encode(SAMPLE):
        emitted += stream.add(token)
        if stream.stopped:
            break
    assert stream.stopped
    assert emitted == stream.text == "Voilà 🌹 the naïve "
