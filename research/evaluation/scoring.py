"""Log-probabilities of chosen target tokens, many short sequences packed into jitted batches.

A `Span` is one token sequence and the part of it to score: targets are tokens[1:], and
targets from `score_from` on count. Spans are packed next-fit into rows of `seq_len` inputs
with segment ids (attention stays inside a span) and restarted positions, exactly like
training batches, so one compiled forward serves every task.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.errors import UserError


@dataclasses.dataclass(frozen=True)
class Span:
    """tokens: [n + 1] ids (n <= seq_len inputs); targets tokens[1:][score_from:] are scored."""

    tokens: np.ndarray
    score_from: int = 0


@dataclasses.dataclass(frozen=True)
class SpanScores:
    """Per scored target: log p(target | prefix) (float64) and whether it was the argmax."""

    logprobs: np.ndarray
    correct: np.ndarray


# Positions unembedded at a time: the [B, chunk, V] logits are all that exists of them.
_HEAD_CHUNK = 256
# Tokens per jitted call at most (rows x seq_len): long windows run fewer rows at a time.
_MAX_TOKENS_PER_CALL = 16384


@functools.partial(jax.jit, static_argnames="graphdef")
def _score_rows(graphdef, params, inputs_bt, targets_bt, positions_bt, segment_ids_bt):
    """[B, T] rows -> (log p(target) [B, T] float32, target == argmax [B, T] bool).

    The LM head runs over chunks of positions in a loop, so memory is B x chunk x V, never
    the B x T x V logits of a long window (SmolLM2 at 8k tokens: 1.6 GB a row)."""
    model = nnx.merge(graphdef, params)
    x_btd = model.features(inputs_bt, positions_bt=positions_bt, segment_ids_bt=segment_ids_bt)
    b, t, d = x_btd.shape
    chunk = min(_HEAD_CHUNK, t)
    padded = -(-t // chunk) * chunk
    x_cbkd = jnp.pad(x_btd, ((0, 0), (0, padded - t), (0, 0)))
    x_cbkd = x_cbkd.reshape(b, padded // chunk, chunk, d).transpose(1, 0, 2, 3)
    targets_cbk = jnp.pad(targets_bt, ((0, 0), (0, padded - t)))
    targets_cbk = targets_cbk.reshape(b, padded // chunk, chunk).transpose(1, 0, 2)

    def score(args):
        x_bkd, targets_bk = args
        logits_bkv = model.unembed(x_bkd).astype(jnp.float32)
        log_z_bk = jax.nn.logsumexp(logits_bkv, axis=-1)
        target_bk = jnp.take_along_axis(logits_bkv, targets_bk[..., None], axis=-1)[..., 0]
        return target_bk - log_z_bk, target_bk >= jnp.max(logits_bkv, axis=-1)

    logprobs_cbk, correct_cbk = jax.lax.map(score, (x_cbkd, targets_cbk))
    logprobs_bt = logprobs_cbk.transpose(1, 0, 2).reshape(b, padded)[:, :t]
    correct_bt = correct_cbk.transpose(1, 0, 2).reshape(b, padded)[:, :t]
    return logprobs_bt, correct_bt


def _pack(spans: list[Span], seq_len: int) -> list[list[tuple[int, int]]]:
    """Rows of (span index, start column), next-fit in order."""
    rows, row, used = [], [], 0
    for index, span in enumerate(spans):
        n = len(span.tokens) - 1
        if used + n > seq_len:
            rows.append(row)
            row, used = [], 0
        row.append((index, used))
        used += n
    if row:
        rows.append(row)
    return rows


def score_spans(
    graphdef, params, spans: list[Span], *, seq_len: int, batch_size: int, mesh=None
) -> list[SpanScores]:
    """Scores every span with the model; one compilation per (batch_size, seq_len).

    Args:
      graphdef, params: `nnx.split(model, nnx.Param)` of a Decoder (params may be sharded).
      spans: sequences of 2 to seq_len + 1 tokens.
      seq_len: T, inputs per packed row.
      batch_size: B, rows per jitted call at most (fewer when there are fewer rows, or
        when B x seq_len passes 16,384 tokens: an 8k window runs 2 rows a call).
      mesh: run under this mesh (params sharded on it); None = default device.

    Returns:
      SpanScores per span, in order.
    """
    for span in spans:
        if not 2 <= len(span.tokens) <= seq_len + 1:
            raise UserError(
                f"a scored sequence has {len(span.tokens)} tokens; it needs 2 to "
                f"eval.seq_len + 1 = {seq_len + 1}."
            )
    rows = _pack(spans, seq_len)
    # No call pads more rows than there are, nor holds more than the token budget.
    batch_size = max(1, min(batch_size, len(rows), _MAX_TOKENS_PER_CALL // seq_len))
    results: list[SpanScores | None] = [None] * len(spans)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        arrays = {
            name: np.zeros((batch_size, seq_len), np.int32)
            for name in ("inputs", "targets", "positions", "segment_ids")
        }
        for r, row in enumerate(chunk):
            for segment, (index, column) in enumerate(row, start=1):
                tokens = np.asarray(spans[index].tokens, np.int32)
                n = len(tokens) - 1
                columns = slice(column, column + n)
                arrays["inputs"][r, columns] = tokens[:-1]
                arrays["targets"][r, columns] = tokens[1:]
                arrays["positions"][r, columns] = np.arange(n)
                arrays["segment_ids"][r, columns] = segment
        logprobs_bt, correct_bt = _run(graphdef, params, arrays, mesh)
        for r, row in enumerate(chunk):
            for index, column in row:
                span = spans[index]
                n = len(span.tokens) - 1
                columns = slice(column + span.score_from, column + n)
                results[index] = SpanScores(
                    logprobs=logprobs_bt[r, columns].astype(np.float64),
                    correct=correct_bt[r, columns],
                )
    return results


def _run(graphdef, params, arrays: dict, mesh):
    names = ("inputs", "targets", "positions", "segment_ids")
    if mesh is None:
        out = _score_rows(graphdef, params, *(arrays[n] for n in names))
    else:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        with jax.set_mesh(mesh):
            inputs = [jax.make_array_from_process_local_data(replicated, arrays[n]) for n in names]
            out = _score_rows(graphdef, params, *inputs)
    return tuple(np.asarray(jax.device_get(x)) for x in out)
