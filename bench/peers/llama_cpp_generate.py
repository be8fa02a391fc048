#!/usr/bin/env python
"""llama.cpp (through llama-cpp-python) greedy decode of a GGUF file, in the peers' virtualenv:
the CPU engine bench/compress.py compares Cirrus's quantized decode with, same run.

  PEERS_PYTHON bench/peers/llama_cpp_generate.py --model FILE.gguf --prompt_ids 1,2,3 --new 64

Install once into the peers' venv (builds llama.cpp from source, ~9 minutes on 2 cores):
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
    -DGGML_OPENMP=OFF" pip install llama-cpp-python
(the native build crashed at the first token on an Intel Xeon with AMX; AMD builds natively).
As hf_generate.py: decode tokens/s = (new - 1) / (t(new tokens) - t(first token)), medians of
--reps; eos is not a stop (generation is driven token by token). Prints one JSON line.
"""

import argparse
import json
import statistics
import time

from llama_cpp import Llama

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--prompt_ids", required=True)
parser.add_argument("--new", type=int, default=64)
parser.add_argument("--reps", type=int, default=3)
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()

llm = Llama(model_path=args.model, n_ctx=512, n_threads=args.threads, verbose=False)
prompt = [int(t) for t in args.prompt_ids.split(",")]


def run(new: int) -> float:
    llm.reset()
    start = time.perf_counter()
    for count, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True), 1):
        if count >= new:
            break
    return time.perf_counter() - start


run(4)
first = statistics.median(run(1) for _ in range(args.reps))
full = statistics.median(run(args.new) for _ in range(args.reps))
print(json.dumps({
    "decode_tokens_per_s": (args.new - 1) / max(full - first, 1e-9),
    "t_first_s": first,
    "t_full_s": full,
}))  # fmt: skip
