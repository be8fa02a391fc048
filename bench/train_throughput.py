"""Training throughput of ref_small (fp32, batch 8 x 256, CPU) against the peers, same run.

  .venv/bin/python bench/train_throughput.py [--rounds 3] [--steps 8] [--no_peers]

Each round runs Cirrus's jitted train step, then `../shared/peers/run.sh train_torch.py
--impl nanogpt` and `run.sh train_flax_plain.py`, so that ratios compare runs made minutes
apart on the same noisy machine; medians over rounds are reported. MFU is against a jitted
2048^3 matmul peak measured in this process. The last line is one JSON object.
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

import jax  # noqa: E402
import numpy as np  # noqa: E402

from launch import config as gin_config  # noqa: E402
from research import sharding  # noqa: E402
from research.model import ModelConfig, count_params, flops_per_token  # noqa: E402
from research.train import TrainConfig, build_trainer  # noqa: E402
from research.train.flops import measure_matmul_peak  # noqa: E402


def cirrus_round(model_config, steps: int, warmup: int) -> dict:
    # The peers' step: AdamW(3e-4, b=(0.9, 0.95), eps 1e-8, wd 0.1), clip 1.0, constant lr.
    config = TrainConfig(
        num_steps=10_000,
        batch_size=8,
        seq_len=model_config.max_seq_len,
        learning_rate=3e-4,
        warmup_steps=0,
        schedule="constant",
        weight_decay=0.1,
        grad_clip_norm=1.0,
        mesh_shape=(1, 1, 1),
    )
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    start = time.perf_counter()
    trainer, state = build_trainer(model_config, config, mesh)
    rng = np.random.default_rng(0)

    def batch():
        tokens = rng.integers(0, model_config.vocab_size, (8, config.seq_len + 1), np.int32)
        local = {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "positions": np.tile(np.arange(config.seq_len, dtype=np.int32), (8, 1)),
            "segment_ids": np.ones((8, config.seq_len), np.int32),
            "weights": np.ones((8, config.seq_len), np.float32),
        }
        return sharding.global_batch(mesh, local)

    times = []
    with jax.set_mesh(mesh):
        state, metrics = trainer.train_step(state, batch())
        float(metrics["loss"])
        first_step_s = time.perf_counter() - start
        for _ in range(warmup - 1):
            state, metrics = trainer.train_step(state, batch())
            float(metrics["loss"])
        for _ in range(steps):
            b = batch()
            jax.block_until_ready(b)
            t0 = time.perf_counter()
            state, metrics = trainer.train_step(state, b)
            float(metrics["loss"])
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"tokens_per_s": 8 * config.seq_len / median, "first_step_s": first_step_s}


def peer_round(script: str, args: list[str]) -> dict:
    result = subprocess.run(
        [PEERS, script, *args], capture_output=True, text=True, timeout=1800, check=False
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        raise RuntimeError(f"peer {script} failed:\n{result.stderr[-2000:]}")
    return json.loads(lines[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no_peers", action="store_true")
    args = parser.parse_args()

    gin_config.parse([os.path.join(ROOT, "configs", "model", "ref_small.gin")], [])
    model_config = gin_config.build(ModelConfig)
    flops_token = flops_per_token(model_config, model_config.max_seq_len)
    peer_args = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--no-peak"]
    rounds = []
    for index in range(args.rounds):
        peak = measure_matmul_peak()
        row = {"peak_flops": peak, "cirrus": cirrus_round(model_config, args.steps, args.warmup)}
        if not args.no_peers:
            row["torch"] = peer_round("train_torch.py", ["--impl", "nanogpt", *peer_args])
            row["flax_plain"] = peer_round("train_flax_plain.py", peer_args)
        rounds.append(row)
        print(json.dumps({"round": index, **row}), flush=True)

    def median(fn):
        return statistics.median(fn(row) for row in rounds)

    tokens_per_s = median(lambda r: r["cirrus"]["tokens_per_s"])
    summary = {
        "bench": "train_throughput",
        "model": "ref_small",
        "params": count_params(model_config),
        "flops_per_token": flops_token,
        "rounds": args.rounds,
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": round(
            median(lambda r: r["cirrus"]["tokens_per_s"] * flops_token / r["peak_flops"]), 4
        ),
        "peak_gflops": round(median(lambda r: r["peak_flops"]) / 1e9, 1),
        "compile_s": round(median(lambda r: r["cirrus"]["first_step_s"]), 2),
    }
    if not args.no_peers:
        summary["torch_tokens_per_s"] = median(lambda r: r["torch"]["tokens_per_s"])
        summary["flax_plain_tokens_per_s"] = median(lambda r: r["flax_plain"]["tokens_per_s"])
        summary["ratio_vs_torch"] = round(
            median(lambda r: r["cirrus"]["tokens_per_s"] / r["torch"]["tokens_per_s"]), 3
        )
        summary["ratio_vs_flax_plain"] = round(
            median(lambda r: r["cirrus"]["tokens_per_s"] / r["flax_plain"]["tokens_per_s"]), 3
        )
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
