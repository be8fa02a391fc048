"""Chat messages -> prompt text, through the model's Jinja chat template.

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
"""

import datetime
import json

import jinja2
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

    def render(self, messages: list[dict]) -> str:
        """The prompt text of `messages` ([{"role", "content"}]) ending in the assistant's turn.

        Raises ValueError with the template's own message (e.g. roles must alternate).
        """
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=True,
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
