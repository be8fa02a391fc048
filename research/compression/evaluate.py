"""How much a compressed model drifts from its original, on shipped held-out English.

As llama.cpp's `perplexity --kl-divergence`: the held-out tokens are cut into non-overlapping
windows of `window` tokens, and only each window's second half is scored (positions
window//2 .. window-2, each predicting the next token), so every scored token has at least
window//2 tokens of context. Per scored position, against the reference (float) model:
  ppl   exp(mean NLL of the true next token),
  kl    KL(p_ref || p_cand) of the next-token distributions, in nats (mean),
  top1  fraction of positions where both models' argmax agree.
`gguf_baseline` makes the comparison points: the same model through the `gguf` package's own
Q8_0 / Q4_0 / Q4_1 round trip, i.e. what llama.cpp's quantizer would do to each matrix.

The text (research/compression/heldout/english.txt, sources in SOURCES.md there) is two
public-domain novels, in no Cirrus training split.
"""

import functools
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

HELDOUT_PATH = pathlib.Path(__file__).parent / "heldout" / "english.txt"


def heldout_text() -> str:
    """The shipped held-out English text (about 515 KB)."""
    return HELDOUT_PATH.read_text(encoding="utf-8")


def heldout_tokens(tokenizer, *, max_tokens: int | None = None) -> np.ndarray:
    """The held-out text as `tokenizer.encode` gives it (no bos), first `max_tokens` only.

    No bos is added: windows are scored on their second half only, so what the first token
    of a window sees (or lacks) does not enter the figures. Returns [L] int32.
    """
    ids = np.asarray(tokenizer.encode(heldout_text()), np.int32)
    return ids if max_tokens is None else ids[:max_tokens]


def scored_per_window(window: int) -> int:
    """Positions scored in one window: window//2 .. window-2, i.e. window - window//2 - 1."""
    return window - window // 2 - 1


def _scored_logprobs(graphdef, params, tokens_bt):
    """[B, T] tokens -> (log-softmax [B, S, V] float32, targets [B, S]) of the scored part
    (S = scored_per_window(T)): logits at positions T//2 .. T-2, targets the tokens after."""
    t = tokens_bt.shape[1]
    model = nnx.merge(graphdef, params)
    x_btd = model.features(tokens_bt)
    logits_bsv = model.unembed(x_btd[:, t // 2 : t - 1]).astype(jnp.float32)
    return jax.nn.log_softmax(logits_bsv, axis=-1), tokens_bt[:, t // 2 + 1 :]


def _nll_sum(logp_bsv, targets_bs, valid_b):
    nll_bs = -jnp.take_along_axis(logp_bsv, targets_bs[..., None], axis=-1)[..., 0]
    return jnp.sum(nll_bs * valid_b[:, None])


@functools.partial(jax.jit, static_argnums=0)
def _reference_scores(graphdef, params, tokens_bt, valid_b):
    """-> (log p [B, S, V] float32, summed NLL): the log-probs stay on device. valid_b: [B]
    float32, 1 for a real window, 0 for a pad row of the last batch. The graphdef is static:
    float models of one shape share the compiled code."""
    logp_bsv, targets_bs = _scored_logprobs(graphdef, params, tokens_bt)
    return logp_bsv, _nll_sum(logp_bsv, targets_bs, valid_b)


@functools.partial(jax.jit, static_argnums=0)
def _candidate_scores(graphdef, params, tokens_bt, valid_b, ref_logp_bsv):
    """-> (summed NLL, summed KL(ref || cand), count of equal argmax), float32 scalars."""
    logp_bsv, targets_bs = _scored_logprobs(graphdef, params, tokens_bt)
    kl_bs = jnp.sum(jnp.exp(ref_logp_bsv) * (ref_logp_bsv - logp_bsv), axis=-1)
    same_bs = jnp.argmax(logp_bsv, axis=-1) == jnp.argmax(ref_logp_bsv, axis=-1)
    return (
        _nll_sum(logp_bsv, targets_bs, valid_b),
        jnp.sum(kl_bs * valid_b[:, None]),
        jnp.sum(same_bs * valid_b[:, None]),
    )


def compare(reference, candidates: dict, tokens, *, window: int = 512, batch: int = 4, log=print):
    """Perplexity of `reference` and each candidate's drift from it, llama.cpp style.

    Args:
      reference: the model to compare against (a LoadedModel: .graphdef, .params).
      candidates: name -> model of the same vocabulary (float or quantized params).
      tokens: [L] int token ids (e.g. heldout_tokens); cut into L // window windows, the
        remainder dropped.
      window: T, tokens per window; positions T//2 .. T-2 of each are scored.
      batch: windows per forward pass.
      log: progress lines (windows done / total, tokens per second).

    Returns:
      {"reference": {"ppl", "scored_tokens", "windows"},
       name: {"ppl", "dppl_pct" (100 * (ppl / ref ppl - 1)), "kl" (mean nats),
              "top1" (fraction), "scored_tokens"}} with Python floats and ints.
    """
    tokens = np.asarray(tokens, np.int32)
    windows = len(tokens) // window
    if windows < 1 or scored_per_window(window) < 1:
        raise ValueError(f"{len(tokens)} tokens make no window of {window} with a scored half.")
    windows_wt = tokens[: windows * window].reshape(windows, window)
    batch = min(batch, windows)
    ref_nll = 0.0
    sums = {name: np.zeros(3) for name in candidates}  # NLL, KL, top-1 count.
    start = time.perf_counter()
    for first in range(0, windows, batch):
        chunk_bt = windows_wt[first : first + batch]
        n = len(chunk_bt)
        valid_b = (np.arange(batch) < n).astype(np.float32)
        if n < batch:  # The last batch: pad rows (repeats) keep the compiled shape, weigh 0.
            chunk_bt = np.concatenate([chunk_bt, np.repeat(chunk_bt[-1:], batch - n, axis=0)])
        ref_logp_bsv, nll = _reference_scores(
            reference.graphdef, reference.params, chunk_bt, valid_b
        )
        ref_nll += float(nll)
        for name, model in candidates.items():
            out = _candidate_scores(model.graphdef, model.params, chunk_bt, valid_b, ref_logp_bsv)
            sums[name] += np.array([float(x) for x in out])
        done = first + n
        elapsed = time.perf_counter() - start
        models = 1 + len(candidates)
        rate = done * window * models / max(elapsed, 1e-9)
        log(f"compare: {done}/{windows} windows, {rate:,.0f} tokens/s ({models} models)")
    count = windows * scored_per_window(window)
    ref_ppl = math.exp(ref_nll / count)
    result = {"reference": {"ppl": ref_ppl, "scored_tokens": count, "windows": windows}}
    for name, (nll, kl, same) in sums.items():
        ppl = math.exp(nll / count)
        result[name] = {
            "ppl": ppl,
            "dppl_pct": 100.0 * (ppl / ref_ppl - 1.0),
            "kl": kl / count,
            "top1": same / count,
            "scored_tokens": count,
        }
    return result


def _gguf_round_trip(matrix_nk: np.ndarray, qtype) -> np.ndarray:
    """[N, K] float32, GGUF blocks of 32 along K -> the gguf package's quantize, dequantize."""
    from gguf import quants

    data = quants.quantize(np.ascontiguousarray(matrix_nk, np.float32), qtype)
    return quants.dequantize(data, qtype).astype(np.float32).reshape(matrix_nk.shape)


def gguf_baseline(model_config, params, kind: str):
    """`params` with every matrix through llama.cpp's quantizer and back (the gguf package).

    kind: "q8_0", "q4_0" or "q4_1". GGUF blocks of 32 run along a matrix's contiguous axis as
    llama.cpp stores it, the input axis: a Dense kernel [*in, *out] is viewed as [K, N] and
    transposed to [N, K] for the round trip; a table (the embedding [V, D], learned
    positions) runs along its last axis as it is. Parameters with ndim < 2 (norms, biases)
    stay as they are. Block axes must be multiples of 32 (SmolLM2: 576, 1536, 9 x 64), or
    gguf raises.
    model_config: the float model's config (which kernels have several input axes).
    params: a float nnx.State (or its pure dict); returns the same kind, float32 arrays.
    """
    import gguf

    from research.compression.quantize import dense_input_shapes

    types = gguf.GGMLQuantizationType
    qtype = {"q8_0": types.Q8_0, "q4_0": types.Q4_0, "q4_1": types.Q4_1}.get(kind)
    if qtype is None:
        raise ValueError(f"gguf_baseline kind {kind!r}: use 'q8_0', 'q4_0' or 'q4_1'.")
    in_shapes = dense_input_shapes(model_config)
    is_state = hasattr(params, "to_pure_dict")
    source = params.to_pure_dict() if is_state else params

    def walk(node, path):
        out = {}
        for key, value in node.items():
            here = (*path, key)
            if isinstance(value, dict):
                out[key] = walk(value, here)
                continue
            w = np.asarray(value, np.float32)
            if w.ndim < 2:
                out[key] = w
            elif key == "kernel":  # A Dense [*in, *out] -> [K, N] -> [N, K] blocks along K.
                w_kn = w.reshape(math.prod(in_shapes[here]), -1)
                out[key] = _gguf_round_trip(w_kn.T, qtype).T.reshape(w.shape)
            else:  # A table ("embedding", "embedding") [V, D]: blocks along D already.
                out[key] = _gguf_round_trip(w.reshape(-1, w.shape[-1]), qtype).reshape(w.shape)
        return out

    result = walk(source, ())
    if not is_state:
        return result
    state = jax.tree.map(lambda x: x, params)  # A copy of the structure; leaves replaced.
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, result))
    return state
