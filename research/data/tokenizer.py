"""The tokenizer: byte-level BPE trained locally, or loaded (HF tokenizer.json, sentencepiece).

A thin wrapper over `tokenizers.Tokenizer` that knows its special ids. `save` writes a
Hugging Face directory (tokenizer.json, tokenizer_config.json, special_tokens_map.json) that
`tokenizers.Tokenizer.from_file` and `transformers.AutoTokenizer.from_pretrained` load.
"""

import json
import os

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from research.data import sentencepiece_model
from research.errors import UserError

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)  # Ids 0, 1, 2 in a trained tokenizer.

# Special-token spellings of well-known tokenizers, used when no tokenizer_config.json says.
_BOS_CANDIDATES = (BOS_TOKEN, "<s>", "<|begin_of_text|>", "<bos>", "[CLS]")
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]")
_PAD_CANDIDATES = (PAD_TOKEN, "<pad>", "[PAD]", "<|finetune_right_pad_id|>")
_CONFIG_FILE = "tokenizer_config.json"
_SPECIAL_MAP_FILE = "special_tokens_map.json"
_TOKENIZER_FILE = "tokenizer.json"
_SENTENCEPIECE_FILE = "tokenizer.model"


class Tokenizer:
    """Text <-> token ids. `encode` adds no special tokens; `encode_prompt` adds the ones the
    tokenizer itself adds (its convention, see `add_bos`).

    Text that spells a special token ("<|endoftext|>") is encoded as ordinary text here;
    a plain `tokenizers.Tokenizer.from_file` of the saved directory maps it to the special id.

    The convention is the tokenizer's post-processor (tokenizer.json), the one transformers
    (v5) and vLLM apply: `add_bos` is whether it puts bos first (Cirrus-trained tokenizers
    do; SmolLM2's, Qwen's and GPT-2's do not). A GGUF file's tokenizer.ggml.add_bos_token
    becomes that post-processor on import (research/checkpoint/gguf.py).

    Args:
      hf_tokenizer: the `tokenizers.Tokenizer`.
      bos_token, eos_token, pad_token: special token strings.
    """

    def __init__(
        self,
        hf_tokenizer: tokenizers.Tokenizer,
        *,
        bos_token: str,
        eos_token: str,
        pad_token: str | None = None,
    ):
        self._tokenizer = hf_tokenizer
        # Text that happens to spell a special token ("<|endoftext|>") is encoded as text,
        # so that documents cannot inject control tokens and decode(encode(x)) == x.
        self._tokenizer.encode_special_tokens = True
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        for name, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token)):
            if token is not None and hf_tokenizer.token_to_id(token) is None:
                raise ValueError(f"{name} token {token!r} is not in the vocabulary.")
        with_special = hf_tokenizer.encode("a", add_special_tokens=True).ids
        plain = hf_tokenizer.encode("a", add_special_tokens=False).ids
        added = len(with_special) > len(plain)
        self.add_bos = added and with_special[0] == self.bos_id
        self.add_eos = added and with_special[-1] == self.eos_id

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        """The pad id (0 for trained tokenizers; 0 too where a loaded one has no pad token)."""
        return 0 if self.pad_token is None else self._tokenizer.token_to_id(self.pad_token)

    @property
    def bos_id(self) -> int:
        return self._tokenizer.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self._tokenizer.token_to_id(self.eos_token)

    @property
    def hf_tokenizer(self) -> tokenizers.Tokenizer:
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt as the tokenizer's own users get them (transformers'
        `tokenizer(text)`, vLLM, llama.cpp): its post-processor's special tokens, bos first
        only where the tokenizer adds it (Cirrus-trained tokenizers do; SmolLM2's does not)."""
        return self._tokenizer.encode(text, add_special_tokens=True).ids

    def document(self, text: str, *, append_eos: bool = True) -> list[int]:
        """A whole document as training and evaluation see it: bos where the tokenizer adds
        it, the text, eos (unless append_eos=False)."""
        ids = ([self.bos_id] if self.add_bos else []) + self.encode(text)
        return ids + [self.eos_id] if append_eos else ids

    def encode_batch(self, texts) -> list[list[int]]:
        """`encode` over many texts, in parallel (Rust threads)."""
        encodings = self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids` ([L] ints); bos/eos/pad are dropped unless skip_special_tokens=False."""
        return self._tokenizer.decode(
            [int(i) for i in ids], skip_special_tokens=skip_special_tokens
        )

    def save(self, directory: str, *, model_max_length: int = 2048) -> str:
        """Writes a Hugging Face tokenizer directory; returns `directory`."""
        os.makedirs(directory, exist_ok=True)
        self._tokenizer.save(os.path.join(directory, _TOKENIZER_FILE))
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        if self.pad_token is not None:
            special["pad_token"] = self.pad_token
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": False,
        }
        for name, content in ((_CONFIG_FILE, config), (_SPECIAL_MAP_FILE, special)):
            with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
                json.dump(content, f, indent=2)
        return directory

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        """Loads a directory (tokenizer.json or tokenizer.model), a tokenizer.json file, or a
        sentencepiece .model file (converted to an equivalent Hugging Face tokenizer)."""
        path = os.path.expanduser(path)
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        if os.path.isdir(path):
            if os.path.isfile(os.path.join(path, _TOKENIZER_FILE)):
                path = os.path.join(path, _TOKENIZER_FILE)
            elif os.path.isfile(os.path.join(path, _SENTENCEPIECE_FILE)):
                path = os.path.join(path, _SENTENCEPIECE_FILE)
            else:
                raise UserError(
                    f"data.tokenizer_path={path!r} is a directory without {_TOKENIZER_FILE} or "
                    f"{_SENTENCEPIECE_FILE}; point it at a Hugging Face tokenizer directory, a "
                    "tokenizer.json, or a sentencepiece .model file (or leave it empty to train "
                    "one)."
                )
        if not os.path.isfile(path):
            raise UserError(
                f"data.tokenizer_path={path!r} does not exist; give an existing tokenizer "
                "directory, tokenizer.json or sentencepiece .model file, or leave it empty to "
                "train a tokenizer on the corpus."
            )
        if path.endswith(".model"):
            hf_tokenizer, special = sentencepiece_model.to_hf_tokenizer(path)
        else:
            try:
                hf_tokenizer = tokenizers.Tokenizer.from_file(path)
            except Exception as e:
                raise UserError(
                    f"data.tokenizer_path={path!r} is not a loadable tokenizer.json ({e}); "
                    "give a file written by Hugging Face tokenizers, or a sentencepiece .model."
                ) from None
            special = _special_tokens_from_config(directory)
        return cls(hf_tokenizer, **_resolve_special_tokens(hf_tokenizer, special, path))


def train_tokenizer(texts, vocab_size: int) -> Tokenizer:
    """Trains a byte-level BPE tokenizer (GPT-2 style pre-tokenization) on `texts`.

    Ids 0, 1, 2 are <|pad|>, <|bos|>, <|endoftext|>; then the 256 byte tokens; then merges
    up to `vocab_size` (fewer if the texts are too small to learn that many).
    """
    hf_tokenizer = tokenizers.Tokenizer(models.BPE())
    hf_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf_tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    texts = list(texts)
    hf_tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = hf_tokenizer.token_to_id(BOS_TOKEN)
    # Models see bos first (see pipeline.py); Hugging Face users get the same by default.
    hf_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return Tokenizer(hf_tokenizer, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)


def _special_tokens_from_config(directory: str) -> dict:
    """bos/eos/pad token strings from tokenizer_config.json / special_tokens_map.json."""
    special = {}
    for name in (_SPECIAL_MAP_FILE, _CONFIG_FILE):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
        for key in ("bos_token", "eos_token", "pad_token"):
            value = content.get(key)
            if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
                value = value.get("content")
            if isinstance(value, str) and key not in special:
                special[key] = value
    return special


def _resolve_special_tokens(hf_tokenizer, special: dict, path: str) -> dict:
    """Fills missing bos/eos/pad from well-known spellings; bos falls back to eos (GPT-2)."""
    vocab = hf_tokenizer.get_vocab(with_added_tokens=True)

    def pick(key, candidates):
        token = special.get(key)
        if token in vocab:
            return token
        return next((c for c in candidates if c in vocab), None)

    eos = pick("eos_token", _EOS_CANDIDATES)
    if eos is None:
        raise UserError(
            f"data.tokenizer_path={path!r}: cannot tell the end-of-text token (looked for "
            f"{', '.join(_EOS_CANDIDATES)}); add a tokenizer_config.json with an eos_token next "
            "to the tokenizer, or leave data.tokenizer_path empty to train one."
        )
    bos = pick("bos_token", _BOS_CANDIDATES) or eos
    return {"bos_token": bos, "eos_token": eos, "pad_token": pick("pad_token", _PAD_CANDIDATES)}


def read_chat_template(tokenizer_dir: str | None) -> str | None:
    """The `chat_template` of `tokenizer_dir/tokenizer_config.json`, or None.

    A list of named templates (Hugging Face's multi-template form) gives the one named
    "default".
    """
    if not tokenizer_dir:
        return None
    path = os.path.join(tokenizer_dir, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        template = json.load(f).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None
