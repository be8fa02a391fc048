"""Checkpoint save / restore throughput of a ref_small train state, local and on a GCS emulator.

  .venv/bin/python bench/checkpoint.py [--rounds 3]

Reference: np.save / np.load of the same arrays to the same local disk, in the same run.
Also: how long the training loop is blocked by one asynchronous save, against the step time.
The last line is one JSON object.

Restores are timed twice, each for numpy and Orbax alike: "cold" after dropping the page cache
(`sync; echo 1 > /proc/sys/vm/drop_caches`, where permitted: what a restart after preemption
reads) and "warm" right after the save (the files still in memory: np.load is then a memcpy
of 398 arrays, Orbax a per-array TensorStore read). `restore_ratio_vs_numpy` is the cold
ratio when the cache could be dropped (`cold_reads`), else the warm one.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import grain  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from launch import config as gin_config  # noqa: E402
from research import sharding  # noqa: E402
from research.checkpoint import CheckpointConfig, Checkpointer, abstract_with_shardings  # noqa: E402
from research.model import ModelConfig  # noqa: E402
from research.train import TrainConfig, build_trainer  # noqa: E402
from tests.storage_emulators import fake_gcs_server  # noqa: E402


def _batch(config, vocab):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (config.batch_size, config.seq_len + 1), np.int32)
    shape = (config.batch_size, config.seq_len)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.tile(np.arange(config.seq_len, dtype=np.int32), (config.batch_size, 1)),
        "segment_ids": np.ones(shape, np.int32),
        "weights": np.ones(shape, np.float32),
    }


def _iterator():
    return iter(grain.MapDataset.range(1000).to_iter_dataset())


def drop_page_cache() -> bool:
    """Writes dirty pages and drops the page cache; False where not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def numpy_round(leaves, directory):
    """(save s, warm restore s, cold restore s)."""
    start = time.perf_counter()
    for index, leaf in enumerate(leaves):
        np.save(os.path.join(directory, f"{index}.npy"), leaf)
    save_s = time.perf_counter() - start

    def load():
        start = time.perf_counter()
        loaded = [np.load(os.path.join(directory, f"{i}.npy")) for i in range(len(leaves))]
        assert all(a.shape == b.shape for a, b in zip(loaded, leaves, strict=True))
        return time.perf_counter() - start

    warm_s = load()
    drop_page_cache()
    return save_s, warm_s, load()


def orbax_round(workdir, trainer, state):
    checkpointer = Checkpointer(workdir, CheckpointConfig(async_save=False, keep=1))
    start = time.perf_counter()
    checkpointer.save(1, state, _iterator(), {})
    checkpointer.wait()
    save_s = time.perf_counter() - start
    target = abstract_with_shardings(state, trainer.shardings)

    def restore():
        start = time.perf_counter()
        params, opt_state = checkpointer.restore(1, target, _iterator())
        jax.block_until_ready((params, opt_state))
        return time.perf_counter() - start

    warm_s = restore()
    drop_page_cache()
    cold_s = restore()
    checkpointer.close()
    return save_s, warm_s, cold_s


def blocked_round(workdir, trainer, state, batch):
    """(seconds the loop is blocked inside save(), how much longer the next step takes while
    the save writes (on CPU the save's threads share the cores with the step; on an
    accelerator they use the idle host), one train step's time, the state)."""
    checkpointer = Checkpointer(workdir, CheckpointConfig(async_save=True, keep=1))
    step_times = []

    def timed_step(state):
        start = time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        float(metrics["loss"])
        return state, time.perf_counter() - start

    with jax.set_mesh(trainer.mesh):
        for _ in range(3):
            state, step_s = timed_step(state)
            step_times.append(step_s)
        jax.block_until_ready(state)
        start = time.perf_counter()
        checkpointer.save(int(state.step), state, _iterator(), {})
        in_save_s = time.perf_counter() - start
        state, next_step_s = timed_step(state)  # Runs while the save writes.
    checkpointer.wait()
    checkpointer.close()
    step_s = statistics.median(step_times)
    return in_save_s, max(0.0, next_step_s - step_s), step_s, state


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    gin_config.parse([os.path.join(ROOT, "configs", "model", "ref_small.gin")], [])
    model_config = gin_config.build(ModelConfig)
    config = TrainConfig(num_steps=1000, batch_size=8, seq_len=256, mesh_shape=(1, 1, 1))
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    trainer, state = build_trainer(model_config, config, mesh)
    batch = sharding.global_batch(mesh, _batch(config, model_config.vocab_size))
    leaves = [
        np.asarray(x) for x in jax.tree.leaves(jax.device_get((state.params, state.opt_state)))
    ]
    gigabytes = sum(leaf.nbytes for leaf in leaves) / 1e9
    save_every = 200  # configs/base.gin's checkpoint.save_every.
    rows = []
    cold_reads = drop_page_cache()
    with fake_gcs_server(buckets=("bench",)):
        for index in range(args.rounds):
            local = tempfile.mkdtemp(prefix="cirrus-bench-ckpt-")
            np_save, np_warm, np_cold = numpy_round(leaves, local)
            shutil.rmtree(local)
            local = tempfile.mkdtemp(prefix="cirrus-bench-ckpt-")
            save_s, warm_s, cold_s = orbax_round(local, trainer, state)
            blocked_s, slowdown_s, step_s, state = blocked_round(
                local + "-async", trainer, state, batch
            )
            shutil.rmtree(local)
            shutil.rmtree(local + "-async", ignore_errors=True)
            gcs_save_s, _, gcs_restore_s = orbax_round(f"gs://bench/round{index}", trainer, state)
            np_restore, restore_s = (np_cold, cold_s) if cold_reads else (np_warm, warm_s)
            row = {
                "np_save_gbps": gigabytes / np_save,
                "np_restore_gbps": gigabytes / np_restore,
                "np_restore_warm_gbps": gigabytes / np_warm,
                "save_gbps": gigabytes / save_s,
                "restore_gbps": gigabytes / restore_s,
                "restore_warm_gbps": gigabytes / warm_s,
                "gcs_save_gbps": gigabytes / gcs_save_s,
                "gcs_restore_gbps": gigabytes / gcs_restore_s,
                "blocked_s": blocked_s,
                "next_step_slowdown_s": slowdown_s,
                "step_s": step_s,
            }
            rows.append(row)
            print(json.dumps({"round": index, **{k: round(v, 4) for k, v in row.items()}}))

    def median(name):
        return statistics.median(row[name] for row in rows)

    summary = {
        "bench": "checkpoint",
        "model": "ref_small",
        "state_gb": round(gigabytes, 4),
        "save_gbps": round(median("save_gbps"), 3),
        "restore_gbps": round(median("restore_gbps"), 3),
        "gcs_save_gbps": round(median("gcs_save_gbps"), 3),
        "gcs_restore_gbps": round(median("gcs_restore_gbps"), 3),
        "numpy_save_gbps": round(median("np_save_gbps"), 3),
        "numpy_restore_gbps": round(median("np_restore_gbps"), 3),
        "blocked_s_per_save": round(median("blocked_s"), 4),
        "next_step_slowdown_s": round(median("next_step_slowdown_s"), 4),
        "step_s": round(median("step_s"), 4),
        "blocked_fraction_of_step": round(
            statistics.median(r["blocked_s"] / r["step_s"] for r in rows), 4
        ),
        "blocked_fraction_of_interval": round(
            statistics.median(r["blocked_s"] / (r["step_s"] * save_every) for r in rows), 5
        ),
        "cold_reads": cold_reads,
        "restore_warm_gbps": round(median("restore_warm_gbps"), 3),
        "numpy_restore_warm_gbps": round(median("np_restore_warm_gbps"), 3),
        "restore_ratio_vs_numpy_warm": round(
            statistics.median(r["restore_warm_gbps"] / r["np_restore_warm_gbps"] for r in rows), 3
        ),
        "restore_ratio_vs_numpy": round(
            statistics.median(r["restore_gbps"] / r["np_restore_gbps"] for r in rows), 3
        ),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
