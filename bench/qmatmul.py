"""The quantized matmul kernel (research/compression/qmatmul.cc) against XLA's f32 dot, on
SmolLM2-135M's matrix shapes, in the same run.

  .venv/bin/python bench/qmatmul.py [--reps 30]

Per shape and row count M: microseconds per call (median of --reps, each a jitted loop of 20
calls so dispatch is amortised), the weight bytes read per microsecond as GB/s, and the ratio
f32 time / quantized time. "step" sums one decode step's worth of matmuls at M = 1 (30 layers
x q, k, v, o, gate, up, down + the tied head). The last line is one JSON object.
"""

import argparse
import json
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
PER_STEP = {"q/o": 60, "k/v": 60, "gate/up": 60, "down": 30, "head": 1}
CALLS = 20


def _time(fn, *args, reps: int) -> float:
    """Median seconds per call of fn (a jitted loop of CALLS calls)."""
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append((time.perf_counter() - start) / CALLS)
    return statistics.median(samples)


def _looped(matmul):
    """CALLS dependent calls in one jit (each input depends on the last output)."""

    def run(x, *weights):
        def body(_, carry):
            y = matmul(carry, *weights)
            return carry + 1e-30 * y[:, :1]

        return jax.lax.fori_loop(0, CALLS, body, x)

    return jax.jit(run)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--rows", default="1,4,16")
    args = parser.parse_args()
    if not kernel.available():
        sys.exit("build the kernel first: make kernels")
    rng = np.random.default_rng(0)
    f32 = _looped(lambda x, w: jnp.dot(x, w))
    results, step = {}, {"f32": 0.0, "int8": 0.0, "int4_g32": 0.0, "int4_asym_g32": 0.0}
    for name, (k, n) in SHAPES.items():
        w = rng.normal(size=(k, n)).astype(np.float32)
        forms = {"int8": qz.QuantSpec(8, k), "int4_g32": qz.QuantSpec(4, 32),
                 "int4_g64": qz.QuantSpec(4, 64),
                 "int4_asym_g32": qz.QuantSpec(4, 32, asym=True)}  # fmt: skip
        for m in [int(r) for r in args.rows.split(",")]:
            x = rng.normal(size=(m, k)).astype(np.float32)
            t32 = _time(f32, x, w, reps=args.reps)
            row = {"f32_us": t32 * 1e6, "f32_gb_s": k * n * 4 / t32 / 1e9}
            for form, spec in forms.items():
                q, s, mins = qz.quantize(w, spec)
                groups = (s,) if mins is None else (s, mins)
                fn = _looped(
                    lambda x, q, *g, spec=spec: kernel.qmatmul(x, q, *g, bits=spec.bits,
                                                               group=spec.group)
                )  # fmt: skip
                t = _time(fn, x, q, *groups, reps=args.reps)
                row[f"{form}_us"] = t * 1e6
                row[f"{form}_gb_s"] = (q.nbytes + sum(a.nbytes for a in groups)) / t / 1e9
                row[f"{form}_vs_f32"] = t32 / t
                if m == 1 and form in step:
                    step[form] += PER_STEP[name] * t
            if m == 1:
                step["f32"] += PER_STEP[name] * t32
            results[f"{name} {k}x{n} M={m}"] = {key: round(v, 3) for key, v in row.items()}
            print(f"{name:8s} {k}x{n} M={m}: " + ", ".join(
                f"{key} {v:.1f}" for key, v in row.items()), flush=True)  # fmt: skip
    step_ms = {form: round(t * 1e3, 3) for form, t in step.items()}
    print(json.dumps({"isa": kernel.isa(), "shapes": results, "decode_step_matmuls_ms": step_ms,
                      "int8_step_ratio": step["f32"] / step["int8"],
                      "int4_step_ratio": step["f32"] / step["int4_g32"],
                      "int4_asym_step_ratio": step["f32"] / step["int4_asym_g32"]}))  # fmt: skip


if __name__ == "__main__":
    main()
