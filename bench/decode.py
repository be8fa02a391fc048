"""Decode throughput of the KV-cache sampler on ref_small (fp32, random weights, CPU), against
the peers in the same run.

  .venv/bin/python bench/decode.py [--rounds 2] [--reps 3] [--no_peers]

Prompt 64 tokens, 128 new tokens, greedy, at batch 1 and 8 (prompts differ per slot). As in
the peers' decode scripts: t_first = prefill (extend) + activate + one decode step (generate with
num_steps=1), t_full = the same with all 128 tokens; decode tokens/s = batch * 127 /
(t_full - t_first); time to first token = t_first at batch 1. Each round runs Cirrus, then
`../shared/peers/run.sh decode_hf.py` (HF transformers generate with a KV cache) and
`decode_jax.py --mode kv` (a plain jitted JAX fori_loop) at both batch sizes. Each figure
is the median over --reps within a round and the best over rounds: on this shared machine a
neighbour's job can slow any one run (torch's OpenMP threads by 10x), so the least-disturbed
round of each program is compared; every round is printed too. The memory-bandwidth bound at
batch 1 = measured copy bandwidth (NumPy, STREAM convention, as bench_limits.py; best of
rounds) / bytes read per step (fp32 weights + the KV cache at the mean attended length).
The last line is one JSON object.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PEERS = os.path.join(os.path.dirname(ROOT), "shared", "peers", "run.sh")
PROMPT, NEW = 64, 128

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from launch import config as gin_config  # noqa: E402
from research.model import Decoder, ModelConfig, count_params  # noqa: E402
from research.serving import Sampler, SamplingParams  # noqa: E402


def ref_small() -> ModelConfig:
    gin_config.parse(["configs/base.gin", "configs/model/ref_small.gin"])
    return gin_config.build(ModelConfig)


def copy_bandwidth(mib: int = 512, reps: int = 5) -> float:
    """Best STREAM-copy GB/s (2 x bytes / time) of np.copyto, as bench_limits.py."""
    source = np.ones(mib * 2**20 // 4, np.float32)
    target = np.zeros_like(source)
    np.copyto(target, source)
    best = min(_timed(lambda: np.copyto(target, source)) for _ in range(reps))
    return 2 * source.nbytes / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class CirrusDecode:
    """One sampler per batch size; compiled on the first run."""

    def __init__(self, config: ModelConfig, graphdef, params, batch: int):
        self.batch = batch
        self.sampler = Sampler(
            config, graphdef, params, num_slots=batch, max_len=PROMPT + NEW, steps_per_call=NEW
        )
        rng = np.random.default_rng(2)
        self.prompts = [list(rng.integers(0, config.vocab_size, PROMPT)) for _ in range(batch)]
        self.request = SamplingParams(max_new_tokens=NEW, temperature=0.0)
        self.state = self.sampler.init_state()

    def run(self, num_steps: int):
        rows = [(slot, prompt, 0) for slot, prompt in enumerate(self.prompts)]
        self.state, _ = self.sampler.extend(self.state, rows)
        for slot, prompt in enumerate(self.prompts):
            self.state, _ = self.sampler.activate(self.state, slot, prompt, self.request)
        self.state, out = self.sampler.generate(
            self.state, num_rows=self.batch, num_keys=PROMPT + NEW, num_steps=num_steps
        )
        return jax.block_until_ready(out)

    def measure(self, reps: int) -> dict:
        first, full = [], []
        for _ in range(reps):
            first.append(_timed(lambda: self.run(1)))
            start = time.perf_counter()
            out = self.run(NEW)
            full.append(time.perf_counter() - start)
            # activate chose each slot's first token; the steps chose the other NEW - 1.
            assert int((np.asarray(out.tokens) >= 0).sum()) == self.batch * (NEW - 1)
        t_first, t_full = statistics.median(first), statistics.median(full)
        return {
            "decode_tokens_per_s": self.batch * (NEW - 1) / max(t_full - t_first, 1e-9),
            "t_first_s": t_first,
            "t_full_s": t_full,
        }


def peer(script: str, batch: int, reps: int, *extra) -> dict:
    command = [PEERS, script, "--batch", str(batch), "--prompt", str(PROMPT), "--new", str(NEW)]
    result = subprocess.run(
        command + ["--reps", str(reps), *extra], capture_output=True, text=True, check=False
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        raise RuntimeError(f"{script} failed: {result.stderr[-2000:]}")
    return json.loads(lines[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no_peers", action="store_true")
    args = parser.parse_args()

    config = ref_small()
    graphdef, params = nnx.split(Decoder(config, rngs=nnx.Rngs(0)), nnx.Param)
    weight_bytes = 4 * count_params(config)
    mean_len = PROMPT + NEW / 2
    cache_bytes = (
        2 * config.num_layers * mean_len * config.num_kv_heads * config.resolved_head_dim * 4
    )
    runs = {b: CirrusDecode(config, graphdef, params, b) for b in (1, 8)}
    compile_s = {}
    for b, decode in runs.items():  # First calls: compile extend, activate and generate.
        compile_s[b] = _timed(lambda decode=decode: (decode.run(1), decode.run(NEW)))

    rounds = []
    for index in range(args.rounds):
        record = {f"cirrus_b{b}": runs[b].measure(args.reps) for b in runs}
        if not args.no_peers:
            for b in runs:
                record[f"hf_b{b}"] = peer("decode_hf.py", b, args.reps)
                record[f"jax_b{b}"] = peer("decode_jax.py", b, args.reps, "--mode", "kv")
        record["copy_GBps"] = copy_bandwidth()
        rounds.append(record)
        summary = {k: round(v["decode_tokens_per_s"], 1) for k, v in record.items() if "_b" in k}
        print(f"round {index + 1}: " + json.dumps(summary), flush=True)

    def best(key, field="decode_tokens_per_s", pick=max):
        values = [r[key][field] for r in rounds if key in r]
        return pick(values) if values else float("nan")

    def ratio(key, peer_key):
        return round(best(key) / best(peer_key), 2)

    copy_gbps = max(r["copy_GBps"] for r in rounds)
    bound_b1 = copy_gbps * 1e9 / (weight_bytes + cache_bytes)
    b1, b8 = best("cirrus_b1"), best("cirrus_b8")
    result = {
        "bench": "decode",
        "model": "ref_small",
        "prompt": PROMPT,
        "new": NEW,
        "rounds": args.rounds,
        "jax": jax.__version__,
        "hf_b1_tokens_per_s": round(best("hf_b1"), 1),
        "hf_b8_tokens_per_s": round(best("hf_b8"), 1),
        "jax_peer_b1_tokens_per_s": round(best("jax_b1"), 1),
        "jax_peer_b8_tokens_per_s": round(best("jax_b8"), 1),
        "ratio_vs_jax_peer_b1": ratio("cirrus_b1", "jax_b1"),
        "ratio_vs_jax_peer_b8": ratio("cirrus_b8", "jax_b8"),
        "copy_GBps": round(copy_gbps, 1),
        "bandwidth_bound_b1_tokens_per_s": round(bound_b1, 1),
        "ttft_b8_s": round(best("cirrus_b8", "t_first_s", min), 4),
        "compile_b8_s": round(compile_s[8], 2),
        "loadavg_1m": os.getloadavg()[0],
        "b1_tokens_per_s": round(b1, 1),
        "b8_tokens_per_s": round(b8, 1),
        "ratio_vs_hf_b1": ratio("cirrus_b1", "hf_b1"),
        "ratio_vs_hf_b8": ratio("cirrus_b8", "hf_b8"),
        "fraction_of_bandwidth_bound_b1": round(b1 / bound_b1, 3),
        "ttft_s": round(best("cirrus_b1", "t_first_s", min), 4),
        "compile_s": round(compile_s[1], 2),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
