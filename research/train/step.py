"""Pure train and eval steps. No logging, I/O or config reads inside; jitted by the loop.

A batch is a dict of [B, T] arrays: inputs, targets, positions, segment_ids (int32) and
weights (float32, 0 on padding).
"""

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from research.train.state import TrainState


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


def _forward(graphdef, params, batch):
    model = nnx.merge(graphdef, params)
    return model(
        batch["inputs"], positions_bt=batch["positions"], segment_ids_bt=batch["segment_ids"]
    )


def _loss_and_grads(graphdef, params, batch, total_weight, z_loss):
    """Gradient of (weighted loss sum / total_weight) for one (micro-)batch."""

    def loss_fn(params):
        logits_btv = _forward(graphdef, params, batch)
        loss_sum, xent_sum, correct = cross_entropy(
            logits_btv, batch["targets"], batch["weights"], z_loss
        )
        return loss_sum / total_weight, (xent_sum, correct)

    (_, (xent_sum, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, xent_sum, correct


def _apply(state: TrainState, grads, tx, xent_sum, correct, total_weight):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": xent_sum / total_weight,
        "accuracy": correct / total_weight,
        "grad_norm": optax.global_norm(grads),
        "tokens": total_weight,
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def train_step(state: TrainState, batch, *, graphdef, tx, z_loss: float = 0.0):
    """One AdamW update on the whole batch. Returns (new state, metrics)."""
    total_weight = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
    grads, xent_sum, correct = _loss_and_grads(graphdef, state.params, batch, total_weight, z_loss)
    return _apply(state, grads, tx, xent_sum, correct, total_weight)


def train_step_accumulated(
    state: TrainState, batch, *, graphdef, tx, micro_batches: int, z_loss: float = 0.0
):
    """One update from gradients summed over `micro_batches` slices of the batch.

    Each micro-batch's loss is divided by the weight of the WHOLE batch, so the summed
    gradient equals the gradient of the large batch's mean loss exactly.
    """
    total_weight = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
    micro = jax.tree.map(
        lambda x: x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:]), batch
    )

    def body(carry, micro_batch):
        grads_sum, xent_sum, correct_sum = carry
        grads, xent, correct = _loss_and_grads(
            graphdef, state.params, micro_batch, total_weight, z_loss
        )
        grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
        return (grads_sum, xent_sum + xent, correct_sum + correct), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, xent_sum, correct), _ = jax.lax.scan(
        body, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), micro
    )
    return _apply(state, grads, tx, xent_sum, correct, total_weight)


def eval_step(params, batch, *, graphdef):
    """Sums over one batch: {"loss_sum", "correct", "tokens"} (float32 scalars)."""
    logits_btv = _forward(graphdef, params, batch)
    _, xent_sum, correct = cross_entropy(logits_btv, batch["targets"], batch["weights"])
    return {"loss_sum": xent_sum, "correct": correct, "tokens": jnp.sum(batch["weights"])}


def make_train_step(config, *, graphdef, tx):
    """The pure step a TrainConfig asks for (`train.micro_batches` > 1: accumulated), with
    its static arguments bound: step(state, batch) -> (state, metrics). Not jitted."""
    if config.micro_batches > 1:
        return functools.partial(
            train_step_accumulated,
            graphdef=graphdef,
            tx=tx,
            micro_batches=config.micro_batches,
            z_loss=config.z_loss,
        )
    return functools.partial(train_step, graphdef=graphdef, tx=tx, z_loss=config.z_loss)
