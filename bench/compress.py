"""Compression on the model users run (SmolLM2-135M-Instruct from the bundled GGUF): quality
against the fp32 model on the shipped held-out text, and batch-1 decode speed against Cirrus
fp32, HF transformers generate (fp32) and llama.cpp, all in the same run.

  .venv/bin/python bench/compress.py [--eval_tokens 32768] [--reps 5] [--rounds 2] [--no_peers]

Quality (research/compression/evaluate.py, windows of 512, second half scored): int8 in
groups of 32 (the shipped recipe) and per output channel, int4 g32 round-to-nearest, int4 g32
GPTQ (calibrated on the bundled corpus), and llama.cpp's Q8_0 / Q4_0 made by the `gguf`
package's quantizers; the 20-layer model healed for --distill_steps by distillation and by
cross-entropy alone (same data, steps, init). Speed: greedy decode tokens/s at batch 1
through the serving Sampler (research/compression/speed.py: 16-token prompt, 64 new tokens),
the median of --reps, best of --rounds (rounds interleave the models, so load from a neighbour
hits all alike). Depth: SmolLM2 pruned from 30 to 20 layers by layer influence, decode speed
over the original. The last line is one JSON object.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from bench.serve import hf_decode, prepare, smollm2_gguf  # noqa: E402
from research.checkpoint.load import from_pretrained  # noqa: E402
from research.checkpoint.pretrained import Pretrained, load_pretrained  # noqa: E402
from research.compression import (  # noqa: E402
    corpus,
    distill,
    evaluate,
    gptq,
    kernel,
    prune,
    quantize,
    speed,
)

NEW = 64


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def llama_cpp_decode(gguf: str, prompt: list[int], reps: int) -> dict | None:
    venv = os.environ.get("PEERS_VENV") or os.path.expanduser("~/.cache/cirrus-peers-venv")
    python = os.path.join(venv, "bin", "python")
    script = os.path.join(ROOT, "bench", "peers", "llama_cpp_generate.py")
    command = [python, script, "--model", gguf, "--prompt_ids", ",".join(map(str, prompt)),
               "--new", str(NEW), "--reps", str(reps)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        _log(f"llama.cpp peer unavailable ({result.stderr.strip()[-300:]}); see its docstring")
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--eval_tokens", type=int, default=32768)
    parser.add_argument("--calibration_sequences", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no_peers", action="store_true")
    parser.add_argument("--distill_steps", type=int, default=60)
    args = parser.parse_args()
    if not kernel.available():
        sys.exit("build the kernel first: make kernels")
    gguf = smollm2_gguf()
    original = load_pretrained(gguf, log=lambda _: None)
    reference = from_pretrained(original)
    config, params = original.model_config, original.params

    def build(qconfig, qparams):
        return from_pretrained(Pretrained(qconfig, qparams, original.source, original.tokenizer))

    models = {"int8": build(*quantize.quantize_params(config, params, "int8", 32))}
    models["int8_per_channel"] = build(*quantize.quantize_params(config, params, "int8", 0))
    models["int4_g32"] = build(*quantize.quantize_params(config, params, "int4", 32))
    start = time.perf_counter()
    batches = corpus.calibration_batches(original.tokenizer, args.calibration_sequences, 512)
    hessians = gptq.collect_hessians(reference.graphdef, reference.params, batches, log=_log)
    overrides = gptq.gptq_overrides(config, params, hessians, "int4", 32, log=_log)
    models["int4_g32_gptq"] = build(
        *quantize.quantize_params(config, params, "int4", 32, overrides=overrides)
    )
    gptq_s = time.perf_counter() - start
    importance = prune.layer_importance(reference.graphdef, reference.params, batches[:4])
    keep = prune.least_important(importance, config.num_layers - 20)
    depth20 = build(*prune.drop_layers(config, params, keep))

    # Healing the 20-layer model, same data, steps and init: distillation vs cross-entropy.
    healed, distill_s = {}, {}
    for name, alpha in (("distilled", 0.9), ("ce_only", 0.0)):
        settings = distill.DistillConfig(
            steps=args.distill_steps, batch_size=4, seq_len=128, alpha=alpha
        )
        batches_ = corpus.training_batches(original.tokenizer, 4, 128)
        start = time.perf_counter()
        healed_params, _ = distill.distill(
            (depth20.model_config, depth20.params),
            (reference.model_config, reference.params),
            batches_,
            settings,
            log=_log,
        )
        distill_s[name] = time.perf_counter() - start
        healed[name] = dataclasses.replace(depth20, params=healed_params)

    # Quality.
    tokens = evaluate.heldout_tokens(original.tokenizer, max_tokens=args.eval_tokens)
    candidates = dict(models)
    for kind in ("q8_0", "q4_0"):
        clone = from_pretrained(original)
        clone.params = evaluate.gguf_baseline(config, reference.params, kind)
        candidates[kind] = clone
    candidates["depth20 (no healing)"] = depth20
    candidates["depth20 distilled"] = healed["distilled"]
    candidates["depth20 ce_only"] = healed["ce_only"]
    start = time.perf_counter()
    quality = evaluate.compare(reference, candidates, tokens, window=512, log=_log)
    quality_s = time.perf_counter() - start

    # Speed: rounds interleave every model.
    speeds = {name: [] for name in ("fp32", *models, "depth20")}
    timed = {"fp32": reference, **models, "depth20": depth20}
    for round_index in range(args.rounds):
        for name, model in timed.items():
            speeds[name].append(speed.decode_tokens_per_s(model, NEW, args.reps))
            _log(f"round {round_index + 1}: {name} {speeds[name][-1]:.1f} tokens/s")
    best = {name: max(values) for name, values in speeds.items()}
    peers = {}
    if not args.no_peers:
        prompt = [int(t) for t in np.random.default_rng(0).integers(3, config.vocab_size, 16)]
        with tempfile.TemporaryDirectory() as scratch:
            _, _, hf_dir = prepare("smollm2", scratch)
            peers["hf_generate_fp32"] = hf_decode(hf_dir, prompt, NEW, args.reps)
        peers["llama_cpp_q4_1"] = llama_cpp_decode(gguf, prompt, args.reps)

    fp32_bytes = quantize.weight_bytes(reference.params)
    sizes = {name: quantize.weight_bytes(m.params) / fp32_bytes for name, m in models.items()}

    def ratio(a, b):
        return None if not a or not b else a / b

    hf = (peers.get("hf_generate_fp32") or {}).get("decode_tokens_per_s")
    llama = (peers.get("llama_cpp_q4_1") or {}).get("decode_tokens_per_s")
    result = {
        "model": "SmolLM2-135M-Instruct (bundled Q4_1 GGUF, dequantized to fp32 = reference)",
        "isa": kernel.isa(),
        "eval_tokens": len(tokens),
        "scored_tokens": quality["reference"]["scored_tokens"],
        "reference_ppl": quality["reference"]["ppl"],
        "quality": {name: quality[name] for name in candidates},
        "decode_tokens_per_s": best,
        "decode_rounds": speeds,
        "peers": peers,
        "weight_ratio": sizes,
        "int8_ratio_vs_fp32_b1": ratio(best["int8"], best["fp32"]),
        "int8_ratio_vs_hf_b1": ratio(best["int8"], hf),
        "int4_ratio_vs_fp32_b1": ratio(best["int4_g32"], best["fp32"]),
        "int4_ratio_vs_llama_cpp": ratio(best["int4_g32"], llama),
        "int8_dppl": quality["int8"]["dppl_pct"],
        "int8_kl": quality["int8"]["kl"],
        "int8_top1": quality["int8"]["top1"],
        "int4_rtn_kl_over_q4_0": quality["int4_g32"]["kl"] / quality["q4_0"]["kl"],
        "int4_kl_over_q4_0": quality["int4_g32_gptq"]["kl"] / quality["q4_0"]["kl"],
        "distill_ppl_over_ce_only": quality["depth20 distilled"]["ppl"]
        / quality["depth20 ce_only"]["ppl"],
        "distill_recovered_fraction": (
            quality["depth20 (no healing)"]["ppl"] - quality["depth20 distilled"]["ppl"]
        )
        / (quality["depth20 (no healing)"]["ppl"] - quality["reference"]["ppl"]),
        "distill_tokens": args.distill_steps * 4 * 128,
        "distill_s": distill_s,
        "depth20_decode_speedup": ratio(best["depth20"], best["fp32"]),
        "depth20_layers_kept": keep,
        "gptq_s": gptq_s,
        "quality_s": quality_s,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
