"""Token ids -> text as they arrive: never a broken character, stop strings cut exactly.

Byte-level BPE splits multi-byte characters across tokens, so decoding one token at a time
gives U+FFFD halves. `IncrementalDetokenizer` (the vLLM / TGI scheme) decodes a short window
of recent tokens and emits only the new suffix, holding it back while it ends in U+FFFD.
`StopStrings` holds back any tail that could still grow into a stop string, so text already
handed out never has to be taken back. `TextStream` is the two together, per request.
"""

_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT = 5  # Prompt tokens decoded along with the first new ones (leading spaces).


class IncrementalDetokenizer:
    """Text deltas of a growing token sequence.

    Args:
      tokenizer: research.data.Tokenizer (anything with decode(ids, skip_special_tokens)).
      prompt_ids: the prompt; its last tokens give context (sentencepiece drops a leading
        space of a text's first token), its text is not emitted.
      skip_special_tokens: drop bos/eos/pad from the text.
    """

    def __init__(self, tokenizer, prompt_ids=(), *, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids = [int(i) for i in list(prompt_ids)[-_PROMPT_CONTEXT:]]
        self._prefix_offset = 0  # Start of the decoding window.
        self._read_offset = len(self._ids)  # Tokens before this are already emitted.

    def _decode(self, ids) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def add(self, token: int) -> str:
        """Appends a token; returns the text it completes ('' while a character is partial)."""
        self._ids.append(int(token))
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back (a truncated character shows as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) <= len(before) or (text.endswith(_REPLACEMENT) and not final):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text[len(before) :]


class StopStrings:
    """Finds the first stop string in streamed text and holds back possible starts of one."""

    def __init__(self, stop_strings=()):
        self._stops = tuple(s for s in stop_strings if s)
        self._pending = ""
        self.stopped = False

    def add(self, text: str) -> str:
        """Returns the text that is final now; after a stop, nothing more."""
        if self.stopped:
            return ""
        self._pending += text
        if not self._stops:
            text, self._pending = self._pending, ""
            return text
        found = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if found:
            self.stopped = True
            text, self._pending = self._pending[: min(found)], ""
            return text
        hold = self._held_length()
        text = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(self._pending) - hold :]
        return text

    def flush(self) -> str:
        text, self._pending = ("" if self.stopped else self._pending), ""
        return text

    def _held_length(self) -> int:
        """The longest tail of the pending text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:size]):
                    longest = size
                    break
        return longest


class TextStream:
    """A request's output text: incremental detokenization, then stop strings.

    `add(token)` returns the newly final text; `stopped` turns True when a stop string
    appears (the text ends before it); `finish()` flushes the rest; `text` is all of it.
    """

    def __init__(self, tokenizer, prompt_ids=(), stop_strings=(), *, skip_special_tokens=True):
        self._detokenizer = IncrementalDetokenizer(
            tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens
        )
        self._stops = StopStrings(stop_strings)
        self.text = ""

    @property
    def stopped(self) -> bool:
        return self._stops.stopped

    def add(self, token: int) -> str:
        return self._append(self._stops.add(self._detokenizer.add(token)))

    def finish(self) -> str:
        return self._append(self._stops.add(self._detokenizer.flush()) + self._stops.flush())

    def _append(self, text: str) -> str:
        self.text += text
        return text
