"""prepare_data: split disjointness, manifest counts, caching, atomicity, errors."""

import json
import os

import pytest

from research.data import (
    ensure_prepared,
    load_prepared,
    prepare_data,
    read_split,
    split_documents,
    train_tokenizer,
)
from research.errors import UserError
from tests.data.conftest import NUM_DOCUMENTS, make_corpus, small_config


def _texts(prepared, split):
    """Documents of a split decoded from its shards (eos dropped)."""
    tokenizer = prepared.tokenizer
    return [tokenizer.decode(ids[:-1]) for ids in read_split(prepared.directory, split)]


def test_splits_are_disjoint_and_cover_the_cleaned_corpus(prepared, corpus):
    _, texts = corpus
    train = _texts(prepared, "train")
    validation = _texts(prepared, "validation")
    test = _texts(prepared, "test")
    assert sorted(train + validation + test) == sorted(texts)
    assert len(validation) == len(test) == round(0.1 * NUM_DOCUMENTS)
    all_train = "\n".join(train)
    for text in validation + test:
        assert text not in all_train
    for split, decoded in (("validation", validation), ("test", test)):
        with open(prepared.text_path(split), encoding="utf-8") as f:
            assert [json.loads(line)["text"] for line in f] == decoded


def test_manifest_counts(prepared):
    manifest = prepared.manifest
    assert manifest["documents_read"] == NUM_DOCUMENTS + 3
    clean = manifest["clean"]
    assert (clean["removed_duplicates"], clean["removed_too_short"], clean["removed_empty"]) == (
        1,
        1,
        1,
    )
    assert clean["markup_chars_removed"] == 4 * len(range(0, NUM_DOCUMENTS, 3))
    assert (
        sum(prepared.num_documents(s) for s in ("train", "validation", "test"))
        == (clean["documents_out"])
    )
    for split in ("train", "validation", "test"):
        documents = read_split(prepared.directory, split)
        assert len(documents) == prepared.num_documents(split)
        assert sum(len(d) for d in documents) == prepared.num_tokens(split)
        assert all(d[-1] == prepared.tokenizer.eos_id for d in documents)
        assert all(prepared.tokenizer.bos_id not in d for d in documents)
        assert len(prepared.split_files(split)) == 2
    assert manifest["tokenizer"]["vocab_size"] == prepared.tokenizer.vocab_size <= 300
    assert manifest["config"]["vocab_size"] == 300


def test_tokenizer_is_trained_on_train_only(prepared):
    expected = train_tokenizer(_texts(prepared, "train"), 300)
    assert prepared.tokenizer.hf_tokenizer.get_vocab() == expected.hf_tokenizer.get_vocab()


def test_second_call_reuses_without_rewriting(prepared, corpus):
    manifest_path = os.path.join(prepared.directory, "manifest.json")
    before = os.stat(manifest_path).st_mtime_ns
    lines = []
    again = prepare_data(small_config(corpus[0]), prepared.directory, log=lines.append)
    assert again.manifest == prepared.manifest
    assert os.stat(manifest_path).st_mtime_ns == before
    assert lines == [f"data: using prepared data in {prepared.directory}"]
    with pytest.raises(UserError, match="another data config"):
        prepare_data(small_config(corpus[0], vocab_size=400), prepared.directory)


def test_interrupted_preparation_is_not_used_and_is_redone(corpus, tmp_path):
    out_dir = tmp_path / "data"
    (out_dir / "tokenizer").mkdir(parents=True)
    (out_dir / "train-00000-of-00002.array_record").write_bytes(b"partial")
    (out_dir / "logs").mkdir()  # launch.prepare_data's own log, written from its start.
    (out_dir / "logs" / "prepare_data.log").write_text("INFO started\n")
    (tmp_path / ".data.partial-abc").mkdir()  # A killed run's temp dir: ignored.
    with pytest.raises(UserError, match="no manifest.json"):
        load_prepared(str(out_dir))
    lines = []
    prepared = prepare_data(small_config(corpus[0]), str(out_dir), log=lines.append)
    assert "data: using prepared data" not in lines[0]
    assert len(read_split(prepared.directory, "train")) == prepared.num_documents("train")
    assert sorted(os.listdir(tmp_path)) == [".data.partial-abc", "data"]
    assert (out_dir / "logs" / "prepare_data.log").read_text() == "INFO started\n"
    assert b"partial" not in (out_dir / "train-00000-of-00002.array_record").read_bytes()


def test_directory_with_other_files_is_refused(corpus, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds other files"):
        prepare_data(small_config(corpus[0]), str(tmp_path))
    assert (tmp_path / "notes.txt").exists()


def test_ensure_prepared_caches_under_the_key(corpus, tmp_path):
    config = small_config(corpus[0], cache_dir=str(tmp_path), num_shards=1)
    prepared = ensure_prepared(config, log=lambda line: None)
    assert prepared.directory == str(tmp_path / config.key())
    lines = []
    assert ensure_prepared(config, log=lines.append).manifest == prepared.manifest
    assert lines[0].startswith("data: using prepared data")


def test_existing_tokenizer_is_loaded(prepared, corpus, tmp_path):
    config = small_config(corpus[0], tokenizer_path=prepared.tokenizer_dir)
    loaded = prepare_data(config, str(tmp_path / "data"), log=lambda line: None)
    assert loaded.manifest["tokenizer"]["trained"] is False
    assert loaded.tokenizer.hf_tokenizer.get_vocab() == prepared.tokenizer.hf_tokenizer.get_vocab()


def test_empty_corpus_after_cleaning_says_why(tmp_path):
    (tmp_path / "a.txt").write_text("short")
    (tmp_path / "b.txt").write_text("")
    with pytest.raises(UserError, match=r"2 documents were read.*1 empty, 1 shorter"):
        prepare_data(small_config(tmp_path), str(tmp_path / "out"))


def test_small_corpus_still_gets_validation_and_test(tmp_path):
    make_corpus(tmp_path, num_documents=3)
    config = small_config(tmp_path, validation_fraction=0.05, test_fraction=0.05)
    prepared = prepare_data(config, str(tmp_path / "out"), log=lambda line: None)
    assert [prepared.num_documents(s) for s in ("train", "validation", "test")] == [1, 1, 1]
    with pytest.raises(UserError, match="too few"):
        split_documents(["a", "b"], 0.05, 0.05, seed=0)
    assert split_documents(["a", "b"], 0.0, 0.0, seed=0)["train"] == ["a", "b"]


def test_split_depends_only_on_seed():
    documents = [f"doc {i}" for i in range(50)]
    first = split_documents(documents, 0.1, 0.1, seed=3)
    assert first == split_documents(documents, 0.1, 0.1, seed=3)
    assert first != split_documents(documents, 0.1, 0.1, seed=4)
