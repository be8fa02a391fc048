"""Two models of one vocabulary on one prompt: how far apart their next-token distributions
are at each position.

    result = compare(base, other, ids)      # LoadedModels (research.checkpoint.load)
    result.order[:10]                       # the positions that changed most, by KL

KL(base || other) = sum_v p_base(v) (log p_base(v) - log p_other(v)), in nats, per position
(the drift measure of research/compression/evaluate.py, here unaveraged).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.errors import UserError


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Position t compares the two predictions of token t + 1 (T positions)."""

    kl: np.ndarray  # [T] float64: KL(base || other) in nats.
    base_top1: np.ndarray  # [T] int32: each model's most likely next token.
    other_top1: np.ndarray  # [T] int32.
    changed: np.ndarray  # [T] bool: the most likely next token differs.
    order: np.ndarray  # [T] int: positions by KL, largest first (ties by position).


def next_token_logprobs(loaded, token_ids) -> np.ndarray:
    """[T] prompt ids -> [T, V] float32 log-probabilities of the next token (a plain
    forward pass: nothing captured)."""
    tokens_1t = np.asarray(token_ids, np.int32).reshape(1, -1)
    return np.asarray(_logprobs(loaded.graphdef, loaded.params, tokens_1t))


@functools.partial(jax.jit, static_argnums=0)
def _logprobs(graphdef, params, tokens_1t):
    logits_1tv = nnx.merge(graphdef, params)(tokens_1t)
    return jax.nn.log_softmax(logits_1tv[0].astype(jnp.float32), axis=-1)


def compare_logprobs(base_tv: np.ndarray, other_tv: np.ndarray) -> Comparison:
    """The Comparison of two [T, V] log-probability arrays (float64 arithmetic)."""
    base_tv, other_tv = np.asarray(base_tv, np.float64), np.asarray(other_tv, np.float64)
    if base_tv.shape != other_tv.shape:
        raise UserError(f"log-probabilities {base_tv.shape} and {other_tv.shape} differ in shape.")
    p_tv = np.exp(base_tv)
    kl = np.sum(np.where(p_tv > 0, p_tv * (base_tv - other_tv), 0.0), axis=-1)
    kl = np.maximum(kl, 0.0)  # Rounding can leave -1e-17 where the two are equal.
    base_top1 = np.argmax(base_tv, axis=-1).astype(np.int32)
    other_top1 = np.argmax(other_tv, axis=-1).astype(np.int32)
    return Comparison(
        kl=kl,
        base_top1=base_top1,
        other_top1=other_top1,
        changed=base_top1 != other_top1,
        order=np.argsort(-kl, kind="stable"),
    )


def check_same_vocabulary(base, other, *, base_name: str = "base", other_name: str = "other"):
    """A UserError unless the two LoadedModels share the vocabulary: equal vocab sizes and,
    where both have a tokenizer, the same tokens, ids and bos convention."""
    base_size, other_size = base.model_config.vocab_size, other.model_config.vocab_size
    if base_size != other_size:
        raise UserError(
            f"{base_name} has a vocabulary of {base_size} tokens and {other_name} {other_size}; "
            "compare models that share one tokenizer (e.g. a model and its compressed or "
            "fine-tuned variant)."
        )
    if base.tokenizer is None or other.tokenizer is None:
        return
    base_vocab = base.tokenizer.hf_tokenizer.get_vocab(with_added_tokens=True)
    other_vocab = other.tokenizer.hf_tokenizer.get_vocab(with_added_tokens=True)
    if base_vocab != other_vocab:
        differing = sorted(set(base_vocab.items()) ^ set(other_vocab.items()))[:3]
        raise UserError(
            f"{base_name} and {other_name} have different tokenizers (e.g. {differing}); "
            "compare models that share one tokenizer."
        )
    if base.tokenizer.add_bos != other.tokenizer.add_bos:
        raise UserError(
            f"{base_name} and {other_name} share the tokens but not the convention: one puts "
            "bos first and the other does not; the prompt would differ."
        )


def compare(base, other, token_ids) -> Comparison:
    """KL(base || other) and top-1 changes at every position of one prompt ([T] ids, as the
    base tokenizer encodes it); a UserError unless the models share the vocabulary."""
    check_same_vocabulary(base, other)
    return compare_logprobs(
        next_token_logprobs(base, token_ids), next_token_logprobs(other, token_ids)
    )
