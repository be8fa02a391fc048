"""Text the compression stages learn from: the bundled corpus, never the held-out set.

GPTQ's Hessians, layer influence and distillation all read windows of the bundled corpus
(research.data.default_corpus_documents) through the model's own tokenizer.
"""

import numpy as np

from research.data.corpus import default_corpus_documents


def calibration_batches(tokenizer, sequences: int, length: int, batch: int = 4) -> list:
    """Up to `sequences` rows of `length` tokens from the start of the corpus, in [B, T]
    batches of `batch` rows."""
    ids = []
    for document in default_corpus_documents():
        ids += tokenizer.encode(document)
        if len(ids) >= length * sequences:
            break
    count = min(sequences, len(ids) // length)
    rows = np.asarray(ids[: count * length], np.int32).reshape(count, length)
    return [rows[i : i + batch] for i in range(0, count, batch)]


def training_batches(tokenizer, batch_size: int, seq_len: int, seed: int = 0, documents=None):
    """An endless iterator of [B, T + 1] random windows of the corpus's token stream (eos
    between documents); `documents` replaces the corpus (tests)."""
    stream = []
    for document in documents or default_corpus_documents():
        stream += tokenizer.encode(document) + [tokenizer.eos_id]
    stream = np.asarray(stream, np.int32)
    windows = len(stream) // (seq_len + 1)
    if windows < 1:
        raise ValueError(f"the training text has {len(stream)} tokens, fewer than one window.")
    rows = stream[: windows * (seq_len + 1)].reshape(windows, seq_len + 1)
    rng = np.random.default_rng(seed)
    while True:
        yield rows[rng.choice(windows, size=batch_size, replace=windows < batch_size)]
