"""The data configuration: one frozen dataclass (gin registers it as `data`)."""

import dataclasses
import hashlib
import json
import os

from research.data import scrub
from research.errors import UserError

# Bump when the prepared format changes, so that old caches are not reused.
FORMAT_VERSION = 3  # 2: manifest tokenizer.add_bos. 3: chat data (loss masks in records).
FORMATS = ("text", "chat")
NUM_SPECIAL_TOKENS = 3  # <|pad|>, <|bos|>, <|endoftext|>.
MIN_VOCAB_SIZE = 256 + NUM_SPECIAL_TOKENS  # Every byte plus the special tokens.
DATA_DIR_ENV = "CIRRUS_DATA_DIR"
DEFAULT_CACHE_ROOT = os.path.join("~", ".cache", "cirrus", "data")

# Fields that do not change what prepared data contains.
_NOT_IN_KEY = ("cache_dir",)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What text to read, how to clean, split and tokenize it, and where the result goes.

    sources: empty = the bundled Shakespeare corpus (one document per scene); otherwise
        directories (searched recursively for *.txt, *.md, *.jsonl), globs or files.
    text_field: the JSON field holding the text in *.jsonl files (one document per line).
    vocab_size: size of the byte-level BPE vocabulary to train (special tokens included).
    tokenizer_path: an existing tokenizer to load instead of training one: a directory with
        tokenizer.json, a tokenizer.json file, or a sentencepiece .model file.
    min_chars: cleaned documents shorter than this are dropped.
    validation_fraction, test_fraction: fractions of documents held out (split by document).
    split_seed: seed of the document split.
    num_shards: ArrayRecord files per split.
    cache_dir: root for prepared data; default $CIRRUS_DATA_DIR or ~/.cache/cirrus/data.
    format: "text" (documents), or "chat": conversations for chat fine-tuning, JSONL lines of
        {"messages": [{"role", "content"}, ...]} (empty sources: the English dialogs of the
        chatterbot-corpus package), rendered by the tokenizer's chat template (its
        tokenizer_config.json `chat_template`, else ChatML) and split by conversation. Needs
        tokenizer_path (launch.train --init_from sets it).
    chat_loss_mask: which tokens of a conversation are trained on: "assistant" (every
        assistant turn's content and end-of-turn token), "last" (the last assistant turn
        only) or "all".
    scrub_kinds: PII and secrets replaced by placeholders before the tokenizer is trained
        (research/data/scrub.py): any of "email" (<EMAIL>), "phone" (<PHONE>), "ip" (<IP>),
        "card" (<CARD>), "secret" (<SECRET>); all by default, () = no scrubbing. Chat data:
        every message's content.
    scrub_patterns: extra {name: Python regex}; each match becomes <NAME> (upper-cased),
        counted under `name` in the cleaning report. Applied before the built-in kinds.
    """

    sources: tuple[str, ...] = ()
    text_field: str = "text"
    vocab_size: int = 8192
    tokenizer_path: str = ""
    min_chars: int = 64
    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    split_seed: int = 0
    num_shards: int = 4
    cache_dir: str = ""
    format: str = "text"
    chat_loss_mask: str = "assistant"
    scrub_kinds: tuple[str, ...] = scrub.KINDS
    scrub_patterns: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        sources = self.sources
        if isinstance(sources, str):  # A single path bound as a string.
            sources = (sources,) if sources else ()
        if not isinstance(sources, (tuple, list)) or not all(
            isinstance(s, str) and s for s in sources
        ):
            raise UserError(
                f"data.sources={self.sources!r} must be a list of non-empty paths, globs or "
                "directories, e.g. data.sources = ['~/text/*.txt']; leave it empty for the "
                "bundled Shakespeare corpus."
            )
        object.__setattr__(self, "sources", tuple(sources))
        if not self.text_field:
            raise UserError(
                "data.text_field is empty; set it to the JSON field that holds the text of "
                "each line of your *.jsonl files, e.g. data.text_field = 'text'."
            )
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise UserError(
                f"data.vocab_size={self.vocab_size} is too small: a byte-level vocabulary needs "
                f"256 byte tokens plus {NUM_SPECIAL_TOKENS} special tokens; set "
                f"data.vocab_size >= {MIN_VOCAB_SIZE} (8192 is a good default)."
            )
        if self.min_chars < 0:
            raise UserError(
                f"data.min_chars={self.min_chars} is negative; set it to 0 to keep every "
                "non-empty document, or to the shortest document length worth training on."
            )
        for name in ("validation_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise UserError(
                    f"data.{name}={value} must be in [0, 1): it is the fraction of documents "
                    "held out, e.g. 0.05."
                )
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise UserError(
                f"data.validation_fraction + data.test_fraction = "
                f"{self.validation_fraction + self.test_fraction} leaves no training documents; "
                "make their sum smaller than 1 (e.g. 0.05 each)."
            )
        if self.format not in FORMATS:
            raise UserError(f"data.format={self.format!r} is not one of {FORMATS}.")
        if self.chat_loss_mask not in ("assistant", "last", "all"):
            raise UserError(
                f"data.chat_loss_mask={self.chat_loss_mask!r} is not one of 'assistant' (every "
                "assistant turn), 'last' (the last assistant turn) or 'all'."
            )
        kinds = (self.scrub_kinds,) if isinstance(self.scrub_kinds, str) else self.scrub_kinds
        unknown = [kind for kind in kinds if kind not in scrub.KINDS]
        if unknown or not isinstance(kinds, (tuple, list)):
            raise UserError(
                f"data.scrub_kinds={self.scrub_kinds!r} names unknown kinds {unknown}; choose "
                f"from {scrub.KINDS} (e.g. data.scrub_kinds = ('email', 'secret')), or set "
                "data.scrub_kinds = () to turn scrubbing off."
            )
        # In KINDS order: the same set is the same key.
        object.__setattr__(self, "scrub_kinds", tuple(k for k in scrub.KINDS if k in kinds))
        try:
            patterns = scrub.compile_patterns(self.scrub_patterns)
        except ValueError as error:
            raise UserError(str(error)) from None
        object.__setattr__(self, "scrub_patterns", patterns)
        if self.num_shards < 1:
            raise UserError(
                f"data.num_shards={self.num_shards} must be at least 1; use about one shard "
                "per 100 MB of tokens, and at least as many as data-loading hosts."
            )

    def key(self) -> str:
        """A short stable hash of every field that determines the prepared data."""
        fields = {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if field.name not in _NOT_IN_KEY
        }
        # The same relative path means different data from another working directory.
        fields["sources"] = [_absolute(source) for source in self.sources]
        fields["tokenizer_path"] = _absolute(self.tokenizer_path) if self.tokenizer_path else ""
        fields["format_version"] = FORMAT_VERSION
        if self.scrub_kinds or self.scrub_patterns:
            fields["scrub_version"] = scrub.VERSION  # Changed patterns change the data.
        else:  # Unscrubbed data keys as it did before scrubbing existed: old caches stay valid.
            del fields["scrub_kinds"], fields["scrub_patterns"]
        text = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def scrubber(self) -> scrub.Scrubber | None:
        """The data.scrub_* settings as a Scrubber; None when nothing is to be scrubbed."""
        scrubber = scrub.Scrubber(self.scrub_kinds, self.scrub_patterns)
        return scrubber if scrubber.active else None

    def cache_root(self) -> str:
        """The directory under which prepared data lives as `<cache_root>/<key>/`."""
        root = self.cache_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_CACHE_ROOT
        return os.path.abspath(os.path.expanduser(root))

    def prepared_dir(self) -> str:
        """`<cache_root>/<key>`: where `ensure_prepared` keeps this config's data."""
        return os.path.join(self.cache_root(), self.key())


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))
