"""Per-request sampling settings, as one request (SamplingParams) and as per-slot arrays.

`choose_tokens` turns one row of logits per slot into the next token, for a batch whose slots
each carry their own settings. Per row, in order (the Hugging Face / vLLM order):
  1. penalties: repetition (CTRL, Keskar et al. 2019: logits of tokens seen in the prompt or
     the output are divided by the penalty if positive, multiplied if negative), then
     presence and frequency (OpenAI: minus presence * [count > 0] + frequency * count over
     the output so far);
  2. temperature 0 = greedy (argmax); otherwise logits / temperature;
  3. top-k (keep the k largest), then top-p (the smallest set of most likely tokens whose
     probability under the top-k-renormalized distribution reaches p; Holtzman et al. 2019),
     then min-p (keep tokens with probability >= min_p * the largest);
  4. one uniform draw from key(seed) folded with the token index, inverted through the
     cumulative distribution of the kept tokens.
A row's token depends only on its own logits, settings, counts and (seed, index): never on the
other slots. Ties at a top-k / top-p boundary keep every tied token.

Reported log-probabilities are those of the model's raw distribution, log_softmax(logits),
before penalties and temperature.
"""

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np

from research.errors import RequestError

# Top-k / top-p thresholds come from the CANDIDATES largest logits of a row when they settle
# it (lax.top_k: ~0.15 ms for 8 x 8192 on CPU, a full sort ~9 ms); the rare rest (k larger,
# or a nucleus wider than this) bisects over float values instead.
CANDIDATES = 64
_UINT32_MAX = 2**32 - 1
INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    max_new_tokens: tokens to generate at most (>= 1).
    temperature: 0 = greedy; > 0 samples from softmax(logits / temperature).
    top_k: keep the k most likely tokens (0 = all).
    top_p: nucleus mass in (0, 1] (1 = off).
    min_p: drop tokens below min_p * the top probability, in [0, 1) (0 = off).
    repetition_penalty: > 0 (1 = off); presence_penalty, frequency_penalty: any (0 = off).
    stop_token_ids: generation ends after emitting one of these (e.g. the eos id).
    stop_strings: generation ends when the text contains one; the text stops before it.
    seed: the request's random stream; equal seeds give equal samples whatever else runs.
    num_logprobs: how many top alternatives (token, log-probability) to report per token.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int = 0
    num_logprobs: int = 0

    def check(self, *, vocab_size: int, max_stop_tokens: int, max_logprobs: int) -> None:
        """Raises RequestError naming the first bad field and its valid range.

        These are the sampler's own limits: every value fits its int32 / float32 array and
        keeps the arithmetic finite. The HTTP server checks OpenAI's narrower ranges first.
        """
        checks = (
            ("max_new_tokens", _is_int(self.max_new_tokens, 1, INT32_MAX),
             f"must be an integer in [1, {INT32_MAX}]"),
            ("temperature", self.temperature == 0 or _in(self.temperature, 1e-4, 1e4),
             "must be 0 (greedy) or in [1e-4, 1e4]"),
            ("top_k", _is_int(self.top_k, 0, INT32_MAX),
             f"must be an integer in [0, {INT32_MAX}] (0 keeps every token)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1] (1 turns it off)"),
            ("min_p", 0 <= self.min_p < 1, "must be in [0, 1) (0 turns it off)"),
            ("repetition_penalty", _in(self.repetition_penalty, 1e-4, 1e4),
             "must be in [1e-4, 1e4] (1 turns it off)"),
            ("presence_penalty", _in(self.presence_penalty, -1e4, 1e4), "must be in [-1e4, 1e4]"),
            ("frequency_penalty", _in(self.frequency_penalty, -1e4, 1e4),
             "must be in [-1e4, 1e4]"),
            ("seed", _is_int(self.seed, 0, _UINT32_MAX),
             f"must be an integer in [0, {_UINT32_MAX}]"),
            ("num_logprobs", _is_int(self.num_logprobs, 0, max_logprobs), f"must be in [0, "
             f"{max_logprobs}] (the sampler's num_top_logprobs)"),
        )  # fmt: skip
        for name, ok, rule in checks:
            if not ok:
                raise RequestError(name, getattr(self, name), rule)
        unknown = [t for t in self.stop_token_ids if not _is_int(t, 0, vocab_size - 1)]
        if unknown:
            raise RequestError(
                "stop_token_ids",
                unknown,
                f"must be token ids in [0, {vocab_size}) (the vocabulary)",
            )
        if len(set(self.stop_token_ids)) > max_stop_tokens:
            raise RequestError(
                "stop_token_ids",
                self.stop_token_ids,
                f"holds {len(set(self.stop_token_ids))} ids; at most {max_stop_tokens} fit (the "
                "sampler's max_stop_tokens)",
            )
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise RequestError("stop_strings", self.stop_strings, "must be non-empty strings")


def _in(value, low: float, high: float) -> bool:
    """A finite number in [low, high] (NaN and infinities fail every comparison here)."""
    return isinstance(value, (int, float, np.number)) and bool(low <= value <= high)


def _is_int(value, low: int, high: int) -> bool:
    return (
        isinstance(value, (int, np.integer))
        and not isinstance(value, bool)
        and low <= value <= high
    )


@flax.struct.dataclass
class SlotParams:
    """SamplingParams of every slot as arrays: [B] each, stop_token_ids [B, max_stop_tokens]
    (-1 = unused). Slots with different settings share one jitted batch."""

    temperature: jax.Array  # float32
    top_k: jax.Array  # int32
    top_p: jax.Array  # float32
    min_p: jax.Array  # float32
    repetition_penalty: jax.Array  # float32
    presence_penalty: jax.Array  # float32
    frequency_penalty: jax.Array  # float32
    max_new_tokens: jax.Array  # int32
    stop_token_ids: jax.Array  # int32 [B, max_stop_tokens]
    seed: jax.Array  # uint32
    num_logprobs: jax.Array  # int32: alternatives the request reports (top-k runs if any).


def slot_params(requests: list[SamplingParams], max_stop_tokens: int) -> SlotParams:
    """Host-side (NumPy) SlotParams with one row per request."""

    def column(name, dtype):
        return np.asarray([getattr(r, name) for r in requests], dtype)

    stops = np.full((len(requests), max_stop_tokens), -1, np.int32)
    for row, request in enumerate(requests):
        ids = sorted(set(int(t) for t in request.stop_token_ids))
        stops[row, : len(ids)] = ids
    return SlotParams(
        temperature=column("temperature", np.float32),
        top_k=column("top_k", np.int32),
        top_p=column("top_p", np.float32),
        min_p=column("min_p", np.float32),
        repetition_penalty=column("repetition_penalty", np.float32),
        presence_penalty=column("presence_penalty", np.float32),
        frequency_penalty=column("frequency_penalty", np.float32),
        max_new_tokens=column("max_new_tokens", np.int32),
        stop_token_ids=stops,
        seed=column("seed", np.uint32),
        num_logprobs=column("num_logprobs", np.int32),
    )


def first_index_of_max(x_bv: jax.Array) -> jax.Array:
    """argmax over the last axis (first index on ties), [B, V] -> [B] int32.

    max + min-of-iota: two plain reductions, ~7x faster on XLA:CPU than jnp.argmax's
    variadic reduce.
    """
    v = x_bv.shape[-1]
    is_max = x_bv == jnp.max(x_bv, axis=-1, keepdims=True)
    return jnp.min(jnp.where(is_max, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


def apply_penalties(logits_bv, params: SlotParams, output_counts_bv, seen_bv):
    """Repetition, presence and frequency penalties (module docstring), [B, V] float32."""
    penalty_b1 = params.repetition_penalty[:, None]
    penalized = jnp.where(logits_bv > 0, logits_bv / penalty_b1, logits_bv * penalty_b1)
    logits_bv = jnp.where(seen_bv, penalized, logits_bv)
    counts_bv = output_counts_bv.astype(jnp.float32)
    return (
        logits_bv
        - params.frequency_penalty[:, None] * counts_bv
        - params.presence_penalty[:, None] * (counts_bv > 0)
    )


def _orderable(x):
    """float32 -> int32 with the same order (sign-magnitude to two's complement)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _from_orderable(key):
    bits = jnp.where(key < 0, key ^ jnp.int32(0x7FFFFFFF), key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _smallest_value_where(x_bv, predicate):
    """Per row of x, the smallest finite float t with predicate(t) True, for a predicate that
    is False below some t and True from it on: 32 exact bisection steps over the bit
    patterns. predicate: [B, 1] float32 -> [B] bool."""
    b = x_bv.shape[0]
    low = jnp.full((b,), _orderable(jnp.float32(-jnp.finfo(jnp.float32).max)), jnp.int32)
    high = jnp.full((b,), _orderable(jnp.float32(jnp.finfo(jnp.float32).max)), jnp.int32)

    def body(_, bounds):
        low, high = bounds
        middle = (low >> 1) + (high >> 1) + (low & high & 1)  # floor((low + high) / 2)
        ok = predicate(_from_orderable(middle)[:, None])
        return jnp.where(ok, low, middle + 1), jnp.where(ok, middle, high)

    low, _ = jax.lax.fori_loop(0, 32, body, (low, high))
    return _from_orderable(low)


def _thresholds(x_bv, top_k_b, top_p_b):
    """The smallest kept logit per row for top-k then top-p ([B] float32, -inf = keep all)."""
    v = x_bv.shape[-1]
    candidates = min(CANDIDATES, v)
    k_b = jnp.where((top_k_b <= 0) | (top_k_b >= v), v, top_k_b)
    values_bc, _ = jax.lax.top_k(x_bv, candidates)

    # Top-k: the k-th largest value, read from the candidates when k fits.
    k_fits_b = k_b <= candidates
    kth_b = jnp.take_along_axis(values_bc, jnp.clip(k_b - 1, 0, candidates - 1)[:, None], -1)[:, 0]
    kth_fast_b = jnp.where(k_b >= v, -jnp.inf, kth_b)

    def kth_slow():
        # count(x >= t) >= k holds up to the k-th largest value; bisect over s = -t, for
        # which it holds from -kth on.
        negated_b = _smallest_value_where(x_bv, lambda s: jnp.sum(x_bv >= -s, axis=-1) >= k_b)
        return jnp.where(k_b >= v, -jnp.inf, -negated_b)

    need_kth = jnp.any(~k_fits_b)
    kth_b = jnp.where(k_fits_b, kth_fast_b, jax.lax.cond(need_kth, kth_slow, lambda: kth_fast_b))

    # Top-p over the top-k-renormalized distribution. Candidate c is kept iff the mass
    # strictly before it is < p; the threshold is the last kept candidate's logit.
    kept_bv = x_bv >= kth_b[:, None]
    log_z_b = jax.nn.logsumexp(jnp.where(kept_bv, x_bv, -jnp.inf), axis=-1)
    probs_bc = jnp.exp(values_bc - log_z_b[:, None])
    probs_bc = jnp.where(values_bc >= kth_b[:, None], probs_bc, 0.0)
    cumulative_bc = jnp.cumsum(probs_bc, axis=-1)
    kept_bc = (cumulative_bc - probs_bc < top_p_b[:, None]) & (probs_bc > 0)
    num_kept_b = jnp.sum(kept_bc, axis=-1)
    nucleus_b = jnp.take_along_axis(values_bc, jnp.maximum(num_kept_b - 1, 0)[:, None], -1)[:, 0]
    # Settled by the candidates: top-p off, or the candidates' mass already reaches p, or
    # every top-k token is a candidate.
    p_off_b = top_p_b >= 1.0
    p_fits_b = p_off_b | (cumulative_bc[:, -1] >= top_p_b) | (k_b <= candidates)
    nucleus_fast_b = jnp.where(p_off_b, -jnp.inf, nucleus_b)

    def nucleus_slow():  # Mass strictly above t < p holds from the nucleus's last logit up.
        probs_bv = jnp.where(kept_bv, jnp.exp(x_bv - log_z_b[:, None]), 0.0)

        def mass_above_is_small(t_b1):
            return jnp.sum(jnp.where(x_bv > t_b1, probs_bv, 0.0), axis=-1) < top_p_b

        return jnp.where(p_off_b, -jnp.inf, _smallest_value_where(x_bv, mass_above_is_small))

    need_nucleus = jnp.any(~p_fits_b)
    nucleus_slow_b = jax.lax.cond(need_nucleus, nucleus_slow, lambda: nucleus_fast_b)
    return jnp.maximum(kth_b, jnp.where(p_fits_b, nucleus_fast_b, nucleus_slow_b))


def keep_mask(x_bv, params: SlotParams):
    """[B, V] bool: the tokens top-k, top-p and min-p keep (x: logits after temperature)."""
    threshold_b = _thresholds(x_bv, params.top_k, params.top_p)
    # min-p: p >= min_p * p_max  <=>  x >= x_max + log(min_p).
    min_p_floor_b = jnp.max(x_bv, axis=-1) + jnp.log(params.min_p)  # log(0) = -inf: off.
    return x_bv >= jnp.maximum(threshold_b, min_p_floor_b)[:, None]


def _uniform(seed_b, index_b):
    """One U(0, 1) draw per row from key(seed) folded with the token index."""

    def draw(seed, index):
        key = jax.random.fold_in(jax.random.key(seed), index)
        return jax.random.uniform(key, (), jnp.float32, minval=jnp.finfo(jnp.float32).tiny)

    return jax.vmap(draw)(seed_b, index_b)


def _sample_rows(x_bv, params: SlotParams, token_index_b):
    """Temperature, filters and an inverse-CDF draw for every row ([B] int32)."""
    # Greedy rows are decided elsewhere: here they get neutral settings, so that they neither
    # overflow (x / 0) nor switch on the filtering of the whole batch.
    sampling_b = params.temperature > 0
    params = params.replace(
        top_k=jnp.where(sampling_b, params.top_k, 0),
        top_p=jnp.where(sampling_b, params.top_p, 1.0),
        min_p=jnp.where(sampling_b, params.min_p, 0.0),
    )
    x_bv = x_bv / jnp.where(sampling_b, params.temperature, 1.0)[:, None]
    filtering = jnp.any((params.top_k > 0) | (params.top_p < 1.0) | (params.min_p > 0.0))
    keep_bv = jax.lax.cond(
        filtering, lambda: keep_mask(x_bv, params), lambda: jnp.ones(x_bv.shape, bool)
    )
    weights_bv = jnp.where(keep_bv, jnp.exp(x_bv - jnp.max(x_bv, axis=-1, keepdims=True)), 0.0)
    cdf_bv = jnp.cumsum(weights_bv, axis=-1)
    target_b = _uniform(params.seed, token_index_b) * cdf_bv[:, -1]
    # The first index whose cumulative weight reaches the draw; kept tokens only (a dropped
    # token adds no weight, so the cdf cannot cross the draw there).
    index_b = jnp.sum(cdf_bv < target_b[:, None], axis=-1).astype(jnp.int32)
    return jnp.minimum(index_b, x_bv.shape[-1] - 1)


def choose_tokens(
    logits_bv, params: SlotParams, output_counts_bv, seen_bv, token_index_b, num_top_logprobs
):
    """The next token of every slot, with log-probabilities.

    Args:
      logits_bv: [B, V] float32 raw logits.
      params: SlotParams with B rows.
      output_counts_bv: [B, V] int32 how often each token was generated so far.
      seen_bv: [B, V] bool tokens in the prompt or the output (repetition penalty).
      token_index_b: [B] int32 index of the token being chosen among the new ones (from 0);
        with the seed it picks the random draw.
      num_top_logprobs: static N of top alternatives to return (0 = none).

    Returns:
      (tokens [B] int32, logprobs [B] float32, top_ids [B, N] int32, top_logprobs [B, N]).
    """
    logits_bv = logits_bv.astype(jnp.float32)
    penalized = jnp.any(
        (params.repetition_penalty != 1.0)
        | (params.presence_penalty != 0.0)
        | (params.frequency_penalty != 0.0)
    )
    x_bv = jax.lax.cond(
        penalized,
        lambda: apply_penalties(logits_bv, params, output_counts_bv, seen_bv),
        lambda: logits_bv,
    )
    greedy_b = first_index_of_max(x_bv)
    sampling = jnp.any(params.temperature > 0)
    sampled_b = jax.lax.cond(
        sampling, lambda: _sample_rows(x_bv, params, token_index_b), lambda: greedy_b
    )
    tokens_b = jnp.where(params.temperature > 0, sampled_b, greedy_b)
    log_z_b = jax.nn.logsumexp(logits_bv, axis=-1)
    chosen_b = jnp.take_along_axis(logits_bv, tokens_b[:, None], axis=-1)[:, 0] - log_z_b
    if num_top_logprobs:
        # Ranking the vocabulary costs ~8% of a batch-1 SmolLM2 step: only when a row asks.
        def ranked():
            values_bn, ids_bn = jax.lax.top_k(logits_bv, num_top_logprobs)
            return values_bn - log_z_b[:, None], ids_bn

        def unranked():
            b = logits_bv.shape[0]
            return jnp.zeros((b, num_top_logprobs)), jnp.zeros((b, num_top_logprobs), jnp.int32)

        wanted = jnp.any(params.num_logprobs > 0)
        top_logprobs_bn, top_ids_bn = jax.lax.cond(wanted, ranked, unranked)
    else:
        b = logits_bv.shape[0]
        top_ids_bn, top_logprobs_bn = jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0))
    return tokens_b, chosen_b, top_ids_bn.astype(jnp.int32), top_logprobs_bn
