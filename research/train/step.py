"""Pure train and eval steps. No logging, I/O or config reads inside; jitted by the loop.

A batch is a dict of [B, T] arrays: inputs, targets, positions, segment_ids (int32) and
weights (float32, 0 on padding).
"""

import functools

import jax
import jax.numpy as jnp
import optax

from research.train.objective import Objective, cross_entropy, forward, next_token, param_path
from research.train.state import TrainState

__all__ = ["cross_entropy", "eval_step", "forward", "make_train_step", "train_step"]


def _loss_and_grads(objective: Objective, graphdef, params, batch, extras, total_weight):
    """Gradient of (objective's loss sum / total_weight) for one (micro-)batch, and its sums.

    With `objective.trainable`, only those leaves are differentiated (a frozen int8 base has
    no gradient to take); the others get zero gradients, which the optimizer ignores."""
    if objective.trainable is None:

        def loss_fn(params):
            loss_sum, sums = objective.loss(graphdef, params, batch, extras)
            return loss_sum / total_weight, sums

        (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, sums

    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    values = [leaf for _, leaf in leaves]
    chosen = [i for i, (path, _) in enumerate(leaves) if objective.trainable(param_path(path))]

    def partial_loss(train_values):
        full = list(values)
        for i, value in zip(chosen, train_values, strict=True):
            full[i] = value
        loss_sum, sums = objective.loss(graphdef, treedef.unflatten(full), batch, extras)
        return loss_sum / total_weight, sums

    (_, sums), train_grads = jax.value_and_grad(partial_loss, has_aux=True)(
        [values[i] for i in chosen]
    )
    grads = [jnp.zeros_like(value) for value in values]
    for i, grad in zip(chosen, train_grads, strict=True):
        grads[i] = grad
    return treedef.unflatten(grads), sums


def _apply(state: TrainState, grads, tx, sums, total_weight, objective: Objective, extras):
    if objective.project is not None:
        grads = objective.project(grads, extras)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if objective.project is not None:
        params = objective.project(params, extras)
    metrics = {
        "loss": sums["xent"] / total_weight,
        "accuracy": sums["correct"] / total_weight,
        **{name: value / total_weight for name, value in sums.items() if name not in _SHOWN},
        "grad_norm": optax.global_norm(grads),
        "tokens": total_weight,
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


_SHOWN = ("xent", "correct")  # Logged as "loss" and "accuracy".


def train_step(state: TrainState, batch, extras=None, *, graphdef, tx, objective: Objective):
    """One AdamW update on the whole batch. Returns (new state, metrics)."""
    total_weight = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
    batch = {**batch, "dropout_key": _dropout_key(state.step)}
    grads, sums = _loss_and_grads(objective, graphdef, state.params, batch, extras, total_weight)
    return _apply(state, grads, tx, sums, total_weight, objective, extras)


def _dropout_key(step):
    """The step's dropout key: a function of the step alone, so a resumed run drops the same
    units as an uninterrupted one."""
    return jax.random.fold_in(jax.random.key(0), step)


def train_step_accumulated(
    state: TrainState, batch, extras=None, *, graphdef, tx, objective: Objective, micro_batches: int
):
    """One update from gradients summed over `micro_batches` slices of the batch.

    Each micro-batch's loss is divided by the weight of the WHOLE batch, so the summed
    gradient equals the gradient of the large batch's mean loss exactly.
    """
    total_weight = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
    micro = jax.tree.map(
        lambda x: x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:]), batch
    )

    def body(carry, indexed):
        grads_sum, sums_sum = carry
        index, micro_batch = indexed
        key = jax.random.fold_in(_dropout_key(state.step), index)
        micro_batch = {**micro_batch, "dropout_key": key}
        grads, sums = _loss_and_grads(
            objective, graphdef, state.params, micro_batch, extras, total_weight
        )
        grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
        return (grads_sum, jax.tree.map(jnp.add, sums_sum, sums)), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    first = jax.tree.map(lambda x: x[0], micro)
    sums_shape = jax.eval_shape(lambda: objective.loss(graphdef, state.params, first, extras)[1])
    zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)
    indexed = (jnp.arange(micro_batches), micro)
    (grads, sums), _ = jax.lax.scan(body, (zeros, zero_sums), indexed)
    return _apply(state, grads, tx, sums, total_weight, objective, extras)


def eval_step(params, batch, *, graphdef):
    """Sums over one batch: {"loss_sum", "correct", "tokens"} (float32 scalars)."""
    logits_btv = forward(graphdef, params, batch)
    _, xent_sum, correct = cross_entropy(logits_btv, batch["targets"], batch["weights"])
    return {"loss_sum": xent_sum, "correct": correct, "tokens": jnp.sum(batch["weights"])}


def make_train_step(config, *, graphdef, tx, objective: Objective | None = None):
    """The pure step a TrainConfig asks for (`train.micro_batches` > 1: accumulated), with
    its static arguments bound: step(state, batch, extras) -> (state, metrics). Not jitted.
    The objective defaults to next-token cross-entropy with `train.z_loss`."""
    objective = objective or next_token(config.z_loss)
    if config.micro_batches > 1:
        return functools.partial(
            train_step_accumulated,
            graphdef=graphdef,
            tx=tx,
            objective=objective,
            micro_batches=config.micro_batches,
        )
    return functools.partial(train_step, graphdef=graphdef, tx=tx, objective=objective)
