"""A character tokenizer whose ids fit the tiny test models (V = 37)."""

import string

_CHARS = string.ascii_lowercase + " \n.,!?'ABCD"  # ids 3..36


class CharTokenizer:
    """pad 0, bos 1, eos 2, then one id per character of _CHARS (others map to '?')."""

    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = 3 + len(_CHARS)
    add_bos, add_eos = True, False

    def encode(self, text: str) -> list[int]:
        return [3 + (_CHARS.index(c) if c in _CHARS else _CHARS.index("?")) for c in text]

    def encode_prompt(self, text: str) -> list[int]:
        return [self.bos_id, *self.encode(text)]

    def document(self, text: str, *, append_eos: bool = True) -> list[int]:
        return [self.bos_id, *self.encode(text)] + ([self.eos_id] if append_eos else [])

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i < 3:
                out.append("" if skip_special_tokens else f"<{i}>")
            else:
                out.append(_CHARS[i - 3])
        return "".join(out)
