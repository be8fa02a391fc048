#!/usr/bin/env python
"""The torch peers of shared/peers on a GPU: HF `generate` decode and the nanoGPT train step.

  python3 bench/gpu/torch_peers.py --peers DIR decode [--batches 1,8,64] [--reps 7]
  python3 bench/gpu/torch_peers.py --peers DIR train [--batch 64] [--steps 20] [--variants ...]

DIR holds a copy of shared/peers (gpt_torch.py, refsmall.py). The measurements are those of
decode_hf.py and train_torch.py, with the model and its inputs on cuda (cpu when there is no
GPU, for a dry run) and torch.cuda.synchronize() before every clock read:
- decode: t_prefill = generate(max_new_tokens=1), t_full = generate(max_new_tokens=new),
  greedy, KV cache, sdpa; decode tokens/s = batch * (new - 1) / (t_full - t_prefill), medians
  over reps; one warm-up generate(4) first (its time is reported as warmup_s).
- train: forward, cross-entropy, backward, clip_grad_norm(1.0), AdamW (nanoGPT groups,
  lr 3e-4, betas 0.9/0.95, wd 0.1), zero_grad, loss.item(); fresh random tokens each step
  (drawn on the device); median step after warm-up. Variants: fp32 (torch's default: full fp32
  matmuls), fp32-tf32 (set_float32_matmul_precision("high"), what XLA does for f32 dots on
  GPU by default), bf16 (torch.autocast bfloat16, params fp32: nanoGPT's GPU setting),
  bf16-compile (the same under torch.compile).
One JSON line per measurement.
"""

import argparse
import json
import os
import statistics
import sys
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--peers", required=True)
    parser.add_argument("what", choices=["decode", "train"])
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", default="fp32,fp32-tf32,bf16")
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.peers))
    if args.what == "decode":
        decode(args)
    else:
        train(args)


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def decode(args):
    import gpt_torch
    import refsmall
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    device = _device()
    c = dict(refsmall.REF_SMALL)
    torch.manual_seed(0)
    model = gpt_torch.hf_gpt2(c, "sdpa").eval().to(device)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = torch.randint(
            0, c["vocab"], (batch, args.prompt), generator=torch.Generator().manual_seed(2)
        ).to(device)
        mask = torch.ones_like(ids)

        def gen(n, ids=ids, mask=mask):
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=False,
                    max_new_tokens=n,
                    use_cache=True,
                )
            _sync(device)
            return out

        t0 = time.perf_counter()
        gen(4)
        warmup_s = time.perf_counter() - t0
        pre, full = [], []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            gen(1)
            pre.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = gen(args.new)
            full.append(time.perf_counter() - t0)
            assert tuple(out.shape) == (batch, args.prompt + args.new), out.shape
        tp, tf = statistics.median(pre), statistics.median(full)
        dec = max(tf - tp, 1e-9)
        print(
            json.dumps(
                {
                    "bench": "decode",
                    "impl": "hf-generate",
                    "device": str(device),
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "batch": batch,
                    "reps": args.reps,
                    "warmup_s": round(warmup_s, 3),
                    "t_prefill_s_median": round(tp, 5),
                    "t_full_s_median": round(tf, 5),
                    "t_full_s_min": round(min(full), 5),
                    "t_full_s_max": round(max(full), 5),
                    "decode_tokens_per_s": round(batch * (args.new - 1) / dec, 1),
                    "ms_per_step": round(1000 * dec / (args.new - 1), 4),
                }
            ),
            flush=True,
        )


def train(args):
    import gpt_torch
    import refsmall
    import torch
    import torch.nn.functional as F

    device = _device()
    c = dict(refsmall.REF_SMALL, batch=args.batch)
    B, T, V = c["batch"], c["ctx"], c["vocab"]
    fpt = refsmall.train_flops_per_token(c)
    for variant in args.variants.split(","):
        torch.set_float32_matmul_precision("high" if variant == "fp32-tf32" else "highest")
        torch.manual_seed(0)
        model = gpt_torch.GPT(c).to(device).train()
        opt = gpt_torch.adamw(model)
        fwd = torch.compile(model) if variant.endswith("compile") else model
        autocast = variant.startswith("bf16") and device.type == "cuda"
        generator = torch.Generator(device=device).manual_seed(1)

        def step(fwd=fwd, opt=opt, model=model, autocast=autocast, generator=generator):
            x = torch.randint(0, V, (B, T), generator=generator, device=device)
            y = torch.randint(0, V, (B, T), generator=generator, device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = fwd(x)
                loss = F.cross_entropy(logits.view(-1, V).float(), y.view(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

        t0 = time.perf_counter()
        first = step()
        first_step_s = time.perf_counter() - t0
        for _ in range(args.warmup - 1):
            step()
        times, losses = [], []
        for _ in range(args.steps):
            _sync(device)
            t0 = time.perf_counter()
            losses.append(step())
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        print(
            json.dumps(
                {
                    "bench": "train",
                    "impl": "nanogpt-torch",
                    "variant": variant,
                    "device": str(device),
                    "torch": torch.__version__,
                    "batch": B,
                    "seq": T,
                    "steps": args.steps,
                    "first_step_s": round(first_step_s, 3),
                    "step_s_median": round(med, 5),
                    "step_s_min": round(min(times), 5),
                    "step_s_max": round(max(times), 5),
                    "tokens_per_s": round(B * T / med, 1),
                    "flops_per_token": fpt,
                    "achieved_tflops": round(fpt * B * T / med / 1e12, 2),
                    "loss_first": round(first, 4),
                    "loss_last": round(losses[-1], 4),
                }
            ),
            flush=True,
        )
        del model, opt, fwd


if __name__ == "__main__":
    main()
