"""The quantized matmul kernel (research/compression/qmatmul.cc) against XLA's f32 dot, on
SmolLM2-135M's matrix shapes, in the same run.

  .venv/bin/python bench/qmatmul.py [--reps 7] [--rows 1,4,16]

Weights come from DRAM, as in decode: each timing is one jitted chain of distinct copies of
the matrix (at least --chain_mb of int8 in all; each call's input depends on the last output).
Per shape and row count M: microseconds per call (median of --reps), weight bytes (scales
included) per second, and f32 time / quantized time. "decode_step_ms" times one decode step's
worth of distinct matrices at M = 1 (30 layers x q, k, v, o, gate, up, down + the tied head);
its gap to bytes / bandwidth is the per-call overhead. The last line is one JSON object.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from research.compression import kernel  # noqa: E402
from research.compression import quantize as qz  # noqa: E402

SHAPES = {"q/o": (576, 576), "k/v": (576, 192), "gate/up": (576, 1536), "down": (1536, 576),
          "head": (576, 49152)}  # fmt: skip
LAYER = ["q/o", "k/v", "k/v", "q/o", "gate/up", "gate/up", "down"]
NUM_LAYERS = 30
# int4 groups: 128 does not divide SmolLM2's d_model (576).
FORMS = {"int8": (8, None), "int4_g32": (4, 32), "int4_g64": (4, 64)}


def _time(fn, *args, reps: int) -> float:
    """Median seconds of one call of fn."""
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _chain(matmul, ks):
    """(xs {K: x [M, K]}, weights of one call per K in ks) -> a scalar, in one jit: the calls
    run in order (each input depends on the last output) and none is dead."""

    def run(xs, weights):
        carry = jnp.zeros((), jnp.float32)
        for k, w in zip(ks, weights, strict=True):
            y = matmul(xs[k] + carry, *w)
            carry = carry + 1e-30 * y[0, 0]
        return carry

    return jax.jit(run)


def _form(form: str):
    """(matmul, make): matmul(x, *weights) and make(w [K, N] f32) -> weights."""
    if form == "f32":
        return (lambda x, w: jnp.dot(x, w)), (lambda w: (w,))
    bits, group = FORMS[form]

    def matmul(x, q, s):
        return kernel.qmatmul(x, q, s, bits=bits, group=group or x.shape[1])

    return matmul, lambda w: qz.quantize(w, qz.QuantSpec(bits, group or w.shape[0]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--rows", default="1,4,16")
    parser.add_argument("--chain_mb", type=float, default=64)
    args = parser.parse_args()
    if not kernel.available():
        sys.exit("build the kernel first: make kernels")
    rng = np.random.default_rng(0)
    forms = ["f32", *FORMS]
    results = {}
    for name, (k, n) in SHAPES.items():
        w = rng.normal(size=(k, n)).astype(np.float32)
        copies = math.ceil(args.chain_mb * 2**20 / (k * n))
        rows = {}
        for form in forms:
            matmul, make = _form(form)
            one = make(w)
            weights = [tuple(jnp.array(a) for a in one) for _ in range(copies)]
            fn = _chain(matmul, [k] * copies)
            for m in [int(r) for r in args.rows.split(",")]:
                xs = {k: jnp.asarray(rng.normal(size=(m, k)).astype(np.float32))}
                t = _time(fn, xs, weights, reps=args.reps) / copies
                row = rows.setdefault(m, {})
                row[f"{form}_us"] = round(t * 1e6, 1)
                row[f"{form}_gb_s"] = round(sum(a.nbytes for a in one) / t / 1e9, 1)
                if form != "f32":
                    row[f"{form}_vs_f32"] = round(row["f32_us"] / row[f"{form}_us"], 2)
            del weights
        for m, row in rows.items():
            results[f"{name} {k}x{n} M={m}"] = row
            print(f"{name:8s} {k}x{n} M={m}: {row}", flush=True)
    # One decode step's matrices, all distinct as in a real model.
    names = LAYER * NUM_LAYERS + ["head"]
    ks = [SHAPES[name][0] for name in names]
    xs = {k: jnp.asarray(rng.normal(size=(1, k)).astype(np.float32)) for k in set(ks)}
    floats = [rng.normal(size=SHAPES[name]).astype(np.float32) for name in names]
    step_ms, step_mb = {}, {}
    for form in forms:
        matmul, make = _form(form)
        weights = [tuple(jnp.array(a) for a in make(w)) for w in floats]
        step_ms[form] = round(_time(_chain(matmul, ks), xs, weights, reps=args.reps) * 1e3, 2)
        step_mb[form] = round(sum(a.nbytes for w in weights for a in w) / 2**20, 1)
        del weights
    print(json.dumps({"isa": kernel.isa(), "shapes": results, "decode_step_ms": step_ms,
                      "decode_step_weight_mb": step_mb}))  # fmt: skip


if __name__ == "__main__":
    main()
