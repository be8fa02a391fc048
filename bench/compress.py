"""Compression on the model users run (SmolLM2-135M-Instruct from the bundled GGUF): quality
against the fp32 model on the shipped held-out text, and batch-1 decode speed against Cirrus
fp32, HF transformers generate (fp32) and llama.cpp, all in the same run.

  .venv/bin/python bench/compress.py [--eval_tokens 32768] [--reps 5] [--rounds 2] [--no_peers]

Quality (research/compression/evaluate.py, windows of 512, second half scored): int8 in
groups of 32 (round-to-nearest and GPTQ; the shipped recipe
configs/compress/smollm2_int8.gin makes the GPTQ one, whose figures are the headline int8_*)
and per output channel; int4 (symmetric, Q4_0's grid) g32 and int4_asym (scale + min, Q4_1's
grid) g32 and g64, each round-to-nearest and GPTQ (calibrated on the bundled corpus);
llama.cpp's Q8_0 / Q4_0 / Q4_1 made by the `gguf` package's quantizers; the 20-layer model
healed for --distill_steps by distillation and by cross-entropy alone (same data, steps,
init). The headline int4 figures are those of the shipped recipes
(configs/compress/smollm2_int4.gin and smollm2_int4_gptq.gin: their quant, group and
method). Speed: greedy decode tokens/s at batch 1 through the serving Sampler
(research/compression/speed.py: 16-token prompt, 64 new tokens), the median of --reps, best
of --rounds (rounds interleave the models, so load from a neighbour hits all alike). Depth:
SmolLM2 pruned from 30 to 20 layers by layer influence, decode speed over the original. The
last line is one JSON object.
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
from launch import config as gin_config  # noqa: E402
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
from research.compression.config import CompressConfig  # noqa: E402

NEW = 64
# The shipped recipes: the headline figures are of the models they make.
INT8_RECIPE = "configs/compress/smollm2_int8.gin"
RTN_RECIPE = "configs/compress/smollm2_int4.gin"
GPTQ_RECIPE = "configs/compress/smollm2_int4_gptq.gin"
# int4 forms measured, each round-to-nearest and by GPTQ: (quant, group).
INT4_FORMS = (("int4", 32), ("int4_asym", 32), ("int4_asym", 64))


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def model_name(quant: str, group: int, method: str) -> str:
    """This script's name for a quantized model, e.g. int4_asym_g32_gptq."""
    return f"{quant}_g{group}" + ("_gptq" if method == "gptq" else "")


def recipe_model(path: str) -> str:
    """The model_name of what a compress recipe (a gin file) makes."""
    gin_config.parse([os.path.join(ROOT, path)])
    recipe = gin_config.build(CompressConfig)
    return model_name(recipe.quant, recipe.quant_group, recipe.method)


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

    rtn_name, gptq_name = recipe_model(RTN_RECIPE), recipe_model(GPTQ_RECIPE)
    models = {"int8": build(*quantize.quantize_params(config, params, "int8", 32))}
    models["int8_per_channel"] = build(*quantize.quantize_params(config, params, "int8", 0))
    for quant, group in INT4_FORMS:
        models[model_name(quant, group, "rtn")] = build(
            *quantize.quantize_params(config, params, quant, group)
        )
    batches = corpus.calibration_batches(original.tokenizer, args.calibration_sequences, 512)
    start = time.perf_counter()
    hessians = gptq.collect_hessians(reference.graphdef, reference.params, batches, log=_log)
    hessians_s, gptq_s = time.perf_counter() - start, {}
    for quant, group in (("int8", 32), *INT4_FORMS):
        start = time.perf_counter()
        overrides = gptq.gptq_overrides(config, params, hessians, quant, group, log=_log)
        name = model_name(quant, group, "gptq")
        models[name] = build(
            *quantize.quantize_params(config, params, quant, group, overrides=overrides)
        )
        gptq_s[name] = time.perf_counter() - start
    # RTN int8 g32 is "int8" here; GPTQ's loop names its twin "int8_g32_gptq".
    int8_name = {"int8_g32": "int8"}.get(recipe_model(INT8_RECIPE), recipe_model(INT8_RECIPE))
    missing = {rtn_name, gptq_name, int8_name} - set(models)
    if missing:
        sys.exit(f"the int4 recipes make {sorted(missing)}; add their form to INT4_FORMS")
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
    for kind in ("q8_0", "q4_0", "q4_1"):
        clone = from_pretrained(original)
        clone.params = evaluate.gguf_baseline(config, reference.params, kind)
        candidates[kind] = clone
    candidates["depth20 (no healing)"] = depth20
    candidates["depth20 distilled"] = healed["distilled"]
    candidates["depth20 ce_only"] = healed["ce_only"]
    start = time.perf_counter()
    quality = evaluate.compare(reference, candidates, tokens, window=512, log=_log)
    quality_s = time.perf_counter() - start

    # Speed: rounds interleave the models (one of each stored form; GPTQ's is its RTN twin's).
    forms = dict.fromkeys(("int8", "int8_per_channel", "int4_g32", "int4_asym_g32", rtn_name))
    timed = {"fp32": reference, **{name: models[name] for name in forms}, "depth20": depth20}
    speeds = {name: [] for name in timed}
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
    q4_0_kl = quality["q4_0"]["kl"]
    rtn_speed = best[rtn_name]
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
        "int8_recipe": int8_name,  # GPTQ's speed is its RTN twin's: the same stored form.
        "int8_ratio_vs_fp32_b1": ratio(best["int8"], best["fp32"]),
        "int8_ratio_vs_hf_b1": ratio(best["int8"], hf),
        "int4_recipes": {"rtn": rtn_name, "gptq": gptq_name},
        "int4_ratio_vs_fp32_b1": ratio(rtn_speed, best["fp32"]),
        "int4_ratio_vs_llama_cpp": ratio(rtn_speed, llama),
        "int4_asym_over_int4_speed": ratio(best["int4_asym_g32"], best["int4_g32"]),
        "int8_dppl": quality[int8_name]["dppl_pct"],
        "int8_kl": quality[int8_name]["kl"],
        "int8_top1": quality[int8_name]["top1"],
        "int8_rtn_top1": quality["int8"]["top1"],
        "int4_rtn_kl_over_q4_0": quality[rtn_name]["kl"] / q4_0_kl,
        "int4_kl_over_q4_0": quality[gptq_name]["kl"] / q4_0_kl,
        "kl_over_q4_0": {name: quality[name]["kl"] / q4_0_kl for name in candidates},
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
        "hessians_s": hessians_s,
        "gptq_s": gptq_s,
        "quality_s": quality_s,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
