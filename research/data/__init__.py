"""Data: raw text -> cleaned documents -> tokenizer + ArrayRecord shards -> packed batches.

config = DataConfig(sources=("~/text",), vocab_size=8192)
prepared = ensure_prepared(config)             # cached under config.prepared_dir()
train = make_dataset(prepared.directory, "train", seq_len=256, batch_size=32)
batch = next(iter(train))                      # dict of [32, 256] numpy arrays
"""

from research.data.clean import CleanReport, clean_documents
from research.data.config import DataConfig
from research.data.corpus import default_corpus_documents, read_documents
from research.data.pipeline import make_dataset
from research.data.prepare import (
    PreparedData,
    ensure_prepared,
    load_prepared,
    prepare_data,
    split_documents,
)
from research.data.scrub import Scrubber
from research.data.shards import read_split, split_files, write_split
from research.data.tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "CleanReport",
    "DataConfig",
    "PreparedData",
    "Scrubber",
    "Tokenizer",
    "clean_documents",
    "default_corpus_documents",
    "ensure_prepared",
    "load_prepared",
    "make_dataset",
    "prepare_data",
    "read_documents",
    "read_split",
    "split_documents",
    "split_files",
    "train_tokenizer",
    "write_split",
]
