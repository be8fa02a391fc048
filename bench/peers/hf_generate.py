#!/usr/bin/env python
"""transformers `generate` (greedy, KV cache) on a Hugging Face model directory, in the peers'
virtualenv (../shared/peers/run.sh makes it): the reference bench/serve.py measures against,
on the same fp32 weights in the same run.

  PEERS_PYTHON bench/peers/hf_generate.py --model DIR --prompt_ids 1,2,3 --new 128 [--reps 3]

As ../shared/peers/decode_hf.py: times generate(max_new_tokens=new) and
generate(max_new_tokens=1) (= prefill + first token); decode tokens/s = (new - 1) /
(t_full - t_first). eos is ignored (min_new_tokens = new). Prints one JSON line.
"""

import argparse
import json
import os
import statistics
import time

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--prompt_ids", required=True)
parser.add_argument("--new", type=int, default=128)
parser.add_argument("--reps", type=int, default=3)
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()
for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(name, str(args.threads))

import torch  # noqa: E402
import transformers  # noqa: E402

torch.set_num_threads(args.threads)
transformers.logging.set_verbosity_error()
model = transformers.AutoModelForCausalLM.from_pretrained(
    args.model, dtype=torch.float32, attn_implementation="sdpa"
).eval()
ids = torch.tensor([[int(t) for t in args.prompt_ids.split(",")]])


def generate(new: int):
    with torch.inference_mode():
        return model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=0,
        )


generate(4)  # Warm-up.
full, first = [], []
for _ in range(args.reps):
    start = time.perf_counter()
    generate(1)
    first.append(time.perf_counter() - start)
    start = time.perf_counter()
    out = generate(args.new)
    full.append(time.perf_counter() - start)
    assert out.shape[1] == ids.shape[1] + args.new, out.shape
t_full, t_first = statistics.median(full), statistics.median(first)
print(
    json.dumps(
        {
            "impl": "hf-generate",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": args.threads,
            "prompt": ids.shape[1],
            "new": args.new,
            "decode_tokens_per_s": round((args.new - 1) / max(t_full - t_first, 1e-9), 2),
            "t_full_s": round(t_full, 4),
            "t_first_s": round(t_first, 4),
        }
    ),
    flush=True,
)
