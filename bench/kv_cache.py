"""The int8 KV cache on the model users run (SmolLM2-135M-Instruct from the bundled GGUF):
quality against the fp32 cache at a 2k context, cache bytes, and decode speed, in one run.

  .venv/bin/python bench/kv_cache.py [--windows 8] [--reps 3] [--rounds 2]

Quality: the held-out text (research/compression/heldout) cut into --windows windows of
2,048 tokens. Each window's first 1,024 tokens go into a slot through `Sampler.extend` (the
prompt path: written, then attended to, through the cache); the next 1,023 are fed one per
step through `kv_cache.decode_step` (the step `Sampler.generate` runs), teacher-forced, and
the logits at positions 1,024 .. 2,046 score the token after each (research/compression/
evaluate.py's convention: every scored token has at least 1,024 tokens of context). The fp32
and the int8 cache run side by side in one jitted scan, so per position: NLL of each, KL(fp32
|| int8) and whether their argmax agree; the perplexity change is also given per window and
with the standard error of the mean NLL change (tokens taken as independent). The fp32
cache's perplexity is checked against the full forward (evaluate.compare) on the same
windows.

Speed: greedy decode tokens/s through `Sampler.generate` (16 steps a call) at batch 1 and at
16 slots, with every slot at a 1,920-token context (max_len 2,048: the decode reads all 2,048
keys), fp32 then int8 cache, interleaved over --rounds; each figure is the median of --reps
calls, best of rounds. The slots are made live by `activate` without a prefill (a decode step
costs the same whatever the cache holds). The last line is one JSON object.
"""

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.serve import smollm2_gguf  # noqa: E402
from research.checkpoint.load import load  # noqa: E402
from research.compression import evaluate  # noqa: E402
from research.serving import Sampler, SamplingParams  # noqa: E402
from research.serving.core import kv_cache  # noqa: E402

WINDOW, PROMPT = 2048, 1024
CONTEXT, STEPS = 1920, 16


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cache_bytes(cache) -> int:
    return sum(a.nbytes for a in jax.tree.leaves(cache))


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(2, 3))
def _teacher_forced(graphdef, params, cache_ref, cache_int8, tokens_ws, start):
    """Feeds tokens_ws[:, i] at position start + i through both caches. Returns per window
    [W, 5] the sums over steps of (NLL fp32, NLL int8, KL(fp32 || int8), same argmax,
    (NLL int8 - NLL fp32)^2) of the next token, and the caches (donated: updated in place)."""
    model = nnx.merge(graphdef, params)
    w = tokens_ws.shape[0]
    writes_w = jnp.ones((w,), bool)

    def step(caches, i):
        cache_ref, cache_int8 = caches
        positions_w = jnp.full((w,), start + i, jnp.int32)
        token_w, target_w = tokens_ws[:, i], tokens_ws[:, i + 1]
        ref_wv, cache_ref = kv_cache.decode_step(model, token_w, positions_w, writes_w, cache_ref)
        q_wv, cache_int8 = kv_cache.decode_step(model, token_w, positions_w, writes_w, cache_int8)
        ref_wv, q_wv = jax.nn.log_softmax(ref_wv, -1), jax.nn.log_softmax(q_wv, -1)
        nll = [-jnp.take_along_axis(x, target_w[:, None], -1)[:, 0] for x in (ref_wv, q_wv)]
        kl_w = jnp.sum(jnp.exp(ref_wv) * (ref_wv - q_wv), -1)
        same_w = jnp.argmax(ref_wv, -1) == jnp.argmax(q_wv, -1)
        sums_w5 = jnp.stack([nll[0], nll[1], kl_w, same_w, (nll[1] - nll[0]) ** 2], -1)
        return (cache_ref, cache_int8), sums_w5

    steps = jnp.arange(tokens_ws.shape[1] - 1)
    caches, sums_sw5 = jax.lax.scan(step, (cache_ref, cache_int8), steps)
    return sums_sw5.sum(0), caches


def quality(loaded, windows_wt: np.ndarray) -> dict:
    """ppl of each cache, KL, top-1 and cache bytes over the windows (see the docstring)."""
    w = len(windows_wt)
    caches, result = [], {}
    for kv_dtype in ("auto", "int8"):
        sampler = Sampler(
            loaded.model_config, loaded.graphdef, loaded.params, num_slots=w, max_len=WINDOW,
            kv_dtype=kv_dtype,
        )  # fmt: skip
        start = time.perf_counter()
        state = sampler.init_state()
        result[f"{kv_dtype}_cache_bytes"] = cache_bytes(state.cache)
        rows = [(slot, list(windows_wt[slot, :PROMPT]), 0) for slot in range(w)]
        state, _ = sampler.extend(state, rows, bucket=PROMPT)
        caches.append(jax.block_until_ready(state.cache))
        _log(f"{kv_dtype}: {w} prompts of {PROMPT} in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    sums_w5, _ = _teacher_forced(
        loaded.graphdef, loaded.params, *caches, windows_wt[:, PROMPT:], np.int32(PROMPT)
    )
    sums_w5 = np.asarray(sums_w5, np.float64)
    nll_ref, nll_int8, kl, same, squares = sums_w5.sum(0)
    per_window = WINDOW - PROMPT - 1
    count = w * per_window
    seconds = time.perf_counter() - start
    _log(f"teacher-forced decode of {count} positions x 2 caches: {seconds:.1f} s")
    ppl_ref, ppl_int8 = math.exp(nll_ref / count), math.exp(nll_int8 / count)
    # Standard error of the mean per-token NLL change (tokens taken as independent), in %.
    mean = (nll_int8 - nll_ref) / count
    standard_error = math.sqrt(max(squares / count - mean**2, 0.0) / count)
    window_dppl = 100 * np.expm1((sums_w5[:, 1] - sums_w5[:, 0]) / per_window)
    return {
        "windows": w,
        "scored_tokens": count,
        "ppl_fp32_cache": ppl_ref,
        "ppl_int8_cache": ppl_int8,
        "kv_int8_dppl": 100.0 * (ppl_int8 / ppl_ref - 1.0),
        "kv_int8_dppl_standard_error": 100.0 * standard_error,
        "kv_int8_dppl_per_window": [round(float(x), 4) for x in window_dppl],
        "kv_int8_kl": kl / count,
        "kv_int8_top1": same / count,
        "fp32_cache_bytes": result["auto_cache_bytes"],
        "int8_cache_bytes": result["int8_cache_bytes"],
        "int8_bytes_ratio": result["int8_cache_bytes"] / result["auto_cache_bytes"],
    }


class DecodeSpeed:
    """One sampler per (slots, cache dtype), every slot live at CONTEXT tokens."""

    def __init__(self, loaded, num_slots: int, kv_dtype: str, prompt: list[int]):
        self.num_slots = num_slots
        self.sampler = Sampler(
            loaded.model_config, loaded.graphdef, loaded.params, num_slots=num_slots,
            max_len=WINDOW, steps_per_call=STEPS, kv_dtype=kv_dtype,
        )  # fmt: skip
        self.prompt = prompt
        self.request = SamplingParams(max_new_tokens=WINDOW, temperature=0.0)
        self.state = self.sampler.init_state()
        self.sampler.compile_bucket(num_slots, WINDOW)

    def call_s(self) -> float:
        """Seconds of one generate call of STEPS decode steps over every slot."""
        for slot in range(self.num_slots):
            self.state, _ = self.sampler.activate(self.state, slot, self.prompt, self.request)
        jax.block_until_ready(self.state)
        start = time.perf_counter()
        self.state, out = self.sampler.generate(self.state, num_keys=WINDOW)
        jax.block_until_ready(out)
        seconds = time.perf_counter() - start
        assert int((np.asarray(out.tokens) >= 0).sum()) == self.num_slots * (STEPS - 1)
        return seconds

    def tokens_per_s(self, reps: int) -> float:
        self.call_s()  # Warm.
        return self.num_slots * STEPS / statistics.median(self.call_s() for _ in range(reps))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    loaded = load(smollm2_gguf())
    tokens = evaluate.heldout_tokens(loaded.tokenizer, max_tokens=args.windows * WINDOW)
    windows_wt = tokens.reshape(args.windows, WINDOW)
    result = {"bench": "kv_cache", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF -> fp32)"}
    result.update(quality(loaded, windows_wt))
    # The fp32 cache path against the full forward on the same windows (same scored half).
    full = evaluate.compare(loaded, {}, tokens, window=WINDOW, batch=1, log=_log)
    result["ppl_full_forward"] = full["reference"]["ppl"]
    _log(json.dumps(result))

    prompt = list(tokens[:CONTEXT])
    speeds = {}
    for num_slots in (1, 16):
        for kv_dtype in ("auto", "int8"):
            speeds[(num_slots, kv_dtype)] = DecodeSpeed(loaded, num_slots, kv_dtype, prompt)
    rounds = {key: [] for key in speeds}
    for round_index in range(args.rounds):
        for key, speed in speeds.items():
            rounds[key].append(speed.tokens_per_s(args.reps))
        _log(f"round {round_index}: " + ", ".join(f"{k}: {v[-1]:.1f}" for k, v in rounds.items()))
    for (num_slots, kv_dtype), values in rounds.items():
        name = "fp32" if kv_dtype == "auto" else "int8"
        result[f"decode_tok_s_b{num_slots}_{name}"] = max(values)
        result[f"decode_tok_s_b{num_slots}_{name}_rounds"] = values
    for num_slots in (1, 16):
        fp32, int8 = (result[f"decode_tok_s_b{num_slots}_{n}"] for n in ("fp32", "int8"))
        result[f"int8_speed_ratio_b{num_slots}"] = int8 / fp32
    result["context"] = CONTEXT
    result["target_kv_int8_dppl"] = 0.1
    print(json.dumps(result))


if __name__ == "__main__":
    main()
