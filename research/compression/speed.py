"""Decode speed at batch 1 through the serving Sampler (the path launch.serve runs)."""

import statistics
import time

import jax
import numpy as np

from research.serving import Sampler, SamplingParams

PROMPT = 16


def decode_tokens_per_s(model, new_tokens: int = 64, reps: int = 3) -> float:
    """Greedy decode tokens/s of one request: (new - 1) / (t(new tokens) - t(first token)),
    as bench/decode.py; the median over `reps` after one compiling run."""
    config = model.model_config
    max_len = min(config.max_seq_len, PROMPT + new_tokens)
    new_tokens = max_len - PROMPT
    sampler = Sampler(
        config, model.graphdef, model.params, num_slots=1, max_len=max_len,
        steps_per_call=new_tokens,
    )  # fmt: skip
    prompt = list(np.random.default_rng(0).integers(0, config.vocab_size, PROMPT))
    request = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)

    def run(steps: int) -> float:
        start = time.perf_counter()
        state = sampler.init_state()
        state, _ = sampler.extend(state, [(0, prompt, 0)])
        state, _ = sampler.activate(state, 0, prompt, request)
        state, out = sampler.generate(state, num_rows=1, num_keys=max_len, num_steps=steps)
        jax.block_until_ready(out)
        return time.perf_counter() - start

    run(1), run(new_tokens)  # Compile both.
    first = statistics.median(run(1) for _ in range(reps))
    full = statistics.median(run(new_tokens) for _ in range(reps))
    return (new_tokens - 1) / max(full - first, 1e-9)
