"""The grain input pipeline: documents -> chunks -> shuffle -> pack -> per-host batches.

Each document (token ids ending in eos) gets bos in front where the tokenizer puts bos first
(Cirrus tokenizers; not e.g. SmolLM2's: manifest "add_bos") and is cut into chunks of
seq_len + 1 tokens; consecutive chunks overlap by one token, so every token after the first
is a target exactly once. A chunk is one example (inputs = chunk[:-1], targets = chunk[1:]).
Examples are shuffled globally (a new order each epoch), packed first-fit into rows of
seq_len tokens, and batched:

    inputs       [B, T] int32    token ids (0 on padding)
    targets      [B, T] int32    next token ids (0 on padding)
    segment_ids  [B, T] int32    1..k for the k examples packed in a row, 0 on padding
    positions    [B, T] int32    position within the example, from 0
    weights      [B, T] float32  1 on real targets, 0 on padding (chat data: 1 only on the
                                 targets its loss mask keeps, research/data/chat.py)

Attention must stay within a segment (segment_ids equal) and positions feed RoPE / learned
position embeddings. Reading an example reads its whole document record, so documents of
more than ~1M tokens make reads slow; split such text into several documents.

Checkpointing: `it = iter(make_dataset(...))` is a grain DatasetIterator; `it.get_state()`
/ `it.set_state(state)` save and restore the position exactly (the restored iterator yields
the batches that would have followed), and `grain.checkpoint.CheckpointHandler` saves it
inside an Orbax CheckpointManager (`grain.checkpoint.CheckpointSave(it)` / `...Restore(it)`).
"""

import grain
import numpy as np

from research.data import shards
from research.data.prepare import load_prepared
from research.errors import UserError

FEATURES = ("inputs", "targets", "segment_ids", "positions", "weights")


def make_dataset(
    directory: str,
    split: str,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_threads: int = 4,
    prefetch_batches: int = 2,
) -> grain.IterDataset:
    """Packed language-modelling batches of one split of prepared data, for this host.

    Args:
      directory: a prepared-data directory (see prepare.py).
      split: "train", "validation" or "test".
      seq_len: T, tokens per row.
      batch_size: B, rows per batch on THIS host (the global batch is B * shard_count).
      seed: shuffle seed (examples and packed rows); epochs are shuffled differently.
      shuffle: False keeps document order (evaluation).
      num_epochs: None repeats forever; an int gives a finite dataset whose last batch is
        padded with zero-weight rows to B rows.
      shard_index, shard_count: this host's share of the documents; default
        jax.process_index() / jax.process_count() (grain's ShardByJaxProcess). Shards hold
        disjoint documents; together they cover the split. Finite splits may give hosts
        different numbers of batches, so a multi-host evaluation loop must agree on a
        step count (e.g. run until every host reports exhaustion, feeding zero-weight
        batches meanwhile).
      num_threads: threads reading records; prefetch_batches: batches prepared ahead.
    Returns:
      an IterDataset of dicts with the FEATURES above, each [B, T].
    """
    if seq_len < 1 or batch_size < 1:
        raise UserError(
            f"seq_len={seq_len} and batch_size={batch_size} must both be positive; set the "
            "sequence length and per-host batch size of the run to at least 1."
        )
    if num_epochs is not None and num_epochs < 1:
        raise UserError(f"num_epochs={num_epochs} must be None (repeat forever) or at least 1.")
    prepared = load_prepared(directory)
    num_documents = prepared.num_documents(split)  # Raises a UserError for an unknown split.
    if num_documents == 0:
        raise UserError(
            f"split {split!r} of {prepared.directory} has no documents; raise its "
            f"data.{split}_fraction, or evaluate on another split."
        )
    options = _shard_options(shard_index, shard_count)
    bos_id = prepared.manifest["tokenizer"]["bos_id"]
    loss_bits = bool(prepared.manifest.get("loss_bits"))  # Chat: the template places bos.
    lead = 1 if prepared.manifest["tokenizer"].get("add_bos", True) and not loss_bits else 0

    lengths = shards.document_lengths(prepared.directory, split)
    chunks = _chunk_table(lengths, seq_len, options, lead)
    if len(chunks) == 0:
        raise UserError(
            f"split {split!r} has {num_documents} documents, fewer than the "
            f"{options.shard_count} data shards (hosts); shard {options.shard_index} would be "
            "empty. Use fewer hosts or more data."
        )
    source = shards.open_split(prepared.directory, split)

    def to_example(chunk):
        return _example(source, chunk, bos_id, seq_len, lead, loss_bits)

    dataset = grain.MapDataset.source(chunks)
    if shuffle:
        dataset = dataset.shuffle(seed)
    dataset = dataset.repeat(num_epochs).map(to_example)
    dataset = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4 * batch_size)
    )
    dataset = grain.experimental.FirstFitPackIterDataset(
        dataset,
        length_struct={"inputs": seq_len, "targets": seq_len, "weights": seq_len},
        num_packing_bins=batch_size,
        seed=seed,
        shuffle_bins=shuffle,
    )
    dataset = dataset.map(_lm_features)
    dataset = dataset.batch(batch_size, batch_fn=lambda rows: _stack_and_pad(rows, batch_size))
    return grain.experimental.ThreadPrefetchIterDataset(
        dataset, prefetch_buffer_size=prefetch_batches
    )


def _shard_options(shard_index, shard_count) -> grain.sharding.ShardOptions:
    if shard_index is None and shard_count is None:
        return grain.sharding.ShardByJaxProcess()
    if shard_index is None or shard_count is None:
        raise UserError(
            f"shard_index={shard_index} and shard_count={shard_count}: give both (this host's "
            "data shard and the number of shards) or neither (one shard per JAX process)."
        )
    if not 0 <= shard_index < shard_count:
        raise UserError(
            f"shard_index={shard_index} must be in [0, shard_count={shard_count}); use the "
            "host's process index and the number of processes."
        )
    return grain.sharding.ShardOptions(shard_index=shard_index, shard_count=shard_count)


def _chunk_table(lengths: np.ndarray, seq_len: int, options, lead: int = 1) -> np.ndarray:
    """[C, 2] int64 rows (document index, start) of this shard's chunks, in document order.

    A document of L tokens (eos included) is L + lead tokens (lead = 1 with bos) and holds
    L + lead - 1 targets: chunks start at 0, seq_len, 2 * seq_len, ... below that.
    """
    documents = np.arange(len(lengths))[options.shard_index :: options.shard_count]
    counts = -(-(lengths[documents] + lead - 1) // seq_len)  # ceil(targets / seq_len)
    document_of_chunk = np.repeat(documents, counts)
    first_chunk = np.cumsum(counts) - counts
    chunk_in_document = np.arange(counts.sum()) - np.repeat(first_chunk, counts)
    return np.stack([document_of_chunk, chunk_in_document * seq_len], axis=1).astype(np.int64)


def _example(
    source, chunk, bos_id: int, seq_len: int, lead: int = 1, loss_bits: bool = False
) -> dict:
    """One chunk -> {"inputs", "targets": [t] int32, "weights": [t] float32}, t <= seq_len.

    Weights are 1 on every target, or (chat data) the target token's loss flag."""
    document, start = int(chunk[0]), int(chunk[1])
    ids = shards.decode_record(source[document])
    if loss_bits:
        ids, loss = shards.split_loss_bits(ids)
        tokens = ids[start : start + seq_len + 1]
        return {
            "inputs": tokens[:-1],
            "targets": tokens[1:],
            "weights": loss[start + 1 : start + len(tokens)],
        }
    if lead == 0:
        tokens = ids[start : start + seq_len + 1]
    elif start == 0:
        tokens = np.concatenate([np.array([bos_id], np.int32), ids[:seq_len]])
    else:  # Token k of the bos-prefixed document is ids[k - 1].
        tokens = ids[start - 1 : start + seq_len]
    return {
        "inputs": tokens[:-1],
        "targets": tokens[1:],
        "weights": np.ones(len(tokens) - 1, np.float32),
    }


def _lm_features(packed: dict) -> dict:
    """Grain's packed row ([T] values, *_segment_ids, *_positions) -> the FEATURES."""
    segment_ids = packed["targets_segment_ids"].astype(np.int32)
    return {
        "inputs": packed["inputs"].astype(np.int32),
        "targets": packed["targets"].astype(np.int32),
        "segment_ids": segment_ids,
        "positions": packed["targets_positions"].astype(np.int32),
        "weights": packed["weights"].astype(np.float32) * (segment_ids > 0),
    }


def _stack_and_pad(rows, batch_size: int) -> dict:
    """Stacks rows into [B, T]; a final short batch gets all-zero rows (weight 0)."""
    batch = {name: np.stack([row[name] for row in rows]) for name in FEATURES}
    missing = batch_size - len(rows)
    if missing:
        batch = {
            name: np.concatenate([value, np.zeros((missing,) + value.shape[1:], value.dtype)])
            for name, value in batch.items()
        }
    return batch
