"""Orbax checkpoints of a training run: parameters, optimizer state, data iterator, metadata.

One Orbax step directory holds four items:
  params     the model parameters (nnx.State), restorable alone for inference / fine-tuning
  opt_state  the optimizer state
  data       the grain iterator state (exact resume of the input pipeline)
  meta       JSON: step, model config, operative gin config, prepared-data directory
A LoRA run started from pretrained weights (`checkpoint.lora_adapters_only`, the default)
saves in `params` its adapters alone; `meta["lora_base"]` names the base (the --init_from
source and a fingerprint of its weights), which a resume or `load_model` reads again.
Saves are asynchronous; a step becomes visible only once complete (Orbax's atomic commit), so
a crash mid-save leaves the previous step as the latest. Local paths, gs:// and s3:// work.

Snapshot saves (`checkpoint.snapshot_save`, single-process runs): Orbax's own async save still
holds the loop while it starts its threads and copies every array to the host (ref_small on
CPU: 0.2-0.4 s, 10-25% of a step). Instead, `save` copies the state on the device (dispatched,
not waited for), captures the data iterator's state, and hands both to a thread that makes the
Orbax call; the loop goes on at once. The price is a second copy of params + optimizer state
in device memory while the save runs, so it is used only where the devices report room for it
(or report nothing, as CPUs do). Multi-process runs keep Orbax's path: its barriers must not
run beside the training step's collectives.
"""

import dataclasses
import datetime
import json
import logging
import math
import os
import threading

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from research import storage
from research.checkpoint import s3
from research.errors import UserError

ITEMS = ("params", "opt_state", "data", "meta")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    save_every: int = 1000  # Steps between saves (the final step is always saved).
    keep: int = 3  # How many of the latest steps to keep.
    keep_best: bool = False  # Also keep the step with the best validation loss.
    async_save: bool = True
    # Copy the state on device and save from a thread (see the module docstring).
    snapshot_save: bool = True
    # A LoRA run started from --init_from saves only its adapters and their optimizer state;
    # the frozen base is read again from the --init_from source (its fingerprint checked).
    lora_adapters_only: bool = True


def checkpoint_dir(workdir: str) -> str:
    """workdir/ckpt; local paths are made absolute (TensorStore refuses relative ones)."""
    if "://" not in str(workdir):
        workdir = os.path.abspath(workdir)
    return os.path.join(workdir, "ckpt")


def move_aside(directory: str, *, now: datetime.datetime | None = None) -> str:
    """Renames `directory` (ckpt) to a sibling `ckpt.old-<UTC time>` (e.g.
    ckpt.old-20261205-034500) and returns the new path; nothing is deleted. Local paths, gs://
    and s3:// (no rename there: every object is copied, then the original removed)."""
    source = epath.Path(directory)
    stamp = _utc_stamp(now)
    return _rename_to_free(source, source.parent / f"{source.name}.old-{stamp}")


def _utc_stamp(now: datetime.datetime | None = None) -> str:
    return (now or datetime.datetime.now(datetime.UTC)).strftime("%Y%m%d-%H%M%S")


def _rename_to_free(source: epath.Path, target: epath.Path) -> str:
    """Renames source to target, or to target-2, target-3... when that name is taken."""
    if str(source).startswith("s3://"):
        storage.configure_s3()
    base, number = target, 2
    while target.exists():
        target = base.parent / f"{base.name}-{number}"
        number += 1
    storage.move_tree(source, target)
    return str(target)


def _handlers():
    return {
        "params": ocp.StandardCheckpointHandler(),
        "opt_state": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }


class Checkpointer:
    """Owns an Orbax CheckpointManager for one run directory."""

    def __init__(self, workdir: str, config: CheckpointConfig = CheckpointConfig()):
        self.directory = checkpoint_dir(workdir)
        self.save_every = config.save_every
        self.snapshot_save = config.snapshot_save and config.async_save
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None
        self._snapshot_bytes: dict | None = None
        storage.check_bucket(self.directory, purpose="checkpoints")
        if s3.is_s3(self.directory):
            s3.install()  # TensorStore's s3 driver for Orbax's arrays (see s3.py).
        # The last `keep` steps, plus (optionally) the one with the lowest validation loss.
        policies = [checkpoint_managers.LatestN(n=config.keep)]
        if config.keep_best:
            policies.append(
                checkpoint_managers.BestN(
                    get_metric_fn=lambda metrics: metrics["val_loss"],
                    reverse=True,  # Orbax keeps the tail of the sorted order: the lowest loss.
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=config.async_save,
            create=True,
            # S3 cannot rename a directory atomically: a step counts once its
            # commit_success.txt exists. Elsewhere Orbax's default (rename; gs://: commit file).
            atomicity_options=s3.atomicity_options() if s3.is_s3(self.directory) else None,
        )
        try:
            self.manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=ITEMS, item_handlers=_handlers()
            )
        except Exception as error:  # Storage errors: bucket missing, permission, network.
            raise UserError(
                f"cannot open the checkpoint directory {self.directory}: {error}. Check that "
                f"the path (or bucket) exists and is writable."
            ) from error

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, iterator, meta: dict, metrics: dict | None = None):
        """Starts an asynchronous save; the previous save must have finished (Orbax waits)."""
        self._join()
        meta = {**meta, "step": int(step)}
        if not self._snapshot_fits(state):
            self._save_now(step, state.params, state.opt_state, iterator, meta, metrics)
            return
        # Fresh buffers that the next (donating) train step cannot touch; one dispatch.
        params, opt_state = _copy_tree((state.params, state.opt_state))
        frozen = _FrozenIterator(iterator)  # The data position now, not when the thread runs.
        self._thread = threading.Thread(
            target=self._save_in_thread,
            args=(step, params, opt_state, frozen, meta, metrics),
            name=f"cirrus-save-{step}",
            daemon=True,
        )
        self._thread.start()

    def _save_now(self, step, params, opt_state, iterator, meta, metrics):
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            data=grain.checkpoint.CheckpointSave(iterator),
            meta=ocp.args.JsonSave(meta),
        )
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def _save_in_thread(self, *args):
        try:
            self._save_now(*args)
        except BaseException as error:  # noqa: BLE001 - re-raised by the next save or wait.
            self._thread_error = error

    def _join(self) -> None:
        """Waits for a snapshot save's thread to hand its save to Orbax; re-raises its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._thread_error = self._thread_error, None
        if error is not None:
            raise UserError(f"saving a checkpoint to {self.directory} failed: {error}") from error

    def _snapshot_fits(self, state) -> bool:
        """Whether to save from a device copy: enabled, async, one process, and room on every
        device for a second copy of the state (CPUs report no limit)."""
        if not (self.snapshot_save and jax.process_count() == 1):
            return False
        if self._snapshot_bytes is None:  # Per device; the state's layout never changes.
            needed = {}
            for leaf in jax.tree.leaves((state.params, state.opt_state)):
                nbytes = math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
                for device in leaf.sharding.addressable_devices:
                    needed[device] = needed.get(device, 0) + nbytes
            self._snapshot_bytes = needed
        needed = self._snapshot_bytes
        for device, nbytes in needed.items():
            stats = (device.memory_stats() if hasattr(device, "memory_stats") else None) or {}
            limit = stats.get("bytes_limit")
            if limit and stats.get("bytes_in_use", 0) + nbytes > 0.9 * limit:
                return False
        return True

    def save_params(self, step: int, params, meta: dict):
        """Saves the `params` and `meta` items alone (an imported model): `load_model` reads
        it; training cannot resume from it (no optimizer or data state)."""
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            meta=ocp.args.JsonSave({**meta, "step": int(step)}),
        )
        self.manager.save(step, args=args, force=True)

    def wait(self):
        """Blocks until pending saves are committed; a failed async save raises here."""
        self._join()
        self.manager.wait_until_finished()
        self.manager.check_for_errors()

    def read_meta(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def restore(self, step: int, abstract_state, iterator):
        """Restores params and optimizer state into `abstract_state`'s shardings, and the
        iterator in place. Returns the restored (params, opt_state)."""
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state.params),
            opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
            data=grain.checkpoint.CheckpointRestore(iterator),
        )
        restored = self.manager.restore(step, args=args)
        return restored["params"], restored["opt_state"]

    def restore_params(self, step: int, abstract_params):
        args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
        return self.manager.restore(step, args=args)["params"]

    def set_aside(self, steps, log=logging.warning) -> None:
        """Moves `steps` (ones that would not restore) out of the directory, each to a sibling
        `ckpt.unusable-step<N>-<UTC time>`: the run saves those steps again, and `keep` never
        keeps them over newer good steps. Nothing is deleted. The chief moves them, then every
        process rereads the directory."""
        self._join()
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            stamp = _utc_stamp()
            root = epath.Path(self.directory)
            for step in steps:
                target = root.parent / f"{root.name}.unusable-step{step}-{stamp}"
                moved = _rename_to_free(root / str(step), target)
                log(f"moved the unusable checkpoint step {step} aside to {moved}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("cirrus-set-aside-unusable-steps")
        self.manager.reload()

    def close(self):
        self._join()
        self.manager.wait_until_finished()
        self.manager.close()


@jax.jit
def _copy_tree(tree):
    """Device copies of every array (one program; a jit's outputs never alias its inputs)."""
    return jax.tree.map(jnp.copy, tree)


class _FrozenIterator:
    """A grain iterator's state captured now, for a save that runs later. grain's handler
    writes `get_state().decode()` for what is not a DatasetIterator: the same JSON text."""

    def __init__(self, iterator):
        state = iterator.get_state()
        if isinstance(iterator, grain.DatasetIterator):
            state = json.dumps(state, indent=4).encode()
        self._state = state

    def get_state(self) -> bytes:
        return self._state


def abstract_with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying the target shardings: restore reshards onto any mesh."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_tree,
        shardings,
    )


def restore_latest_usable(checkpointer: Checkpointer, restore_fn, log=logging.warning):
    """Calls restore_fn(step) on the newest step, falling back to older ones on failure.

    A truncated or deleted file (of the arrays or of the `meta` JSON, where restore_fn reads
    it) makes Orbax raise; the step is skipped with a warning that names the error. A UserError
    from restore_fn (a user's mistake, such as a different model shape) is raised as it is.
    Returns (step, result), or (None, None) when there are no steps. Raises UserError when
    steps exist but none can be restored: never start from scratch silently.
    """
    steps = checkpointer.all_steps()
    errors = []
    for step in reversed(steps):
        try:
            return step, restore_fn(step)
        except UserError:
            raise
        except Exception as error:  # Corruption shows up as many exception types.
            message = f"{type(error).__name__}: {str(error)[:300]}"
            errors.append(f"step {step}: {message}")
            log(
                f"checkpoint step {step} in {checkpointer.directory} is unusable ({message}); "
                "trying the previous step"
            )
    if steps:
        raise UserError(
            f"no usable checkpoint in {checkpointer.directory}:\n  "
            + "\n  ".join(errors)
            + "\nRepair or remove the directory, or pass --fresh to start over (it deletes "
            "nothing: it moves the old steps aside to a ckpt.old-<UTC time>/ next to them)."
        )
    return None, None


def dumps_config(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))
