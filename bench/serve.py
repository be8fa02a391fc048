"""Serving throughput and latency of `launch.serve` on ref_small (random weights, CPU), with
the engine's raw decode and prefill rates measured in the same run.

  .venv/bin/python bench/serve.py [--requests 64] [--concurrency 1,4,16] [--slots 16]
      [--binding serve.steps_per_call=8] [--workdir DIR] [--raw_reps 3]

Writes a ref_small workdir (configs/model/ref_small.gin: vocab 8192, context 256; random
weights; a byte-level BPE tokenizer of 8192 tokens trained on the bundled Shakespeare), starts
`python -m launch.serve --gin_bindings=serve.num_slots=16` on 127.0.0.1 and drives it with its
own streaming client (openai.AsyncOpenAI, /v1/completions with token-id prompts, so every
prompt has exactly 64 tokens; ignore_eos, so every output has exactly 64 tokens):

- Load: --requests requests at each concurrency (a new one starts when one ends); request
  throughput and output tokens/s over the wall time of the level; time to first token (TTFT:
  send to the first streamed token) and inter-token latency (ITL, as AIPerf defines it: (end -
  first token) / (output tokens - 1) per request), p50 and p99 over requests. Prompts are
  random token ids, distinct per request, so the prefix cache never hits here.
- Prefix cache: groups of prompts sharing a 192-token prefix (three quarters of the context)
  plus a distinct 16-token suffix, sent one at a time: the first of each group is uncached,
  the rest find the prefix's 12 blocks cached; TTFT p50 of each kind and their ratio.
- Raw engine rates, in this process with research.serving.Sampler (the engine's own jitted
  functions, 16 slots, context 256), before the server starts and after it stops (the best of
  the two rounds is kept, so `fraction_of_raw_decode_c16` is not flattered by a disturbed
  raw round): decode tokens/s at batch 16 as bench/decode.py measures it (16 x 63 / (t(64
  steps) - t(1 step)), all 64 steps in one `generate` call), and the prefill of one 64-token
  prompt alone and with insert + first token.

The server is stopped by its pid at the end, also on an error or Ctrl-C. The machine is a
shared 2-core CPU box: the client shares the cores with the server, and only ratios within
one run mean much. The last line is one JSON object.
"""

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PROMPT, OUTPUT = 64, 64
PREFIX, SUFFIX, PREFIX_OUTPUT = 192, 16, 4
FIRST_ID = 3  # Ids 0, 1, 2 are the tokenizer's pad, bos and eos.

import jax  # noqa: E402
import numpy as np  # noqa: E402
import openai  # noqa: E402
from flax import nnx  # noqa: E402

from launch import config as gin_config  # noqa: E402
from research.checkpoint.pretrained import Pretrained, save_as_run  # noqa: E402
from research.data import default_corpus_documents, train_tokenizer  # noqa: E402
from research.model import Decoder, ModelConfig  # noqa: E402
from research.serving import Sampler, SamplingParams  # noqa: E402
from research.serving.engine import EngineConfig  # noqa: E402


def ref_small() -> ModelConfig:
    gin_config.parse(["configs/base.gin", "configs/model/ref_small.gin"])
    return gin_config.build(ModelConfig)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q)) if values else float("nan")


# ---- the model and the raw engine rates ----------------------------------------------------


def write_workdir(workdir: str, config: ModelConfig, graphdef, params) -> None:
    """ref_small with random weights and an 8192-token tokenizer, as a Cirrus run."""
    tokenizer = train_tokenizer(default_corpus_documents(), config.vocab_size)
    assert tokenizer.vocab_size == config.vocab_size, tokenizer.vocab_size
    pretrained = Pretrained(
        model_config=config,
        params=params,
        source={"format": "random", "path": "bench/serve.py", "family": "gpt2"},
        tokenizer=tokenizer,
    )
    save_as_run(workdir, pretrained, log=lambda _: None)


class RawEngine:
    """The engine's Sampler in this process: batch-16 decode and one-prompt prefill."""

    def __init__(self, config: ModelConfig, graphdef, params, num_slots: int):
        self.num_slots = num_slots
        defaults = EngineConfig()  # The engine's sampler settings, all steps in one call.
        self.sampler = Sampler(
            config,
            graphdef,
            params,
            num_slots=num_slots,
            steps_per_call=OUTPUT,
            num_top_logprobs=defaults.num_top_logprobs,
            max_stop_tokens=defaults.max_stop_tokens,
        )
        rng = np.random.default_rng(7)
        self.prompts = [
            [int(t) for t in rng.integers(FIRST_ID, config.vocab_size, PROMPT)]
            for _ in range(num_slots)
        ]
        self.request = SamplingParams(max_new_tokens=OUTPUT, temperature=0.0)
        self.state = self.sampler.init_state()

    def _fill(self, count: int):
        prefix = self.sampler.prefill(self.prompts[:count])
        for slot in range(count):
            self.state = self.sampler.insert(self.state, prefix, slot, slot, self.request)

    def _decode(self, num_steps: int):
        self._fill(self.num_slots)
        self.state, out = self.sampler.generate(self.state, num_steps)
        return jax.block_until_ready(out)

    def _release_all(self):
        for slot in range(self.num_slots):
            self.state = self.sampler.release(self.state, slot)
        jax.block_until_ready(self.state)

    def _prefill(self):
        """The engine's prefill of one prompt: `extend` into a free slot."""
        self.state, _ = self.sampler.extend(self.state, 0, self.prompts[0], 0)
        return jax.block_until_ready(self.state)

    def _first_token(self):
        """As at concurrency 1: extend + activate one slot (which chooses the first token)."""
        self.state, _ = self.sampler.extend(self.state, 0, self.prompts[0], 0)
        self.state, first = self.sampler.activate(self.state, 0, self.prompts[0], self.request)
        out = jax.device_get(first)
        self.state = self.sampler.release(self.state, 0)
        return out

    def warm(self) -> None:
        self._decode(1)
        self._decode(OUTPUT)
        self._release_all()
        self._prefill()
        self._first_token()

    def measure(self, reps: int) -> dict:
        first, full, prefill, first_token = [], [], [], []
        for _ in range(reps):
            first.append(_timed(lambda: self._decode(1)))
            full.append(_timed(lambda: self._decode(OUTPUT)))
            self._release_all()
            prefill.append(_timed(self._prefill))  # Leaves only slot 0 in use, not live.
            first_token.append(_timed(self._first_token))
        t_first, t_full = statistics.median(first), statistics.median(full)
        return {
            "decode_tokens_per_s": self.num_slots * (OUTPUT - 1) / max(t_full - t_first, 1e-9),
            "prefill_s": statistics.median(prefill),
            "first_token_s": statistics.median(first_token),
        }


# ---- the server ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def start_server(workdir: str, port: int, bindings: list[str], log_path: str):
    command = [
        sys.executable,
        "-m",
        "launch.serve",
        f"--workdir={workdir}",
        "--host=127.0.0.1",
        f"--port={port}",
        "--model_name=ref_small",
        *[f"--gin_bindings={b}" for b in bindings],
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("CIRRUS_API_KEYS", None)
    with open(log_path, "w") as log:  # The child keeps its own copy of the descriptor.
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(process, url: str, log_path: str, timeout_s: float = 900.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"launch.serve exited with {process.returncode}:\n{_tail(log_path)}")
        if _status(f"{url}/ready") == 200:
            return time.monotonic() - start
        time.sleep(0.25)
    raise RuntimeError(f"launch.serve not ready after {timeout_s} s:\n{_tail(log_path)}")


def stop_server(process) -> None:
    """SIGTERM by pid (the server drains), SIGKILL if it has not exited in 30 s."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


def _tail(path: str, chars: int = 4000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-chars:]


# ---- the client ----------------------------------------------------------------------------


async def one_request(client, prompt: list[int], max_tokens: int, seed: int) -> dict:
    """One streamed completion: send -> first token -> end times, tokens and cached tokens."""
    start = time.perf_counter()
    first, chunk_times, usage = None, [], None
    stream = await client.completions.create(
        model="ref_small",
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=1.0,
        seed=seed,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices:  # A token event (its text may be empty: a partial UTF-8 character).
            first = first if first is not None else now
            chunk_times.append(now)
    end = time.perf_counter()
    tokens = usage.completion_tokens
    details = usage.prompt_tokens_details
    return {
        "ttft_s": first - start,
        "e2e_s": end - start,
        "itl_s": (end - first) / (tokens - 1) if tokens > 1 else float("nan"),
        "chunk_gaps_s": list(np.diff(chunk_times)),
        "tokens": tokens,
        "prompt_tokens": usage.prompt_tokens,
        "cached_tokens": (details.cached_tokens or 0) if details is not None else 0,
    }


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_level(
    client, prompts, concurrency: int, max_tokens: int, seed: int, server_pid: int
) -> dict:
    """All prompts, at most `concurrency` in flight; a new one starts when one ends."""
    semaphore = asyncio.Semaphore(concurrency)

    async def limited(index, prompt):
        async with semaphore:
            return await one_request(client, prompt, max_tokens, seed + index)

    start, client_cpu, server_cpu = time.perf_counter(), time.process_time(), _cpu_s(server_pid)
    results = await asyncio.gather(*(limited(i, p) for i, p in enumerate(prompts)))
    wall = time.perf_counter() - start
    client_cpu = time.process_time() - client_cpu
    server_cpu = _cpu_s(server_pid) - server_cpu
    for result in results:
        assert result["tokens"] == max_tokens, result["tokens"]
        assert result["prompt_tokens"] == len(prompts[0]), result["prompt_tokens"]
    ttft = [r["ttft_s"] for r in results]
    itl = [r["itl_s"] for r in results]
    gaps = [g for r in results for g in r["chunk_gaps_s"]]
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(results) / wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": round(_percentile(ttft, 50), 4),
        "ttft_p99_s": round(_percentile(ttft, 99), 4),
        "itl_p50_s": round(_percentile(itl, 50), 5),
        "itl_p99_s": round(_percentile(itl, 99), 5),
        "chunk_gap_p50_s": round(_percentile(gaps, 50), 5),
        "tokens_per_chunk": round(tokens / (len(gaps) + len(results)), 2),
        "cached_tokens": sum(r["cached_tokens"] for r in results),
        # Cores busy on average (the machine has 2, shared): where the time went.
        "client_cores": round(client_cpu / wall, 2),
        "server_cores": round(server_cpu / wall, 2),
    }


async def run_prefix(client, rng, vocab: int, groups: int, per_group: int) -> dict:
    """Groups sharing a PREFIX-token prefix, one request at a time: first uncached, then cached."""
    uncached, cached, cached_tokens = [], [], []
    for group in range(groups + 1):  # Group 0 warms up (compiles the chunk shapes); not kept.
        prefix = [int(t) for t in rng.integers(FIRST_ID, vocab, PREFIX)]
        for index in range(per_group):
            suffix = [int(t) for t in rng.integers(FIRST_ID, vocab, SUFFIX)]
            result = await one_request(client, prefix + suffix, PREFIX_OUTPUT, group * 100 + index)
            if group == 0:
                continue
            (uncached if index == 0 else cached).append(result["ttft_s"])
            if index:
                cached_tokens.append(result["cached_tokens"])
    uncached_p50, cached_p50 = _percentile(uncached, 50), _percentile(cached, 50)
    return {
        "prefix_tokens": PREFIX,
        "prefix_groups": groups,
        "prefix_uncached_ttft_p50_s": round(uncached_p50, 4),
        "prefix_cached_ttft_p50_s": round(cached_p50, 4),
        "prefix_cached_tokens_min": int(min(cached_tokens)),
        "prefix_ttft_speedup": round(uncached_p50 / cached_p50, 2),
    }


async def drive(url: str, args, vocab: int, server_pid: int) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    rng = np.random.default_rng(0)

    def prompts(count):
        return [[int(t) for t in rng.integers(FIRST_ID, vocab, PROMPT)] for _ in range(count)]

    # Warm-up: every shape the load uses (one and many slots, all prompt chunk lengths).
    await run_level(client, prompts(2), 1, OUTPUT, 10_000, server_pid)
    await run_level(client, prompts(args.slots), args.slots, OUTPUT, 20_000, server_pid)
    levels = {}
    for concurrency in args.concurrency:
        levels[concurrency] = await run_level(
            client, prompts(args.requests), concurrency, OUTPUT, concurrency * 1000, server_pid
        )
        print(f"c={concurrency}: " + json.dumps(levels[concurrency]), flush=True)
    prefix = await run_prefix(client, rng, vocab, args.prefix_groups, args.prefix_per_group)
    print("prefix: " + json.dumps(prefix), flush=True)
    await client.close()
    return {"levels": levels, "prefix": prefix}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--binding", action="append", default=[], help="extra serve.* binding")
    parser.add_argument("--workdir", default=None, help="reuse (or keep) the model here")
    parser.add_argument("--raw_reps", type=int, default=3)
    parser.add_argument("--prefix_groups", type=int, default=5)
    parser.add_argument("--prefix_per_group", type=int, default=4)
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    # SIGTERM to this script runs the finally blocks (the server is stopped by pid).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    config = ref_small()
    graphdef, params = nnx.split(Decoder(config, rngs=nnx.Rngs(0)), nnx.Param)
    scratch = tempfile.mkdtemp(prefix="bench-serve-")
    workdir = args.workdir or os.path.join(scratch, "ref_small")
    try:
        if not os.path.isdir(os.path.join(workdir, "ckpt")):
            write_workdir(workdir, config, graphdef, params)

        raw = RawEngine(config, graphdef, params, args.slots)
        compile_s = _timed(raw.warm)
        raw_rounds = [raw.measure(args.raw_reps)]
        print("raw before: " + json.dumps(raw_rounds[0]), flush=True)

        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = os.path.join(scratch, "serve.log")
        bindings = [f"serve.num_slots={args.slots}", *args.binding]
        process = start_server(workdir, port, bindings, log_path)
        try:
            ready_s = wait_ready(process, url, log_path)
            measured = asyncio.run(drive(url, args, config.vocab_size, process.pid))
        except BaseException:
            print(_tail(log_path), file=sys.stderr)
            raise
        finally:
            stop_server(process)

        raw_rounds.append(raw.measure(args.raw_reps))
        print("raw after: " + json.dumps(raw_rounds[1]), flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(scratch, ignore_errors=True)

    levels, prefix = measured["levels"], measured["prefix"]
    raw_decode = max(r["decode_tokens_per_s"] for r in raw_rounds)
    raw_prefill = min(r["prefill_s"] for r in raw_rounds)
    raw_first = min(r["first_token_s"] for r in raw_rounds)
    low, high = min(args.concurrency), max(args.concurrency)
    result = {
        "bench": "serve",
        "model": "ref_small",
        "prompt": PROMPT,
        "output": OUTPUT,
        "requests": args.requests,
        "slots": args.slots,
        "bindings": bindings,
        "jax": jax.__version__,
        "ready_s": round(ready_s, 1),
        "raw_compile_s": round(compile_s, 1),
        "raw_decode_b16_tokens_per_s": round(raw_decode, 1),
        "raw_decode_rounds": [round(r["decode_tokens_per_s"], 1) for r in raw_rounds],
        "raw_prefill_s": round(raw_prefill, 4),
        "raw_first_token_s": round(raw_first, 4),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    for concurrency, level in levels.items():
        for key in ("requests_per_s", "tokens_per_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s",
                    "itl_p99_s", "tokens_per_chunk", "client_cores", "server_cores"):  # fmt: skip
            result[f"c{concurrency}_{key}"] = level[key]
    result.update(prefix)
    result.update(
        {
            "ttft_c1_over_raw_prefill": round(levels[low]["ttft_p50_s"] / raw_prefill, 2),
            "ttft_c1_over_raw_first_token": round(levels[low]["ttft_p50_s"] / raw_first, 2),
            "summary_levels": [low, high],  # c1 / c16 below = the lowest / highest level run
            "c1_tokens_per_s": levels[low]["tokens_per_s"],
            "c16_tokens_per_s": levels[high]["tokens_per_s"],
            "scaling_c16_over_c1": round(
                levels[high]["tokens_per_s"] / levels[low]["tokens_per_s"], 2
            ),
            "fraction_of_raw_decode_c16": round(levels[high]["tokens_per_s"] / raw_decode, 3),
            "ttft_p50_c1_s": levels[low]["ttft_p50_s"],
            "prefix_ttft_speedup": prefix["prefix_ttft_speedup"],
        }
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
