"""Orbax checkpoints of a training run: parameters, optimizer state, data iterator, metadata.

One Orbax step directory holds four items:
  params     the model parameters (nnx.State), restorable alone for inference / fine-tuning
  opt_state  the optimizer state
  data       the grain iterator state (exact resume of the input pipeline)
  meta       JSON: step, model config, operative gin config, prepared-data directory
Saves are asynchronous; a step becomes visible only once complete (Orbax's atomic commit), so
a crash mid-save leaves the previous step as the latest. Local paths, gs:// and s3:// work.
"""

import dataclasses
import json
import logging
import os

import grain
import jax
import orbax.checkpoint as ocp
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


def checkpoint_dir(workdir: str) -> str:
    """workdir/ckpt; local paths are made absolute (TensorStore refuses relative ones)."""
    if "://" not in str(workdir):
        workdir = os.path.abspath(workdir)
    return os.path.join(workdir, "ckpt")


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
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            data=grain.checkpoint.CheckpointSave(iterator),
            meta=ocp.args.JsonSave({**meta, "step": int(step)}),
        )
        self.manager.save(step, args=args, metrics=metrics, force=True)

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

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying the target shardings: restore reshards onto any mesh."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_tree,
        shardings,
    )


def restore_latest_usable(checkpointer: Checkpointer, restore_fn, log=logging.warning):
    """Calls restore_fn(step) on the newest step, falling back to older ones on failure.

    A truncated or deleted array file makes Orbax raise; the step is skipped with a warning
    that names the error. Returns (step, result), or (None, None) when there are no steps.
    Raises UserError when steps exist but none can be restored: never start from scratch
    silently.
    """
    steps = checkpointer.all_steps()
    errors = []
    for step in reversed(steps):
        try:
            return step, restore_fn(step)
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
            + "\nRepair or remove the directory, or pass --fresh to start over (this deletes "
            "nothing but ignores the old steps)."
        )
    return None, None


def dumps_config(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))
