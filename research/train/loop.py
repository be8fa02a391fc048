"""The training loop: jit the pure step once, feed it grain batches, log, evaluate.

Owns the mesh, the jitted functions, the data iterator and the metrics writer; the step
itself (research/train/step.py) stays pure.
"""

import dataclasses
import faulthandler
import functools
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from research import sharding
from research.checkpoint.manager import (
    CheckpointConfig,
    Checkpointer,
    abstract_with_shardings,
    dumps_config,
    restore_latest_usable,
)
from research.data import make_dataset
from research.data.pipeline import FEATURES
from research.data.prepare import load_prepared
from research.errors import UserError
from research.model import ModelConfig, flops_per_token, lora
from research.train import flops
from research.train.config import TrainConfig
from research.train.metrics_writer import (
    MetricsWriter,
    format_duration,
    plot_loss_curve,
    truncate_metrics,
)
from research.train.objective import Objective, next_token
from research.train.optimizer import learning_rate_schedule, make_optimizer
from research.train.state import TrainState, init_train_state
from research.train.step import eval_step, make_train_step


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or Inf loss; the message names the step."""


@dataclasses.dataclass
class Trainer:
    """Everything built once per run: mesh, jitted step/eval, shardings."""

    mesh: jax.sharding.Mesh
    graphdef: object
    shardings: TrainState
    train_step: Callable
    eval_step: Callable
    schedule: Callable


def check_batch_layout(config: TrainConfig, mesh) -> None:
    """Clear errors for a batch the mesh or the hosts cannot split evenly."""
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % batch_shards:
        raise UserError(
            f"train.batch_size={config.batch_size} is not divisible by the mesh's batch axes "
            f"(data x fsdp = {batch_shards} for mesh {dict(mesh.shape)}); use a batch size that "
            f"is a multiple of {batch_shards} or change train.mesh_shape."
        )
    if (config.batch_size // config.micro_batches) % batch_shards:
        raise UserError(
            f"each micro-batch (train.batch_size / train.micro_batches = "
            f"{config.batch_size // config.micro_batches}) must be divisible by the mesh's batch "
            f"axes ({batch_shards}); lower train.micro_batches or raise train.batch_size."
        )
    if config.batch_size % jax.process_count():
        raise UserError(
            f"train.batch_size={config.batch_size} is not divisible by the "
            f"{jax.process_count()} processes."
        )


def build_trainer(
    model_config: ModelConfig, config: TrainConfig, mesh=None, objective: Objective | None = None
) -> tuple:
    """Returns (Trainer, initial TrainState) with the state born sharded on the mesh.

    `objective` (research/train/objective.py) replaces the next-token loss: its extras (a
    teacher, masks) are placed on the mesh once and passed to every step.
    """
    mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh_shape)
    check_batch_layout(config, mesh)
    objective = objective or next_token(config.z_loss)
    if model_config.lora_rank and objective.trainable is None:
        objective = dataclasses.replace(objective, trainable=lora.is_adapter)
    tx = make_optimizer(config, objective.trainable)
    graphdef, state, shardings = init_train_state(mesh, model_config, tx, config.seed)
    step = make_train_step(config, graphdef=graphdef, tx=tx, objective=objective)
    batch_sharding = sharding.batch_sharding(mesh)
    extras, extras_shardings = None, None
    if objective is not None and objective.extras is not None:
        extras_shardings = (
            objective.extras_shardings(mesh, shardings.params)
            if objective.extras_shardings
            else jax.tree.map(lambda _: jax.NamedSharding(mesh, jax.P()), objective.extras)
        )
        extras = jax.device_put(objective.extras, extras_shardings)
    jitted_step = jax.jit(
        step,
        in_shardings=(shardings, batch_sharding, extras_shardings),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
    jitted_eval = jax.jit(
        functools.partial(eval_step, graphdef=graphdef),
        in_shardings=(shardings.params, batch_sharding),
    )
    trainer = Trainer(
        mesh=mesh,
        graphdef=graphdef,
        shardings=shardings,
        train_step=lambda state, batch: jitted_step(state, batch, extras),
        eval_step=jitted_eval,
        schedule=learning_rate_schedule(config),
    )
    return trainer, state


def evaluate(trainer: Trainer, params, batches) -> dict:
    """Loss, perplexity and next-token accuracy over an iterable of host-local batches.

    With several processes every host runs the same number of eval steps: hosts whose
    batches ran out feed zero-weight batches until every host is exhausted (hosts hold
    disjoint documents, so they may get different numbers of batches).
    """
    totals = {"loss_sum": 0.0, "correct": 0.0, "tokens": 0.0}
    if jax.process_count() > 1:
        batches = _lockstep(batches, getattr(batches, "zero_batch", None))
    with jax.set_mesh(trainer.mesh):
        for batch in batches:
            sums = trainer.eval_step(params, sharding.global_batch(trainer.mesh, batch))
            for name in totals:
                totals[name] += float(sums[name])
    tokens = max(totals["tokens"], 1.0)
    loss = totals["loss_sum"] / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "accuracy": totals["correct"] / tokens,
        "tokens": totals["tokens"],
    }


def _lockstep(batches, zero_batch=None):
    """Host batches, then zero-weight batches, until no process has a batch left."""
    iterator = iter(batches)
    padding = zero_batch() if zero_batch is not None else None
    while True:
        batch = next(iterator, None)
        if batch is not None and padding is None:
            padding = {name: np.zeros_like(value) for name, value in batch.items()}
        have = multihost_utils.process_allgather(np.int32(batch is not None))
        if not np.any(have):
            return
        if batch is None:
            if padding is None:
                raise RuntimeError(
                    "this host has no evaluation batch to shape its padding on; pass batches "
                    "with a zero_batch() (see eval_batches)."
                )
            batch = padding
        yield batch


class eval_batches:  # noqa: N801 - used like the generator function it replaces.
    """The first `max_batches` (0 = all) batches of this host's share of a split, in file
    order, the last one padded.

    A host whose share of the split is empty (fewer documents than processes) yields
    nothing; `zero_batch` gives the all-padding batch it feeds in a multi-host evaluation.
    """

    def __init__(self, data_dir: str, split: str, config: TrainConfig, max_batches: int = 0):
        self.data_dir, self.split, self.max_batches = data_dir, split, max_batches
        self.batch_size = config.batch_size // jax.process_count()
        self.seq_len = config.seq_len

    def zero_batch(self) -> dict:
        shape = (self.batch_size, self.seq_len)
        batch = {name: np.zeros(shape, np.int32) for name in FEATURES}
        batch["weights"] = np.zeros(shape, np.float32)
        return batch

    def __iter__(self):
        num_documents = load_prepared(self.data_dir).num_documents(self.split)
        if jax.process_count() > 1 and jax.process_index() >= num_documents:
            return  # Documents go to hosts round-robin: this host has none.
        dataset = make_dataset(
            self.data_dir,
            self.split,
            seq_len=self.seq_len,
            batch_size=self.batch_size,
            shuffle=False,
            num_epochs=1,
        )
        for index, batch in enumerate(dataset):
            if self.max_batches and index >= self.max_batches:
                return
            yield batch


class Preempted(Exception):
    """A preemption notice (SIGTERM) arrived; the state was saved at `step`."""

    def __init__(self, step: int):
        super().__init__(f"preempted: saved a checkpoint at step {step}")
        self.step = step


class PreemptionNotice:
    """Turns SIGTERM into a flag the loop polls between steps (save, then exit 42)."""

    def __init__(self):
        self.requested = False

    def install(self):
        signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True


def _preemption_agreed(preemption, step: int, every: int) -> bool:
    """Whether ANY process got a preemption notice; every process gets the same answer.

    Single-process runs read the local flag. With several processes the flags are
    all-gathered every `every` steps (the same steps on every host), so all hosts save the
    same step and exit together.
    """
    local = preemption is not None and preemption.requested
    if jax.process_count() == 1:
        return local
    if step % every:
        return False
    return bool(np.any(multihost_utils.process_allgather(np.int32(local))))


class Watchdog:
    """Dumps every thread's stack and exits when no step completes within `timeout_s`.

    A hung collective (a dead or stuck peer) otherwise waits forever. Armed by the first
    `beat()` (after the first step has compiled); evaluation and saves also beat.
    """

    EXIT_CODE = 3

    def __init__(self, timeout_s: float, log: Callable[[str], None] = print):
        self.timeout_s = timeout_s
        self.log = log
        self._last = None
        self._stop = threading.Event()
        self._thread = None
        if timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)
            self._thread.start()

    def beat(self):
        self._last = time.monotonic()

    def stop(self):
        self._stop.set()

    def _watch(self):
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            if self._last is not None and time.monotonic() - self._last > self.timeout_s:
                self.log(
                    f"watchdog: no training step completed in {self.timeout_s:g}s "
                    f"(train.watchdog_s); dumping all thread stacks and exiting with code "
                    f"{self.EXIT_CODE}"
                )
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(self.EXIT_CODE)


def train(
    model_config: ModelConfig,
    config: TrainConfig,
    *,
    data_dir: str | None,
    workdir: str,
    log: Callable[[str], None] = print,
    mesh=None,
    checkpoint: CheckpointConfig | None = None,
    meta: dict | None = None,
    preemption: PreemptionNotice | None = None,
    init_params=None,
    task_eval: Callable[..., dict] | None = None,
    objective: Objective | None = None,
    dataset=None,
) -> tuple[Trainer, TrainState, dict]:
    """Trains for config.num_steps; returns (trainer, final state, last metrics).

    With `checkpoint`, resumes from the latest usable step in workdir/ckpt and saves every
    `checkpoint.save_every` steps and at the end. `init_params` (an nnx.State matching the
    model) starts a fresh run from given weights (fine-tuning). A set `preemption.requested`
    saves the current step and raises Preempted. `task_eval(graphdef, params, mesh) ->
    {name: value}` (e.g. research.evaluation.run_suite) runs every `train.task_eval_every`
    steps and at the end; its metrics join the logged record. `objective` replaces the
    next-token loss (distillation from a teacher, masks kept while healing a pruned model).
    `dataset` (a grain IterDataset of host-local batch dicts the objective reads, e.g. DPO's
    preference pairs, research/finetune/dpo.py) replaces the packed train split of
    `data_dir`; with data_dir None there is no next-token validation (`train.eval_every`).
    """
    trainer, state = build_trainer(model_config, config, mesh, objective)
    mesh = trainer.mesh
    is_chief = jax.process_index() == 0
    platform = jax.devices()[0].platform
    # Forced CPU "devices" share the host's cores: the host peak is the peak of them all.
    num_peak_devices = 1 if platform == "cpu" else jax.device_count()
    peak = flops.peak_flops_per_device(config.peak_flops_per_device) * num_peak_devices
    flops_token = flops_per_token(model_config, config.seq_len)
    log(
        f"mesh {dict(mesh.shape)} on {jax.device_count()} {platform} devices, "
        f"{jax.process_count()} process(es); {sum(x.size for x in jax.tree.leaves(state.params)):,}"
        f" parameters; peak {peak / 1e9:,.0f} GFLOP/s"
    )
    if model_config.lora_rank:
        trained, total = lora.trainable_count(state.params)
        log(
            f"LoRA rank {model_config.lora_rank} (alpha {model_config.lora_alpha:g}) on "
            f"{list(model_config.lora_targets)}: {trained:,} of {total:,} parameters train "
            f"({100 * trained / total:.2f}%), the rest frozen"
        )
    if dataset is None:
        dataset = make_dataset(
            data_dir,
            "train",
            seq_len=config.seq_len,
            batch_size=config.batch_size // jax.process_count(),
            seed=config.seed,
        )
    iterator = iter(dataset)
    checkpointer = None
    meta = dict(meta or {}, model_config=dumps_config(model_config), data_dir=data_dir)
    base = _lora_base(model_config, checkpoint, meta, init_params)
    if base is not None:
        meta["lora_base"] = base
        log(
            f"checkpoints hold the LoRA adapters only; the base is re-read from "
            f"{base['source']['path']} (fingerprint {base['fingerprint']})"
        )
    if init_params is not None:
        state = _with_params(trainer, state, init_params)
    if checkpoint is not None:
        checkpointer = Checkpointer(workdir, checkpoint)
        state = _resume(checkpointer, trainer, state, iterator, model_config, log, base)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if is_chief:
        truncate_metrics(metrics_path, int(state.step))
    writer = MetricsWriter(workdir, enabled=is_chief)
    if int(state.step) == 0 and init_params is not None and config.eval_every and data_dir:
        # Fine-tuning: the starting point's validation loss, the baseline the run must beat.
        batches = eval_batches(data_dir, "validation", config, config.eval_batches)
        val = evaluate(trainer, state.params, batches)
        log(f"step 0 (initial weights): val {val['loss']:.4f}")
        writer.write(0, {"val_loss": val["loss"], "val_accuracy": val["accuracy"]})
    try:
        loop = _Loop(
            trainer=trainer,
            config=config,
            data_dir=data_dir,
            writer=writer,
            checkpointer=checkpointer,
            meta=meta,
            preemption=preemption,
            log=log,
            peak=peak,
            flops_token=flops_token,
            task_eval=task_eval,
        )
        state, last = loop.run(state, iterator)
    finally:
        writer.close()
        if checkpointer is not None:
            checkpointer.close()
    if is_chief:
        plot_loss_curve(metrics_path, os.path.join(workdir, "plots", "loss.png"))
    return trainer, state, last


def _lora_base(model_config, checkpoint, meta: dict, init_params) -> dict | None:
    """meta["lora_base"] for an adapter-only LoRA run: {"source", "fingerprint"}; None when
    checkpoints hold every parameter (no LoRA, no --init_from source, or turned off)."""
    source = meta.get("init_from")
    if not (model_config.lora_rank and init_params is not None and source and checkpoint):
        return None
    if not checkpoint.lora_adapters_only:
        return None
    return {"source": source, "fingerprint": lora.base_fingerprint(init_params)}


def check_lora_base(saved: dict, current: dict | None, directory: str) -> None:
    """A UserError when an adapter-only checkpoint's base is not the one given now."""
    source = saved["source"]
    if current is None:
        raise UserError(
            f"{directory} holds LoRA adapters only (checkpoint.lora_adapters_only); their base "
            f"is {source['path']}. Pass --init_from={source['path']} to resume."
        )
    if current["fingerprint"] != saved["fingerprint"]:
        raise UserError(
            f"{directory}: the LoRA adapters were trained on a base with fingerprint "
            f"{saved['fingerprint']} ({source['path']}), but --init_from="
            f"{current['source']['path']} has {current['fingerprint']}: a different or changed "
            "model. Pass the original base, or start over with --fresh."
        )


def _resume(checkpointer, trainer, state, iterator, model_config, log, base=None):
    """Restores the latest usable checkpoint into `state` (resharding onto this mesh).

    A step is usable when its metadata, parameters, optimizer state and data position all read
    back; the newest usable one wins (see restore_latest_usable). An adapter-only step restores
    the adapters over `state`'s parameters, which hold the base (`base`: this run's
    meta["lora_base"], checked against the step's)."""
    if checkpointer.latest_step() is None:
        return state
    abstract = abstract_with_shardings(state, trainer.shardings)

    def restore(step):
        meta = checkpointer.read_meta(step)
        _check_same_shape(checkpointer, meta, model_config)
        if "lora_base" not in meta:
            return checkpointer.restore(step, abstract, iterator)
        check_lora_base(meta["lora_base"], base, checkpointer.directory)
        only = abstract.replace(params=lora.adapter_tree(abstract.params))
        adapters, opt_state = checkpointer.restore(step, only, iterator)
        return lora.with_adapters(state.params, adapters), opt_state

    step, restored = restore_latest_usable(checkpointer, restore, log=log)
    params, opt_state = restored
    unusable = [s for s in checkpointer.all_steps() if s > step]
    if unusable:  # Else saving those steps again fails, and `keep` would keep them.
        checkpointer.set_aside(unusable, log=log)
    log(f"resumed from step {step} in {checkpointer.directory}")
    step_array = jax.device_put(jnp.asarray(step, jnp.int32), trainer.shardings.step)
    return TrainState(step=step_array, params=params, opt_state=opt_state)


def _check_same_shape(checkpointer, meta: dict, model_config: ModelConfig) -> None:
    """A UserError listing the model.* shape fields where the saved run differs from this one."""
    saved = meta.get("model_config", {})
    current = dumps_config(model_config)
    differ = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    shape_fields = {
        "vocab_size",
        "d_model",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "mlp_dim",
        "head_dim",
        "positions",
        "norm",
        "mlp_activation",
        "use_bias",
        "qkv_bias",
        "tie_embeddings",
        "max_seq_len",
        "lora_rank",
        "lora_targets",
    }
    shape_differ = {k: v for k, v in differ.items() if k in shape_fields}
    if shape_differ:
        lines = "\n".join(
            f"  model.{k}: saved {a!r}, now {b!r}" for k, (a, b) in shape_differ.items()
        )
        raise UserError(
            f"{checkpointer.directory} holds a run of a different model shape:\n{lines}\n"
            "Use a new --workdir, restore the old settings, or pass --fresh to start over "
            "(it moves the old steps aside to a ckpt.old-<UTC time>/ next to them)."
        )


def _with_params(trainer, state, params):
    """The state with given parameters, placed on the state's shardings. LoRA
    adapters the given parameters lack (a base model) keep their fresh initial values."""
    given = params.to_pure_dict() if hasattr(params, "to_pure_dict") else params
    fresh = state.params.to_pure_dict()
    if _has_missing_adapters(fresh, given):
        params = lora.with_adapters(state.params, given)  # given's leaves over fresh ones.
    params = jax.device_put(params, trainer.shardings.params)
    return state.replace(params=params)


def _has_missing_adapters(fresh: dict, given: dict) -> bool:
    return any(
        key not in given or (isinstance(value, dict) and _has_missing_adapters(value, given[key]))
        for key, value in fresh.items()
        if isinstance(given, dict)
    )


_STEP_METRICS = ("loss", "accuracy", "grad_norm", "tokens")


@dataclasses.dataclass
class _Loop:
    """The step loop and what it needs besides the state and data, fixed for the run."""

    trainer: Trainer
    config: TrainConfig
    data_dir: str | None
    writer: MetricsWriter
    checkpointer: Checkpointer | None
    meta: dict
    preemption: PreemptionNotice | None
    log: Callable[[str], None]
    peak: float  # FLOP/s of every device together (MFU's denominator).
    flops_token: float
    task_eval: Callable[..., dict] | None
    tokens_per_step: int = 0  # Token positions a step processes (read off the first batch).

    def run(self, state, iterator):
        """Steps from state.step to config.num_steps. Returns (final state, last record)."""
        config, trainer = self.config, self.trainer
        start_step = int(state.step)
        last = {}
        pending = None  # (step, metrics) of the previous step, read one step late so the
        # host never waits on the device between steps.
        window_start, window_steps = time.perf_counter(), 0
        run_start = time.perf_counter()
        first_step_s = None
        watchdog = Watchdog(config.watchdog_s, self.log)
        try:
            with jax.set_mesh(trainer.mesh):
                for step in range(start_step, config.num_steps):
                    batch = sharding.global_batch(trainer.mesh, next(iterator))
                    self.tokens_per_step = batch["inputs"].size  # Positions, padding included.
                    state, metrics = trainer.train_step(state, batch)
                    if first_step_s is None:
                        jax.block_until_ready(metrics["loss"])
                        first_step_s = time.perf_counter() - run_start
                        self.log(
                            f"step {step + 1}: compiled and ran the first step in "
                            f"{first_step_s:.1f}s"
                        )
                        watchdog.beat()
                        window_start, window_steps = time.perf_counter(), 0
                    else:
                        window_steps += 1
                    if pending is not None:
                        _check_finite(*pending)  # Waits for the previous step: it completed.
                        watchdog.beat()
                    pending = (step + 1, metrics)
                    done = step + 1
                    record = None
                    if done % config.log_every == 0 or done == config.num_steps:
                        _check_finite(*pending)
                        elapsed = time.perf_counter() - window_start
                        record = self._record(done, state, metrics, window_steps, elapsed)
                        watchdog.beat()
                        last = record
                        window_start, window_steps = time.perf_counter(), 0
                    self._checkpoint(done, state, iterator, pending, record, watchdog)
            if self.checkpointer:
                self.checkpointer.wait()
        finally:
            watchdog.stop()
        last["first_step_s"] = first_step_s or 0.0
        return state, last

    def _due(self, done: int, every: int) -> bool:
        return bool(every) and (done % every == 0 or done == self.config.num_steps)

    def _record(self, done, state, metrics, window_steps, elapsed) -> dict:
        """Logs step `done`: training metrics, and evaluations when due."""
        config, trainer = self.config, self.trainer
        tokens_per_step = self.tokens_per_step
        tokens_per_s = window_steps * tokens_per_step / elapsed if window_steps else 0.0
        record = {
            "loss": float(metrics["loss"]),
            "accuracy": float(metrics["accuracy"]),
            "grad_norm": float(metrics["grad_norm"]),
            "learning_rate": float(trainer.schedule(done - 1)),
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * self.flops_token / self.peak if self.peak else 0.0,
        }
        extra = {k: float(v) for k, v in metrics.items() if k not in _STEP_METRICS}
        record.update(extra)  # An objective's own terms (e.g. distillation's "kd").
        if self.data_dir and self._due(done, config.eval_every):
            batches = eval_batches(self.data_dir, "validation", config, config.eval_batches)
            val = evaluate(trainer, state.params, batches)
            record["val_loss"] = val["loss"]
            record["val_accuracy"] = val["accuracy"]
        if self.task_eval and self._due(done, config.task_eval_every):
            tasks = self.task_eval(trainer.graphdef, state.params, trainer.mesh)
            record.update(tasks)
            self.log(f"step {done} evaluation: " + _format_tasks(tasks))
        self.writer.write(done, record)
        remaining = config.num_steps - done
        eta = remaining * tokens_per_step / tokens_per_s if tokens_per_s else 0.0
        self.log(
            f"step {done}/{config.num_steps}  loss {record['loss']:.4f}"
            + "".join(f"  {k} {v:.4f}" for k, v in extra.items())
            + (f"  val {record['val_loss']:.4f}" if "val_loss" in record else "")
            + f"  lr {record['learning_rate']:.2e}  {tokens_per_s:,.0f} tok/s"
            + f"  MFU {100 * record['mfu']:.1f}%  ETA {format_duration(eta)}"
        )
        return record

    def _checkpoint(self, done, state, iterator, pending, record, watchdog) -> None:
        """Saves when due or preempted; on preemption waits for the save, raises Preempted."""
        checkpointer = self.checkpointer
        # Every process must agree, or hosts save different steps and a collective hangs.
        preempted = _preemption_agreed(self.preemption, done, self.config.preemption_sync_every)
        if checkpointer and (
            done == self.config.num_steps or self._due(done, checkpointer.save_every) or preempted
        ):
            _check_finite(*pending)  # Never save a state whose loss is NaN.
            val_loss = (record or {}).get("val_loss")
            if "lora_base" in self.meta:  # Adapter-only: the base is re-read from its source.
                state = state.replace(params=lora.adapter_tree(state.params))
            checkpointer.save(
                done,
                state,
                iterator,
                self.meta,
                metrics={"val_loss": val_loss} if val_loss is not None else None,
            )
            watchdog.beat()
        if preempted:
            if checkpointer:
                checkpointer.wait()
            raise Preempted(done)


def _format_tasks(metrics: dict) -> str:
    shown = [k for k in metrics if k.rsplit("/", 1)[-1] in ("loss", "bits_per_byte", "accuracy")]
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in shown or list(metrics)[:6])


def _check_finite(step: int, metrics: dict) -> None:
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise NonFiniteLossError(
            f"the loss became {loss} at step {step}; training stopped instead of continuing on "
            f"garbage. Lower train.learning_rate, raise train.warmup_steps, or use "
            f"train.grad_clip_norm / model.dtype='float32'."
        )
