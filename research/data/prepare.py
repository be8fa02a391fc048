"""Raw text -> a prepared data directory: clean, split by document, tokenize, write shards.

A prepared directory holds:
  tokenizer/                              Hugging Face tokenizer (trained on train only)
  <split>-0000i-of-0000N.array_record     token ids per document, eos appended (shards.py)
  <split>.lengths.npy                     tokens per document
  validation.jsonl, test.jsonl            cleaned raw text, {"text": ...} per line
  manifest.json                           counts and config; written LAST

It is built in a temporary sibling directory and renamed into place, so a directory
without manifest.json is never a finished one. `ensure_prepared(config)` caches the result
under `<cache_root>/<config.key()>/`.
"""

import dataclasses
import datetime
import functools
import json
import os
import shutil
import tempfile

import numpy as np

from research.data import scrub, shards
from research.data.clean import clean_documents
from research.data.config import FORMAT_VERSION, DataConfig
from research.data.corpus import default_corpus_documents, read_documents
from research.data.tokenizer import Tokenizer, train_tokenizer
from research.errors import UserError

SPLITS = ("train", "validation", "test")
TEXT_SPLITS = ("validation", "test")  # Evaluation needs their raw text (bytes per token).
MANIFEST_FILE = "manifest.json"
TOKENIZER_DIR = "tokenizer"
LOGS_DIR = "logs"  # launch.prepare_data's library log (launch/cli.py), kept across a publish.
_ENCODE_CHUNK = 2048  # Documents per encode_batch call (one progress line each).
_NOT_OURS = (
    "{out_dir} exists, holds other files and is not prepared data; choose a new or empty "
    "output directory for the prepared data."
)


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """A finished prepared-data directory and its manifest (see the module docstring)."""

    directory: str
    manifest: dict

    @property
    def tokenizer_dir(self) -> str:
        return os.path.join(self.directory, self.manifest["tokenizer"]["directory"])

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.tokenizer_dir)

    def split_files(self, split: str) -> list[str]:
        return [os.path.join(self.directory, name) for name in self._split(split)["files"]]

    def num_documents(self, split: str) -> int:
        return self._split(split)["documents"]

    def num_tokens(self, split: str) -> int:
        return self._split(split)["tokens"]

    def text_path(self, split: str) -> str:
        """The `<split>.jsonl` file with the cleaned raw text (validation and test only)."""
        name = self._split(split)["text_file"]
        if not name:
            raise ValueError(f"split {split!r} has no raw text file; only {TEXT_SPLITS} do.")
        return os.path.join(self.directory, name)

    def _split(self, split: str) -> dict:
        if split not in self.manifest["splits"]:
            raise UserError(
                f"split {split!r} is not in the prepared data at {self.directory}; use one of "
                f"{sorted(self.manifest['splits'])}."
            )
        return self.manifest["splits"][split]


def load_prepared(directory: str) -> PreparedData:
    """The prepared data in `directory`; UserError if it is missing or unfinished."""
    directory = os.path.abspath(os.path.expanduser(directory))
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise UserError(
            f"{directory} is not prepared data (no {MANIFEST_FILE}; an interrupted run leaves "
            "none). Prepare it with `python -m launch.prepare_data --gin_file=configs/data/"
            "shakespeare.gin --workdir=DIR`, or let training prepare it from the data.* config."
        )
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{directory} was prepared in format {manifest.get('format_version')}, but this code "
            f"reads format {FORMAT_VERSION}; delete the directory and prepare the data again."
        )
    return PreparedData(directory=directory, manifest=manifest)


def ensure_prepared(config: DataConfig, *, log=print) -> PreparedData:
    """Prepared data for `config` from the cache (`config.prepared_dir()`), built if missing."""
    return prepare_data(config, None, log=log)


def prepare_data(config: DataConfig, out_dir: str | None = None, *, log=print) -> PreparedData:
    """Reads, cleans, splits, tokenizes and writes the data for `config` into `out_dir`.

    Returns the existing data without recomputing if `out_dir` already holds a finished
    preparation of the same config. `out_dir` defaults to `config.prepared_dir()`.
    """
    out_dir = os.path.abspath(os.path.expanduser(out_dir)) if out_dir else config.prepared_dir()
    existing = _finished(out_dir, config)
    if existing is not None:
        log(f"data: using prepared data in {out_dir}")
        return existing

    log(f"data: preparing {out_dir}")
    if config.format == "chat":
        return _prepare_chat(config, out_dir, log)
    if config.sources:
        documents = read_documents(config.sources, config.text_field)
        log(f"data: read {len(documents)} documents from {len(config.sources)} source(s)")
    else:
        documents = default_corpus_documents()
        log(f"data: read {len(documents)} scenes of the bundled Shakespeare corpus")
    cleaned, report = clean_documents(documents, config.min_chars, scrubber=config.scrubber())
    log(f"data: {report}")
    if not cleaned:
        raise UserError(
            f"data.sources: {report.documents_in} documents were read and none is left after "
            f"cleaning ({report.removed_empty} empty, {report.removed_too_short} shorter than "
            f"data.min_chars={config.min_chars}, {report.removed_duplicates} duplicates). Add "
            "text to data.sources, check data.text_field, or lower data.min_chars."
        )
    splits = split_documents(
        cleaned, config.validation_fraction, config.test_fraction, config.split_seed
    )
    log(
        "data: split by document: "
        + ", ".join(f"{name} {len(docs)}" for name, docs in splits.items())
    )
    if config.tokenizer_path:
        tokenizer = Tokenizer.load(config.tokenizer_path)
        log(f"data: loaded tokenizer {config.tokenizer_path} (vocab {tokenizer.vocab_size})")
    else:
        tokenizer = train_tokenizer(splits["train"], config.vocab_size)
        log(f"data: trained byte-level BPE on the train split (vocab {tokenizer.vocab_size})")

    write = functools.partial(
        _write,
        config=config,
        tokenizer=tokenizer,
        splits=splits,
        report=report.as_dict(),
        num_read=len(documents),
        log=log,
    )
    return _build(out_dir, write, log)


def _build(out_dir: str, write, log) -> PreparedData:
    """Runs write(temp_dir) -> manifest in a temporary sibling and publishes it as out_dir."""
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    temp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
    try:
        manifest = write(temp_dir)
        _publish(temp_dir, out_dir)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    prepared = load_prepared(out_dir)
    if prepared.manifest["key"] != manifest["key"]:  # Lost a race to another config.
        raise UserError(f"{out_dir} was filled concurrently by a different data config.")
    log(f"data: wrote {out_dir}")
    return prepared


def split_documents(
    documents: list[str], validation_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[str]]:
    """Random split by document; each split keeps the input order.

    A held-out split with a positive fraction gets at least one document; train keeps at
    least one. Documents are assumed distinct (clean_documents removes exact duplicates).
    """
    num = len(documents)
    counts = [0 if f == 0 else max(1, round(f * num)) for f in (validation_fraction, test_fraction)]
    if num - sum(counts) < 1:
        raise UserError(
            f"only {num} documents are left after cleaning, too few for a train split plus "
            f"{counts[0]} validation and {counts[1]} test documents. Add text to data.sources, "
            "lower data.min_chars, or set data.validation_fraction / data.test_fraction to 0."
        )
    order = np.random.default_rng(seed).permutation(num)
    validation = np.sort(order[: counts[0]])
    test = np.sort(order[counts[0] : counts[0] + counts[1]])
    train = np.sort(order[counts[0] + counts[1] :])
    return {
        name: [documents[i] for i in indices]
        for name, indices in (("train", train), ("validation", validation), ("test", test))
    }


def _finished(out_dir: str, config: DataConfig) -> PreparedData | None:
    if not os.path.isfile(os.path.join(out_dir, MANIFEST_FILE)):
        if os.path.exists(out_dir) and not _is_unfinished_preparation(out_dir):
            raise UserError(_NOT_OURS.format(out_dir=out_dir))
        return None  # Missing, or an interrupted run: rebuilt from scratch.
    prepared = load_prepared(out_dir)
    if prepared.manifest.get("key") != config.key():
        raise UserError(
            f"{out_dir} already holds data prepared from another data config (key "
            f"{prepared.manifest.get('key')}, this config: {config.key()}); choose another "
            "output directory, or delete it to prepare again."
        )
    return prepared


def _write(
    directory, *, config, tokenizer, splits, report, num_read, log, encoded=None, extra=None
) -> dict:
    """Writes tokenizer, shards, text files and (last) the manifest; `encoded` gives each
    split's records ready-made (chat: ids with loss bits) instead of encoding the texts."""
    tokenizer.save(os.path.join(directory, TOKENIZER_DIR))
    split_stats = {}
    for name, texts in splits.items():
        token_lists = encoded[name] if encoded is not None else []
        for start in range(0, len(texts) if encoded is None else 0, _ENCODE_CHUNK):
            for ids in tokenizer.encode_batch(texts[start : start + _ENCODE_CHUNK]):
                ids.append(tokenizer.eos_id)
                token_lists.append(ids)
            if len(texts) > _ENCODE_CHUNK:
                log(f"data: encoded {len(token_lists)}/{len(texts)} {name} documents")
        files = shards.write_split(directory, name, token_lists, config.num_shards)
        text_file = None
        if name in TEXT_SPLITS:
            text_file = f"{name}.jsonl"
            with open(os.path.join(directory, text_file), "w", encoding="utf-8") as f:
                for text in texts:
                    f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        split_stats[name] = {
            "documents": len(texts),
            "tokens": sum(len(ids) for ids in token_lists),
            "characters": sum(len(text) for text in texts),
            "bytes": sum(len(text.encode("utf-8")) for text in texts),
            "files": [os.path.basename(path) for path in files],
            "text_file": text_file,
        }
        log(
            f"data: {name}: {len(texts)} documents, {split_stats[name]['tokens']} tokens, "
            f"{len(files)} shard(s)"
        )
    manifest = {
        "format_version": FORMAT_VERSION,
        "key": config.key(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": dataclasses.asdict(config),
        "documents_read": num_read,
        "clean": report,
        "tokenizer": {
            "directory": TOKENIZER_DIR,
            "trained": not config.tokenizer_path,
            "vocab_size": tokenizer.vocab_size,
            "pad_id": tokenizer.pad_id,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "add_bos": tokenizer.add_bos,
        },
        "splits": split_stats,
        **(extra or {}),
    }
    # Last, and atomically: its presence marks the directory as finished.
    temp_path = os.path.join(directory, MANIFEST_FILE + ".tmp")
    with open(temp_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    os.replace(temp_path, os.path.join(directory, MANIFEST_FILE))
    return manifest


def _publish(temp_dir: str, out_dir: str) -> None:
    """Renames the finished `temp_dir` to `out_dir`, replacing an unfinished one."""
    if os.path.isfile(os.path.join(out_dir, MANIFEST_FILE)):
        return  # Another process finished first; keep its (identical-config) result.
    if os.path.exists(out_dir):
        if not _is_unfinished_preparation(out_dir):
            raise UserError(_NOT_OURS.format(out_dir=out_dir))
        # Left by an interrupted run (no manifest, so never used), or only the entry point's
        # logs/: everything but logs/ goes, then the new files move in, the manifest last.
        for name in os.listdir(out_dir):
            if name != LOGS_DIR:
                path = os.path.join(out_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        for name in sorted(os.listdir(temp_dir), key=lambda name: name == MANIFEST_FILE):
            os.replace(os.path.join(temp_dir, name), os.path.join(out_dir, name))
        os.rmdir(temp_dir)
        return
    try:
        os.rename(temp_dir, out_dir)
    except OSError:
        if not os.path.isfile(os.path.join(out_dir, MANIFEST_FILE)):
            raise


def _is_unfinished_preparation(directory: str) -> bool:
    """True if every entry of `directory` is one that preparation writes (safe to delete)."""
    if not os.path.isdir(directory):
        return False
    ours = {TOKENIZER_DIR, LOGS_DIR, MANIFEST_FILE + ".tmp"}
    ours |= {f"{name}.jsonl" for name in TEXT_SPLITS}
    return all(
        name in ours or name.endswith((".array_record", ".lengths.npy"))
        for name in os.listdir(directory)
    )


def _prepare_chat(config: DataConfig, out_dir: str, log) -> PreparedData:
    """data.format = 'chat': conversations -> rendered tokens with loss bits (see chat.py)."""
    from research.data.chat import ChatTemplate, audit, check_conversation, encode_conversation
    from research.data.corpus import default_chat_conversations, read_conversations
    from research.data.tokenizer import read_chat_template

    if not config.tokenizer_path:
        raise UserError(
            "data.format='chat' needs the model's tokenizer: set data.tokenizer_path, or "
            "fine-tune with launch.train --init_from=<model>, which sets it."
        )
    if config.sources:
        raw = read_conversations(config.sources)
        log(f"data: read {len(raw)} conversations from {len(config.sources)} source(s)")
    else:
        raw = default_chat_conversations()
        log(f"data: read {len(raw)} English dialogs of the chatterbot-corpus package")
    conversations, seen, scrubbed = [], set(), {}
    scrubber = config.scrubber()
    for where, messages in raw:
        messages = check_conversation(messages, where)
        if scrubber is not None:
            for message in messages:  # check_conversation's copies.
                message["content"], found = scrubber.scrub(message["content"])
                scrub.add_counts(scrubbed, found)
        key = json.dumps(messages, sort_keys=True)
        if key not in seen:
            seen.add(key)
            conversations.append(messages)
    if not conversations:
        raise UserError("data.sources: no conversations found; add JSONL chat files.")
    if scrubber is not None:
        log(f"data: scrubbed {scrub.describe(scrubbed)}")
    tokenizer = Tokenizer.load(config.tokenizer_path)
    source = read_chat_template(config.tokenizer_path)
    template = ChatTemplate(tokenizer, source)
    log(
        f"data: {len(conversations)} conversations ({len(raw) - len(conversations)} duplicates "
        f"dropped); chat template: {'the tokenizer' + chr(39) + 's' if source else 'ChatML'}"
    )
    failures, first = 0, None
    for index, messages in enumerate(conversations):
        report = audit(template, messages, config.chat_loss_mask)
        if not report.ok:
            failures += 1
            first = first or (index, report)
    summary = f"{len(conversations) - failures} of {len(conversations)} conversations ok"
    log(f"data: template audit: {summary}")
    if first is not None:
        log(f"data: first mismatch, conversation {first[0]}: {first[1].describe()}")
    by_index = split_documents(
        list(range(len(conversations))), config.validation_fraction, config.test_fraction,
        config.split_seed,
    )  # fmt: skip
    splits, encoded = {}, {}
    for name, indices in by_index.items():
        splits[name] = [template.render(conversations[i], False) for i in indices]
        encoded[name] = []
        for i in indices:
            try:
                ids, loss = encode_conversation(template, conversations[i], config.chat_loss_mask)
            except ValueError as error:
                raise UserError(f"data: conversation {i} of {name}: {error}") from None
            encoded[name].append(shards.with_loss_bits(ids, loss))
    extra = {
        "chat": {
            "template": "tokenizer" if source else "default ChatML",
            "loss_mask": config.chat_loss_mask,
            "audit": {
                "ok": len(conversations) - failures,
                "conversations": len(conversations),
                "first_mismatch": first[1].describe() if first else None,
            },
        },
        "loss_bits": True,
    }
    write = functools.partial(
        _write, config=config, tokenizer=tokenizer, splits=splits,
        report={"conversations_in": len(raw), "duplicates": len(raw) - len(conversations),
                "scrubbed": scrubbed},
        num_read=len(raw), log=log, encoded=encoded, extra=extra,
    )  # fmt: skip
    return _build(out_dir, write, log)
