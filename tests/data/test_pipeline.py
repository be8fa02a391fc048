"""The grain pipeline: packing invariants, coverage, seeds, checkpointing, host shards."""

import collections

import grain
import numpy as np
import pytest
from etils import epath

from research.data import make_dataset, read_split
from research.errors import UserError

SEQ_LEN = 32
BATCH = 4


def _dataset(prepared, split="train", **kwargs):
    kwargs = {"seq_len": SEQ_LEN, "batch_size": BATCH, **kwargs}
    return make_dataset(prepared.directory, split, **kwargs)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _examples(batches):
    """Every packed example as a tuple: (first input, *targets)."""
    examples = []
    for batch in batches:
        for row in range(batch["inputs"].shape[0]):
            segments = batch["segment_ids"][row]
            for segment in np.unique(segments[segments > 0]):
                where = segments == segment
                inputs, targets = batch["inputs"][row][where], batch["targets"][row][where]
                examples.append((int(inputs[0]), *targets.tolist()))
    return examples


def _assert_batches_equal(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


def test_packing_invariants(prepared):
    batches = _take(iter(_dataset(prepared)), 10)
    for batch in batches:
        assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
            "inputs": ((BATCH, SEQ_LEN), "int32"),
            "targets": ((BATCH, SEQ_LEN), "int32"),
            "segment_ids": ((BATCH, SEQ_LEN), "int32"),
            "positions": ((BATCH, SEQ_LEN), "int32"),
            "weights": ((BATCH, SEQ_LEN), "float32"),
        }
        segments, positions = batch["segment_ids"], batch["positions"]
        real = segments > 0
        np.testing.assert_array_equal(batch["weights"], real.astype(np.float32))
        assert not batch["inputs"][~real].any() and not batch["targets"][~real].any()
        for row in range(BATCH):
            ids = segments[row][real[row]]
            # Segments are numbered 1..k left to right, padding only at the end.
            assert real[row][: len(ids)].all()
            np.testing.assert_array_equal(np.unique(ids), np.arange(1, ids.max() + 1))
            for t in range(SEQ_LEN):
                same = t > 0 and segments[row, t] == segments[row, t - 1] and real[row, t]
                if real[row, t]:
                    assert positions[row, t] == (positions[row, t - 1] + 1 if same else 0)
                if t + 1 < SEQ_LEN and real[row, t] and segments[row, t + 1] == segments[row, t]:
                    assert batch["targets"][row, t] == batch["inputs"][row, t + 1]
    assert np.mean([b["weights"].mean() for b in batches]) > 0.8  # Packing leaves little pad.


def test_one_epoch_covers_every_token_exactly_once(prepared):
    bos = prepared.tokenizer.bos_id
    documents = read_split(prepared.directory, "train")
    batches = list(_dataset(prepared, num_epochs=1, seed=3))
    examples = _examples(batches)
    assert collections.Counter(t for e in examples for t in e[1:]) == collections.Counter(
        t for d in documents for t in d.tolist()
    )
    assert sum(e[0] == bos for e in examples) == len(documents)
    # Each example is a window of a bos-prefixed document.
    texts = [" ".join(map(str, [bos, *d.tolist()])) + " " for d in documents]
    for example in examples:
        window = " ".join(map(str, example)) + " "
        assert any(window in text for text in texts)


def test_seed_sets_the_order(prepared):
    first = _take(iter(_dataset(prepared, seed=0)), 3)
    _assert_batches_equal(first, _take(iter(_dataset(prepared, seed=0)), 3))
    other = _take(iter(_dataset(prepared, seed=1)), 3)
    pairs = zip(first, other, strict=True)
    assert not all(np.array_equal(a["inputs"], b["inputs"]) for a, b in pairs)


def test_epochs_are_shuffled_differently(prepared):
    one_epoch = len(list(_dataset(prepared, num_epochs=1)))
    two = list(_dataset(prepared, num_epochs=2))
    head, tail = _examples(two[: one_epoch // 2]), _examples(two[-(one_epoch // 2) :])
    assert head != tail


def test_restored_iterator_yields_the_following_batches(prepared, tmp_path):
    dataset = _dataset(prepared, seed=5)
    iterator = iter(dataset)
    _take(iterator, 7)
    # What Orbax does with grain's handler inside a CheckpointManager.
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(iterator))
    expected = _take(iterator, 6)
    restored = handler.restore(
        epath.Path(tmp_path), args=grain.checkpoint.CheckpointRestore(iter(dataset))
    )
    _assert_batches_equal(_take(restored, 6), expected)
    again = iter(dataset)
    again.set_state(restored.get_state())
    _assert_batches_equal(_take(again, 2), _take(restored, 2))


def test_host_shards_are_disjoint_and_cover_the_split(prepared):
    def examples(**kwargs):
        return collections.Counter(_examples(_dataset(prepared, num_epochs=1, **kwargs)))

    everything = examples(shard_index=0, shard_count=1)
    first, second = examples(shard_index=0, shard_count=2), examples(shard_index=1, shard_count=2)
    assert first and second and not set(first) & set(second)
    assert first + second == everything
    assert examples() == everything  # Default: jax.process_index() of jax.process_count().


def test_evaluation_split_is_finite_and_padded(prepared):
    dataset = _dataset(prepared, "validation", shuffle=False, num_epochs=1, batch_size=16)
    batches = list(dataset)
    assert batches == batches[:] and len(batches) >= 1
    assert all(b["inputs"].shape == (16, SEQ_LEN) for b in batches)
    assert sum(b["weights"].sum() for b in batches) == prepared.num_tokens("validation")
    last = batches[-1]
    assert (last["weights"].sum(axis=1) == 0).any()  # Zero-weight padding rows.
    _assert_batches_equal(batches, list(dataset))  # Deterministic without shuffling.


def test_bad_arguments_are_user_errors(prepared, tmp_path):
    with pytest.raises(UserError, match="not in the prepared data"):
        _dataset(prepared, "dev")
    with pytest.raises(UserError, match="give both"):
        _dataset(prepared, shard_index=1)
    with pytest.raises(UserError, match="seq_len"):
        _dataset(prepared, seq_len=0)
    with pytest.raises(UserError, match="no manifest.json"):
        make_dataset(str(tmp_path), "train", seq_len=8, batch_size=2)
