"""POST /tokenize, POST /detokenize, GET /tokenizer_info: vLLM's tokenizer endpoints.

lm-evaluation-harness's `local-completions` model finds them (its default
tokenizer_backend "auto", or "remote") and then tokenizes through the server, so it needs
no tokenizer files of its own: it counts context tokens with /tokenize, sends token ids to
/v1/completions, and takes its document-boundary token from /tokenizer_info's bos / eos.

Text is read as transformers' `tokenizer(text)` and vLLM read it: a special token's
spelling ("<|endoftext|>") is that token (lm-eval finds eos_token_id as the first id of
/tokenize(eos_token)). Text prompts to /v1/completions differ on purpose: there such a
spelling is plain text (research/data/tokenizer.py), so a document cannot inject control
tokens. `add_special_tokens` (default true, as vLLM) adds what the tokenizer's
post-processor adds: bos first for Cirrus-trained tokenizers, nothing for SmolLM2's.
"""

import tokenizers

from research.errors import RequestError
from research.serving.http import protocol
from research.serving.http.protocol import DetokenizeRequest, TokenizeRequest


class TokenizerEndpoints:
    """The three endpoints over the served model's tokenizer (see the module docstring).

    Args:
      tokenizer: research.data.Tokenizer of the served model.
      model_name: the served model's id (`model`, when given, must be it).
      max_len: the served context length (max_model_len).
      chat_template: the Jinja source the server renders chats with.
    """

    def __init__(self, tokenizer, *, model_name: str, max_len: int, chat_template: str):
        self.tokenizer, self.model_name = tokenizer, model_name
        self.max_len, self.chat_template = max_len, chat_template
        # A copy that maps special-token text to its id (the Cirrus Tokenizer's own does not).
        self._special_aware = tokenizers.Tokenizer.from_str(tokenizer.hf_tokenizer.to_str())
        self._special_aware.encode_special_tokens = False

    def tokenize(self, body: TokenizeRequest) -> dict:
        protocol.check_model(body.model, self.model_name)
        ids = self._special_aware.encode(
            body.prompt, add_special_tokens=body.add_special_tokens
        ).ids
        return {
            "count": len(ids),
            "max_model_len": self.max_len,
            "tokens": ids,
            # The vocabulary's strings (vLLM's token_strs: "Ġking" for " king").
            "token_strs": (
                [self._special_aware.id_to_token(i) for i in ids]
                if body.return_token_strs
                else None
            ),
        }

    def detokenize(self, body: DetokenizeRequest) -> dict:
        """The text of `tokens`, special tokens spelled out (vLLM's answer)."""
        protocol.check_model(body.model, self.model_name)
        vocab = self.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise RequestError(
                "tokens", None, f"has token ids outside [0, {vocab}) (the model's vocabulary)"
            )
        return {"prompt": self.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    def info(self) -> dict:
        """The tokenizer_config.json fields a client needs (vLLM's /tokenizer_info)."""
        tokenizer = self.tokenizer
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
            "add_bos_token": tokenizer.add_bos,
            "add_eos_token": tokenizer.add_eos,
            "model_max_length": self.max_len,
            "chat_template": self.chat_template,
        }
