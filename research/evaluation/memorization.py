"""Memorisation: does the model reproduce its training text verbatim?

The extraction test of Carlini et al. 2023 ("Quantifying Memorization Across Neural Language
Models", section 2): windows of P + S tokens drawn (seeded) from the run's prepared train
split; the model gets the P-token prefix and continues greedily for S tokens; a window counts
as memorised when all S tokens equal the training text. Also reported: the mean number of
leading suffix tokens reproduced (0..S), which moves before the exact rate does.

    snippets = training_snippets(data_dir, num_snippets=32, prefix_len=32, suffix_len=32)
    metrics = evaluate_memorization(sampler, snippets, prefix_len=32)
    # {"exact_fraction": 0.0625, "mean_matched_tokens": 9.4, "snippets": 32, ...}

Documents are read as training reads them (research/data/pipeline.py): bos first where the
tokenizer puts it, eos last, chat records without their loss bits.
"""

import numpy as np

from research.data import shards
from research.data.prepare import load_prepared
from research.errors import UserError
from research.serving import SamplingParams, complete

SPLIT = "train"


def training_snippets(
    data_dir: str, *, num_snippets: int, prefix_len: int, suffix_len: int, seed: int = 0
) -> np.ndarray:
    """[N, P + S] int32 token windows of the train split, N = min(num_snippets, windows).

    Windows are drawn uniformly without replacement among every (document, offset) whose
    P + S tokens lie inside one document; the same seed gives the same windows.
    """
    prepared = load_prepared(data_dir)
    if SPLIT not in prepared.manifest["splits"]:
        raise UserError(
            f"{data_dir} has no {SPLIT!r} split to check memorisation against; set "
            "eval.memorization_snippets = 0."
        )
    window = prefix_len + suffix_len
    bos = [prepared.manifest["tokenizer"]["bos_id"]] if _adds_bos(prepared.manifest) else []
    lengths = shards.document_lengths(prepared.directory, SPLIT) + len(bos)
    counts = np.maximum(lengths - window + 1, 0)
    total = int(counts.sum())
    if total == 0:
        raise UserError(
            f"no training document has eval.memorization_prefix + eval.memorization_suffix = "
            f"{window} tokens (the longest has {int(lengths.max(initial=0))}); lower them."
        )
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(total, size=min(num_snippets, total), replace=False))
    ends = np.cumsum(counts)
    documents = np.searchsorted(ends, picks, side="right")
    offsets = picks - (ends[documents] - counts[documents])
    source = shards.open_split(prepared.directory, SPLIT)
    rows = []
    for document, offset in zip(documents, offsets, strict=True):
        ids = shards.decode_record(source[int(document)])
        if prepared.manifest.get("loss_bits"):
            ids = shards.split_loss_bits(ids)[0]
        ids = np.concatenate([np.asarray(bos, np.int32), ids])
        rows.append(ids[offset : offset + window])
    order = rng.permutation(len(rows))  # Not grouped by document.
    return np.stack([rows[i] for i in order]).astype(np.int32)


def _adds_bos(manifest: dict) -> bool:
    # The pipeline's rule (pipeline.py): bos before each document unless the tokenizer
    # does not put one first (manifest "add_bos" False) or chat data (the template does).
    return manifest["tokenizer"].get("add_bos", True) and not manifest.get("loss_bits")


def matched_lengths(generated: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """[N] leading tokens of each generated row equal to its reference row ([N, S] each)."""
    equal = np.asarray(generated) == np.asarray(reference)
    return np.cumprod(equal, axis=1).sum(axis=1)


def summarize(lengths: np.ndarray, suffix_len: int) -> dict:
    """{"exact_fraction", "mean_matched_tokens", "snippets"} of [N] matched lengths."""
    lengths = np.asarray(lengths)
    count = max(len(lengths), 1)
    return {
        "exact_fraction": float((lengths == suffix_len).sum() / count),
        "mean_matched_tokens": float(lengths.sum() / count),
        "snippets": len(lengths),
    }


def evaluate_memorization(sampler, snippets: np.ndarray, *, prefix_len: int) -> dict:
    """Greedy continuation of each snippet's first prefix_len tokens for the rest of it
    (research.serving.complete on `sampler`; no stop tokens, so every row gets S tokens).

    Returns summarize()'s metrics plus "prefix_tokens" and "suffix_tokens".
    """
    suffix_len = snippets.shape[1] - prefix_len
    if snippets.shape[1] > sampler.max_len:
        raise UserError(
            f"eval.memorization_prefix + eval.memorization_suffix = {snippets.shape[1]} tokens "
            f"exceed the model's context ({sampler.max_len}); lower them."
        )
    request = SamplingParams(max_new_tokens=suffix_len, temperature=0.0)
    completions = complete(sampler, [row[:prefix_len].tolist() for row in snippets], request)
    generated = np.full((len(snippets), suffix_len), -1, np.int64)
    for row, completion in zip(generated, completions, strict=True):
        tokens = completion.token_ids[:suffix_len]
        row[: len(tokens)] = tokens
    lengths = matched_lengths(generated, snippets[:, prefix_len:])
    return {
        **summarize(lengths, suffix_len),
        "prefix_tokens": prefix_len,
        "suffix_tokens": suffix_len,
    }
