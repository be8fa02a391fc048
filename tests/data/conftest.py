"""A tiny synthetic corpus and its prepared data, shared by the prepare and pipeline tests."""

import numpy as np
import pytest

from research.data import DataConfig, prepare_data

WORDS = [
    *("love", "night", "king", "crown", "sword", "rose", "moon", "sea", "fool", "death"),
    *("ghost", "honour", "grave", "heart", "storm", "queen", "blood", "star", "song"),
    *("wind", "gold", "tears", "fair", "sweet", "noble", "wit"),
]
NUM_DOCUMENTS = 40


def make_corpus(directory, num_documents=NUM_DOCUMENTS, seed=0):
    """Writes distinct documents of 20-300 words as *.txt / *.md files (+ junk to clean)."""
    rng = np.random.default_rng(seed)
    texts = []
    for index in range(num_documents):
        words = rng.choice(WORDS, size=int(rng.integers(20, 300)))
        text = f"Document {index}\n" + " ".join(words)
        texts.append(text)
        suffix = "md" if index % 3 == 0 else "txt"
        (directory / f"doc{index:03d}.{suffix}").write_text(
            f"**{text}**" if suffix == "md" else text
        )
    (directory / "duplicate.txt").write_text(texts[0])
    (directory / "short.txt").write_text("tiny")
    (directory / "empty.txt").write_text("  \n ")
    return texts


def small_config(corpus_dir, **fields) -> DataConfig:
    defaults = dict(
        sources=(str(corpus_dir),),
        vocab_size=300,
        min_chars=20,
        validation_fraction=0.1,
        test_fraction=0.1,
        num_shards=2,
    )
    return DataConfig(**{**defaults, **fields})


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    return directory, make_corpus(directory)


@pytest.fixture(scope="session")
def prepared(corpus, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("prepared") / "data"
    return prepare_data(small_config(corpus[0]), str(out_dir), log=lambda line: None)
