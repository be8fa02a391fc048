"""The tied LM head on XLA:CPU: SmolLM2's [49,152, 576] fp32 table, read as the model reads it
([V, D], contracted over D) against a transposed [D, V] copy, at decode batch sizes, with
XLA's default dot path (YNNPACK fusions) and with Eigen (YNNPACK off), and packed as the
Sampler holds it on one CPU device (the head kernel [D, V] in 32-column panels,
research/serving/core/packed.py, through its C++ kernel), against the copy bandwidth
measured in the same run. Also checks that the compiled decode step of the real model reads
the table in place (no copy or transpose of a table-sized array in its HLO).

  .venv/bin/python bench/head.py [--reps 15] [--skip_step]

The last line is one JSON object; GB/s = table bytes / median time.
"""

import argparse
import json
import os
import re
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from research.serving.core import packed  # noqa: E402

VOCAB, DIM = 49152, 576
YNN_OFF = {"xla_cpu_experimental_ynn_fusion_type": ""}


def median_s(fn, args, reps: int) -> float:
    fn(*args).block_until_ready()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def head_figures(reps: int) -> dict:
    rng = np.random.default_rng(0)
    table_vd = jnp.asarray(rng.standard_normal((VOCAB, DIM), np.float32))
    table_dv = jnp.asarray(np.asarray(table_vd).T.copy())
    figures = {}
    for path, options in (("ynn", {}), ("eigen", YNN_OFF)):
        for batch in (1, 4, 16):
            x = jnp.asarray(rng.standard_normal((batch, DIM), np.float32))
            for layout, table, equation in (
                ("vd", table_vd, "bd,vd->bv"),
                ("dv", table_dv, "bd,dv->bv"),
            ):
                fn = jax.jit(lambda x, t, e=equation: jnp.einsum(e, x, t))
                compiled = fn.lower(x, table).compile(compiler_options=options)
                seconds = median_s(compiled, (x, table), reps)
                rate = table_vd.nbytes / seconds / 1e9
                figures[f"{path}_b{batch}_{layout}_GBps"] = round(rate, 1)
    if packed.available():
        table_packed = packed.pack(table_dv)
        for batch in (1, 4, 16):
            x = jnp.asarray(rng.standard_normal((batch, DIM), np.float32))
            seconds = median_s(jax.jit(packed.dot), (x, table_packed), reps)
            figures[f"packed_b{batch}_GBps"] = round(table_vd.nbytes / seconds / 1e9, 1)
    return figures


def step_reads_table_in_place() -> bool:
    """True if no copy / transpose in SmolLM2's compiled 16-row decode step outputs a
    table-sized array."""
    from bench.serve import smollm2_gguf
    from research.checkpoint import load
    from research.serving.core.sampler import Sampler

    loaded = load(smollm2_gguf())
    sampler = Sampler(
        loaded.model_config, loaded.graphdef, loaded.params, num_slots=16, max_len=2048
    )
    sampler.compile_bucket(16, 256)
    text = sampler._executables[(16, 256)].as_text()
    shapes = f"{VOCAB},{DIM}|{DIM},{VOCAB}|{VOCAB // packed.PANEL},{DIM},{packed.PANEL}"
    table = re.compile(rf"f32\[({shapes})\]\S* (copy|transpose)\(")
    return not any(table.search(line) for line in text.splitlines())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--skip_step", action="store_true")
    args = parser.parse_args()
    from bench.serve import copy_bandwidth

    result = {"bench": "head", "vocab": VOCAB, "dim": DIM, "copy_GBps": copy_bandwidth()}
    result.update(head_figures(args.reps))
    if not args.skip_step:
        result["decode_step_reads_table_in_place"] = step_reads_table_in_place()
    result["loadavg_1m"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
