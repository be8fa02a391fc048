"""ArrayRecord shards of token ids: one record per document.

A record is the document's token ids (eos appended, no bos) as little-endian int32 bytes.
Split `s` with N shards is `s-00000-of-0000N.array_record`, ..., documents in order across
the files, plus `s.lengths.npy` ([num_documents] int64 token counts) so that readers can
index examples without reading every record.
"""

import glob
import os

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

TOKEN_DTYPE = np.dtype("<i4")
# group_size:1 keeps random access to one record cheap (grain reads records one by one).
_WRITER_OPTIONS = "group_size:1"


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.array_record"


def lengths_path(directory: str, split: str) -> str:
    return os.path.join(directory, f"{split}.lengths.npy")


def write_split(directory: str, split: str, token_lists, num_shards: int) -> list[str]:
    """Writes one split as ArrayRecord shards of contiguous document ranges.

    Args:
      directory: output directory (created if missing).
      split: split name ("train", "validation", "test").
      token_lists: per document, a sequence of int token ids (eos included, no bos).
      num_shards: number of files; fewer when there are fewer documents, none for none.
    Returns:
      the shard paths, in document order.
    """
    os.makedirs(directory, exist_ok=True)
    token_lists = list(token_lists)
    count = min(num_shards, len(token_lists))
    paths = []
    for index in range(count):
        start = index * len(token_lists) // count
        end = (index + 1) * len(token_lists) // count
        path = os.path.join(directory, shard_name(split, index, count))
        writer = ArrayRecordWriter(path, _WRITER_OPTIONS)
        for ids in token_lists[start:end]:
            writer.write(encode_record(ids))
        writer.close()
        paths.append(path)
    lengths = np.array([len(ids) for ids in token_lists], dtype=np.int64)
    np.save(lengths_path(directory, split), lengths)
    return paths


def split_files(directory: str, split: str) -> list[str]:
    """The shard paths of `split` in `directory`, in document order ([] if none)."""
    return sorted(glob.glob(os.path.join(glob.escape(directory), f"{split}-*-of-*.array_record")))


def document_lengths(directory: str, split: str) -> np.ndarray:
    """[num_documents] int64: tokens per document of `split` (eos included)."""
    return np.load(lengths_path(directory, split))


def open_split(directory: str, split: str) -> grain.sources.ArrayRecordDataSource:
    """Random access to the records of `split`; decode each with `decode_record`."""
    return grain.sources.ArrayRecordDataSource(split_files(directory, split))


# Chat data keeps each token's loss flag in bit 30 of its record entry (ids stay < 2^30).
LOSS_BIT = 1 << 30


def with_loss_bits(ids, loss) -> np.ndarray:
    """ids with LOSS_BIT set where `loss` is 1 (a token the model is trained to predict)."""
    ids = np.asarray(ids, np.int64)
    if ids.size and ids.max() >= LOSS_BIT:
        raise ValueError(f"token id {ids.max()} does not fit below the loss bit (2^30).")
    return (ids | (np.asarray(loss, np.int64) << 30)).astype(np.int32)


def split_loss_bits(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, loss flags as float32) of a record written with with_loss_bits."""
    return values & (LOSS_BIT - 1), (values >> 30).astype(np.float32)


def encode_record(ids) -> bytes:
    """[L] ints -> little-endian int32 bytes."""
    return np.asarray(ids, dtype=TOKEN_DTYPE).tobytes()


def decode_record(record: bytes) -> np.ndarray:
    """Little-endian int32 bytes -> [L] int32 token ids."""
    return np.frombuffer(record, dtype=TOKEN_DTYPE).astype(np.int32)


def read_split(directory: str, split: str) -> list[np.ndarray]:
    """Every document of `split` as [L] int32 arrays, in order (for tests and small splits)."""
    files = split_files(directory, split)
    if not files:
        return []
    source = open_split(directory, split)
    return [decode_record(source[index]) for index in range(len(source))]
