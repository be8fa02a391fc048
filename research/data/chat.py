"""Chat messages -> text and tokens, through the model's Jinja chat template: the server's
prompts and chat fine-tuning's training examples (with their loss masks) alike.

The template comes from the tokenizer's `tokenizer_config.json` (`chat_template`, as Hugging
Face writes it; GGUF imports carry `tokenizer.chat_template` there too) and is rendered the way
`transformers.apply_chat_template` does: a sandboxed, immutable Jinja environment with
`trim_blocks` / `lstrip_blocks`, the variables `messages`, `add_generation_prompt=True`,
`bos_token`, `eos_token`, and the helpers `raise_exception(message)` and `strftime_now(format)`.

A model without a template gets DEFAULT_TEMPLATE, ChatML (the format of Qwen, SmolLM2 and
many others), after the bos token where the tokenizer puts bos first (Cirrus tokenizers do):

    <bos><|im_start|>system\\nYou are terse.<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n
    <|im_start|>assistant\\n

The rendered text is tokenized with special tokens recognized (`<|im_start|>` becomes its one
id where the vocabulary has it) and without automatically added bos/eos: the template places
them, as with `apply_chat_template(tokenize=True)`.

Training (`encode_conversation`): a whole conversation is rendered without a generation
prompt and tokenized once; a token is in the loss according to the mask ("assistant": the
content and end-of-turn token of every assistant turn, "last": of the last one only, "all":
every token). Assistant spans are found by rendering the prefixes: the span of turn i runs
from the end of render(messages[:i], add_generation_prompt=True) to the end of turn i's
end-of-turn marker in render(messages[:i + 1]). `audit` checks what this relies on.
"""

import dataclasses
import datetime
import json

import jinja2
import numpy as np
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from research.data.tokenizer import read_chat_template  # noqa: F401 - re-exported
from research.errors import UserError

DEFAULT_TEMPLATE = (
    "{% if add_bos %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Tokens that end an assistant turn in common templates: generation stops at them too.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(format_string):
    return datetime.datetime.now().strftime(format_string)


class ChatTemplate:
    """Renders and tokenizes chat messages for one tokenizer.

    Args:
      tokenizer: research.data.Tokenizer.
      template: Jinja source; None = DEFAULT_TEMPLATE.
    """

    def __init__(self, tokenizer, template: str | None = None):
        self.source = template or DEFAULT_TEMPLATE
        self.is_default = template is None
        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        environment.filters["tojson"] = lambda x, indent=None, **_: json.dumps(
            x, ensure_ascii=False, indent=indent
        )
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = _strftime_now
        try:
            self._template = environment.from_string(self.source)
        except jinja2.exceptions.TemplateSyntaxError as error:
            raise UserError(
                f"the chat template does not parse ({error}); fix `chat_template` in the "
                "tokenizer's tokenizer_config.json or leave it out for the default ChatML."
            ) from None
        self._tokenizer = tokenizer
        # A second tokenizer that maps special-token text to its id: the Cirrus Tokenizer
        # encodes "<|im_start|>" as plain text on purpose (documents must not inject control
        # tokens), but a chat template writes control tokens deliberately.
        self._special_aware = tokenizers.Tokenizer.from_str(tokenizer.hf_tokenizer.to_str())
        self._special_aware.encode_special_tokens = False
        vocab = tokenizer.hf_tokenizer.get_vocab(with_added_tokens=True)
        self.stop_token_ids = tuple(
            sorted({tokenizer.eos_id} | {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab})
        )

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The text of `messages` ([{"role", "content"}]), ending in the assistant's turn
        header when add_generation_prompt (a prompt), else after the last message (training).

        Raises ValueError with the template's own message (e.g. roles must alternate).
        """
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._tokenizer.bos_token,
                eos_token=self._tokenizer.eos_token,
                add_bos=getattr(self._tokenizer, "add_bos", True),
            )
        except jinja2.exceptions.TemplateError as error:
            raise ValueError(f"the chat template rejected the messages: {error}") from None

    def encode(self, messages: list[dict]) -> list[int]:
        """Token ids of the rendered prompt (special tokens recognized, none added)."""
        text = self.render(messages)
        return self._special_aware.encode(text, add_special_tokens=False).ids

    def tokenize(self, text: str):
        """(ids, character offsets) of template text, special tokens recognized."""
        encoding = self._special_aware.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    @property
    def tokenizer(self):
        """The research.data.Tokenizer the template tokenizes with."""
        return self._tokenizer

    @property
    def end_of_turn_texts(self) -> tuple[str, ...]:
        """Texts that close an assistant turn: the known markers and the eos token."""
        return (*END_OF_TURN_TOKENS, self._tokenizer.eos_token)

    @property
    def control_texts(self) -> tuple[str, ...]:
        """Texts only the template may write: bos, eos, turn markers and the vocabulary's
        special tokens. A message holding one gets a second bos or end-of-turn (these are
        tokenized as control tokens here) or a turn boundary the data never meant."""
        hf = self._tokenizer.hf_tokenizer
        specials = [t.content for t in hf.get_added_tokens_decoder().values() if t.special]
        texts = {self._tokenizer.bos_token, *self.end_of_turn_texts, "<|im_start|>", *specials}
        return tuple(sorted(t for t in texts if t))


MASKS = ("assistant", "last", "all")
ROLES = ("system", "user", "assistant", "tool")


def check_conversation(messages, where: str) -> list[dict]:
    """The conversation as [{"role", "content"}], or a UserError naming `where` and the field."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}}.")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise UserError(f"{where}: messages[{i}] is not an object with role and content.")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise UserError(f"{where}: messages[{i}].role={role!r} is not one of {ROLES}.")
        if not isinstance(content, str):
            raise UserError(f"{where}: messages[{i}].content must be a string.")
        checked.append({**message, "role": role, "content": content})
    if not any(m["role"] == "assistant" for m in checked):
        raise UserError(f"{where}: the conversation has no assistant turn to learn from.")
    return checked


def assistant_spans(template: ChatTemplate, messages: list[dict], text: str) -> list:
    """[(start, end)] character spans of each assistant turn in `text` (the whole rendered
    conversation): its content and end-of-turn marker, not the header before it."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = template.render(messages[:i], add_generation_prompt=True)
        through = template.render(messages[: i + 1], add_generation_prompt=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError(
                f"the chat template renders turn {i} differently once later turns follow "
                "(its text is not a prefix of the whole conversation's), so the assistant "
                "turns cannot be located; train on every token (data.chat_loss_mask = 'all') "
                "or use a tokenizer whose chat_template renders earlier turns unchanged."
            )
        start, end = len(before), len(through)
        span = text[start:end]
        closing = [
            span.rfind(marker) + len(marker)
            for marker in template.end_of_turn_texts
            if marker and span.rfind(marker) >= 0
        ]
        spans.append((start, start + max(closing) if closing else end))
    return spans


def encode_conversation(template: ChatTemplate, messages: list[dict], mask: str = "assistant"):
    """(ids int32 [L], loss int8 [L]): the rendered conversation's tokens and whether each is
    a target in the loss (1) or context only (0)."""
    if mask not in MASKS:
        raise UserError(f"data.chat_loss_mask={mask!r} is not one of {MASKS}.")
    text = template.render(messages, add_generation_prompt=False)
    ids, offsets = template.tokenize(text)
    ids = np.asarray(ids, np.int32)
    if mask == "all":
        return ids, np.ones(len(ids), np.int8)
    spans = assistant_spans(template, messages, text)
    if mask == "last":
        spans = spans[-1:]
    starts = np.asarray([start for start, _ in offsets], np.int64)
    loss = np.zeros(len(ids), np.int8)
    for start, end in spans:
        loss[(starts >= start) & (starts < end)] = 1
    return ids, loss


@dataclasses.dataclass
class Audit:
    """The template audit of one conversation: does tokenizing the whole rendered text give
    the tokens of its pieces (each turn's header and content) tokenized one by one, and do
    the masked tokens equal the assistant contents' own tokens?"""

    ok: bool
    tokens: int
    masked: int
    position: int = -1  # The first token that differs, if any.
    detail: str = ""

    def describe(self) -> str:
        if self.ok:
            return f"template audit: ok ({self.tokens} tokens, {self.masked} in the loss)"
        return f"template audit: MISMATCH at token {self.position}: {self.detail}"


def audit(template: ChatTemplate, messages: list[dict], mask: str = "assistant") -> Audit:
    """Renders `messages` whole and turn by turn and compares the tokens (see Audit)."""
    text = template.render(messages, add_generation_prompt=False)
    try:
        whole, loss = encode_conversation(template, messages, mask)
    except ValueError as error:  # Turns that render differently once later turns follow.
        return Audit(False, 0, 0, 0, str(error))
    pieces, masked_pieces, previous = [], [], ""
    for i, message in enumerate(messages):
        through = template.render(messages[: i + 1], add_generation_prompt=False)
        if message["role"] == "assistant":
            header = template.render(messages[:i], add_generation_prompt=True)
            pieces += [header[len(previous) :], through[len(header) :]]
            if mask == "assistant" or (mask == "last" and i == _last_assistant(messages)):
                masked_pieces.append(through[len(header) :])
        else:
            pieces.append(through[len(previous) :])
        previous = through
    pieces.append(text[len(previous) :])  # Anything the template adds after the last turn.
    decode = template._tokenizer.hf_tokenizer.decode
    one_by_one = [t for piece in pieces if piece for t in template.tokenize(piece)[0]]
    problem = _first_difference(whole.tolist(), one_by_one, decode)
    if problem is None and mask != "all":
        # Each assistant content with its end-of-turn marker, as encode_conversation masks it.
        spans = [_trim(template, piece) for piece in masked_pieces]
        expected = [t for piece in spans if piece for t in template.tokenize(piece)[0]]
        problem = _first_difference(whole[loss == 1].tolist(), expected, decode, "masked token")
    if problem is None:
        return Audit(ok=True, tokens=len(whole), masked=int(loss.sum()))
    position, detail = problem
    return Audit(False, len(whole), int(loss.sum()), position, detail)


def _last_assistant(messages) -> int:
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def _trim(template, piece: str) -> str:
    closing = [
        piece.rfind(m) + len(m) for m in template.end_of_turn_texts if m and piece.rfind(m) >= 0
    ]
    return piece[: max(closing)] if closing else piece


def _first_difference(got: list, expected: list, decode, what: str = "token"):
    """(position, message) of the first difference between two token lists, or None."""
    for position, (a, b) in enumerate(zip(got, expected, strict=False)):
        if a != b:
            return position, (
                f"whole-text {what} {a} ({decode([a])!r}) vs turn-by-turn {b} ({decode([b])!r})"
            )
    if len(got) != len(expected):
        return min(len(got), len(expected)), (
            f"the whole text has {len(got)} {what}s, turn by turn {len(expected)}"
        )
    return None
