"""ArrayRecord shards: file names, record format, read back equal."""

import os

import numpy as np

from research.data import read_split, shards, split_files, write_split


def test_write_and_read_back(tmp_path):
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, 70_000, size=n).tolist() for n in (1, 5, 300, 2, 17, 9, 1000)]
    paths = write_split(str(tmp_path), "train", documents, num_shards=3)
    names = [os.path.basename(p) for p in paths]
    assert names == [f"train-0000{i}-of-00003.array_record" for i in range(3)]
    assert split_files(str(tmp_path), "train") == paths
    back = read_split(str(tmp_path), "train")
    assert len(back) == len(documents)
    for original, read in zip(documents, back, strict=True):
        assert read.dtype == np.int32
        np.testing.assert_array_equal(read, original)
    lengths = shards.document_lengths(str(tmp_path), "train")
    np.testing.assert_array_equal(lengths, [len(d) for d in documents])


def test_record_is_little_endian_int32():
    assert shards.encode_record([1, 258]) == b"\x01\x00\x00\x00\x02\x01\x00\x00"
    np.testing.assert_array_equal(shards.decode_record(b"\x02\x01\x00\x00"), [258])


def test_fewer_documents_than_shards_and_empty_split(tmp_path):
    paths = write_split(str(tmp_path), "test", [[1, 2], [3]], num_shards=4)
    assert [os.path.basename(p) for p in paths] == [
        "test-00000-of-00002.array_record",
        "test-00001-of-00002.array_record",
    ]
    assert write_split(str(tmp_path), "validation", [], num_shards=4) == []
    assert split_files(str(tmp_path), "validation") == []
    assert read_split(str(tmp_path), "validation") == []
