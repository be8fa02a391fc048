"""What a train step minimises, and what it carries besides the state and the batch.

The loop (research/train/loop.py) jits one step for every run; an Objective is the seam that
changes what that step does without a second loop:
  - `loss` gives the summed loss of one (micro-)batch and the metric sums to log (plain
    next-token cross-entropy by default; distillation adds a teacher's KL,
    research/compression/distill.py);
  - `extras` is a pytree of arrays every step receives unchanged and never updates (a
    teacher's parameters, sparsity masks), placed once on the mesh with `extras_shardings`;
  - `project` maps gradients and updated parameters back onto a constraint (masks: pruned
    weights get no gradient and stay exactly zero after every update).
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def cross_entropy(logits_btv, targets_bt, weights_bt, z_loss: float = 0.0):
    """Weighted token cross-entropy sums.

    Returns (sum of weighted losses incl. z-loss, sum of weighted cross-entropy,
    number of correct argmax predictions among weighted tokens); all float32 scalars.
    """
    logits_btv = logits_btv.astype(jnp.float32)
    log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    xent_bt = log_z_bt - target_logit_bt
    loss_bt = xent_bt + z_loss * jnp.square(log_z_bt) if z_loss else xent_bt
    correct_bt = (jnp.argmax(logits_btv, axis=-1) == targets_bt).astype(jnp.float32)
    return (
        jnp.sum(loss_bt * weights_bt),
        jnp.sum(xent_bt * weights_bt),
        jnp.sum(correct_bt * weights_bt),
    )


def forward(graphdef, params, batch):
    """The model's logits [B, T, V] for a packed batch (positions and segment ids honoured).

    A batch's "dropout_key" (added by the train step) drives LoRA dropout; without it (eval,
    serving) nothing is dropped."""
    model = nnx.merge(graphdef, params)
    if batch.get("dropout_key") is not None:
        from research.model import lora

        lora.set_dropout_key(model, batch["dropout_key"])
    return model(
        batch["inputs"], positions_bt=batch["positions"], segment_ids_bt=batch["segment_ids"]
    )


@dataclasses.dataclass(frozen=True)
class Objective:
    """A train step's loss and constraints.

    Attributes:
      loss: loss(graphdef, params, batch, extras) -> (loss_sum, sums). loss_sum is the
        weighted SUM over the batch's tokens to minimise; sums is a dict of float32 metric
        sums and must hold "xent" (summed cross-entropy) and "correct" (argmax hits). The step
        divides everything by the batch's total weight, so micro-batches add up exactly.
      extras: a pytree of arrays passed to loss and project on every step, never updated.
      extras_shardings: shardings(mesh, param_shardings) -> a pytree of shardings for extras
        (None: replicated over the mesh).
      project: project(tree, extras) -> tree, applied to the gradients and to the parameters
        after each update: a linear, idempotent map (a mask). None: no constraint.
      trainable: trainable(path) -> bool for a parameter's path (plain keys, `param_path`):
        only those get gradients and updates; the rest stay exactly as they are (LoRA trains
        its adapters over a frozen, possibly quantized base). None: every parameter trains.
    """

    loss: Callable
    extras: Any = None
    extras_shardings: Callable | None = None
    project: Callable | None = None
    trainable: Callable | None = None


def next_token(z_loss: float = 0.0) -> Objective:
    """Plain next-token cross-entropy (plus z-loss): pretraining and fine-tuning."""

    def loss(graphdef, params, batch, extras):
        del extras
        logits_btv = forward(graphdef, params, batch)
        loss_sum, xent, correct = cross_entropy(
            logits_btv, batch["targets"], batch["weights"], z_loss
        )
        return loss_sum, {"xent": xent, "correct": correct}

    return Objective(loss=loss)


def with_masks(objective: Objective, masks: dict) -> Objective:
    """`objective` with weights held at zero where masks is 0 (sparsity kept while healing).

    masks maps a parameter's path (a tuple of keys, as in `params.to_pure_dict()`) to a 0/1
    array of that parameter's shape; unmasked parameters train as usual.
    """
    if objective.extras is not None:
        raise ValueError("with_masks: the objective already carries extras; combine by hand.")
    masks = {tuple(path): mask for path, mask in masks.items()}

    def project(tree, extras):
        return apply_masks(tree, extras)

    def shardings(mesh, param_shardings):
        del mesh
        return {path: _at(param_shardings, path) for path in masks}

    return dataclasses.replace(
        objective,
        loss=lambda graphdef, params, batch, extras: objective.loss(graphdef, params, batch, None),
        extras=masks,
        extras_shardings=shardings,
        project=project,
    )


def apply_masks(tree, masks: dict):
    """tree (an nnx.State or nested dict of arrays) with every masked leaf multiplied by its
    mask."""

    def visit(path, leaf):
        mask = masks.get(param_path(path))
        return leaf if mask is None else leaf * mask.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(visit, tree)


def param_path(path) -> tuple:
    """A jax key path as the plain keys of `to_pure_dict()` (nnx's `.value` dropped)."""
    keys = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            keys.append(entry.key)
        elif isinstance(entry, jax.tree_util.SequenceKey):
            keys.append(entry.idx)
    return tuple(keys)


def _at(tree, path):
    node = tree
    for key in path:
        node = node[key]
    return getattr(node, "value", node)  # An nnx.Variable holds the leaf.
