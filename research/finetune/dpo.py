"""Direct preference optimization (Rafailov et al. 2023, eq. 7) through the train step's
Objective seam (research/train/objective.py):

    loss = -log sigmoid(beta * ((log pi(y_c | x) - log ref(y_c | x))
                                - (log pi(y_r | x) - log ref(y_r | x))))

averaged over pairs, where log pi(y | x) sums the log-probabilities of the response's tokens
(its end-of-turn token included; the prompt is context only). The reference terms come from
the initial model, computed once before training (`reference_logprobs`) and carried in every
batch: no second model is kept in memory or run in the step. As in TRL, a response's reward
is beta * (log pi - log ref); the reward accuracy is the fraction of pairs whose chosen reward
is above the rejected one, the margin is chosen minus rejected reward.

A batch holds P pairs (`pair_batch`); every array leads with P, so the mesh splits the batch
between pairs, never inside one:

    inputs, targets, positions, segment_ids  [P, 2, T] int32    row 0 chosen, row 1 rejected
    loss_mask                                [P, 2, T] float32  1 on the response's targets
    reference                                [P, 2] float32     reference log-probs
    weights                                  [P, 1] float32     1 a pair, 0 on padding pairs

The step divides the loss sum by the sum of the weights: the mean over pairs. Rows are not
packed (a row is one sequence, zeros after it with segment id 0).
"""

import functools

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research import sharding
from research.finetune.preference import CHOSEN, REJECTED, PreferencePairs
from research.train.objective import Objective, forward

_ROW_FEATURES = ("inputs", "positions", "segment_ids")


def pair_batch(pairs: PreferencePairs, indices, size: int | None = None) -> dict:
    """The batch of the pairs at `indices` (see the module docstring), padded with
    zero-weight pairs to `size` (default: no padding). NumPy arrays."""
    indices = np.asarray(indices, np.int64)
    count, size = len(indices), size or len(indices)
    length = pairs.tokens.shape[-1]
    tokens = np.zeros((size, 2, length), np.int32)
    lengths = np.zeros((size, 2, 1), np.int32)
    prompt_lengths = np.zeros((size, 1, 1), np.int32)
    reference = np.zeros((size, 2), np.float32)
    weights = np.zeros((size, 1), np.float32)
    tokens[:count] = pairs.tokens[indices]
    lengths[:count, :, 0] = pairs.lengths[indices]
    prompt_lengths[:count, 0, 0] = pairs.prompt_lengths[indices]
    if pairs.reference is not None:
        reference[:count] = pairs.reference[indices]
    weights[:count] = 1.0
    # Position t predicts token t + 1: targets from the first response token on are scored.
    position = np.arange(length - 1, dtype=np.int32)
    real = position < lengths - 1
    return {
        "inputs": tokens[..., :-1],
        "targets": tokens[..., 1:],
        "positions": np.broadcast_to(position, real.shape).copy(),
        "segment_ids": real.astype(np.int32),
        "loss_mask": (real & (position >= prompt_lengths - 1)).astype(np.float32),
        "reference": reference,
        "weights": weights,
    }


def response_logprobs(graphdef, params, batch) -> jax.Array:
    """Summed log-probabilities of each row's response tokens, [P, 2] float32."""
    pairs, rows, length = batch["inputs"].shape
    flat = {name: batch[name].reshape(pairs * rows, length) for name in _ROW_FEATURES}
    flat["dropout_key"] = batch.get("dropout_key")
    logits_btv = forward(graphdef, params, flat).astype(jnp.float32)
    targets_bt = batch["targets"].reshape(pairs * rows, length)
    log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    mask_bt = batch["loss_mask"].reshape(pairs * rows, length)
    return jnp.sum((target_logit_bt - log_z_bt) * mask_bt, axis=-1).reshape(pairs, rows)


def dpo_terms(policy_p2, reference_p2, beta: float) -> dict:
    """Per-pair DPO loss and rewards from summed log-probs [P, 2] (chosen, rejected)."""
    rewards_p2 = beta * (policy_p2 - reference_p2)
    margin_p = rewards_p2[:, CHOSEN] - rewards_p2[:, REJECTED]
    return {
        "loss": -jax.nn.log_sigmoid(margin_p),
        "chosen_reward": rewards_p2[:, CHOSEN],
        "rejected_reward": rewards_p2[:, REJECTED],
        "margin": margin_p,
    }


def dpo_objective(beta: float) -> Objective:
    """The DPO loss as a train-step Objective. Its sums: "xent" is the DPO loss (logged as
    "loss"), "correct" and "reward_accuracy" count pairs whose chosen reward is higher
    (logged as "accuracy" and "reward_accuracy"), "reward_margin", "reward_chosen" and
    "reward_rejected" sum the rewards; the step divides each by the number of pairs."""

    def loss(graphdef, params, batch, extras):
        del extras
        policy_p2 = response_logprobs(graphdef, params, batch)
        terms = dpo_terms(policy_p2, batch["reference"], beta)
        weight_p = batch["weights"][:, 0]
        correct = jnp.sum((terms["margin"] > 0) * weight_p)
        loss_sum = jnp.sum(terms["loss"] * weight_p)
        sums = {
            "xent": loss_sum,
            "correct": correct,
            "reward_accuracy": correct,
            "reward_margin": jnp.sum(terms["margin"] * weight_p),
            "reward_chosen": jnp.sum(terms["chosen_reward"] * weight_p),
            "reward_rejected": jnp.sum(terms["rejected_reward"] * weight_p),
        }
        return loss_sum, sums

    return Objective(loss=loss)


def reference_logprobs(
    model_config, params, pairs: PreferencePairs, *, batch_size: int, mesh=None
) -> np.ndarray:
    """[N, 2] float32: the summed response log-probs of every pair under `params` (the initial
    model, without LoRA adapters: at the start they add nothing, B being zero), placed on
    `mesh` (default one device) and run `batch_size` pairs at a time."""
    from research.checkpoint.load import param_shardings

    if mesh is None:
        mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    graphdef, abstract, shardings = param_shardings(model_config.replace(lora_rank=0), mesh)
    # Through a pure dict (NumPy arrays of an import, or a State): the abstract State's
    # structure and variable metadata, so that its shardings apply.
    nnx.replace_by_pure_dict(abstract, getattr(params, "to_pure_dict", lambda: params)())
    params = jax.device_put(abstract, shardings)
    score = jax.jit(functools.partial(response_logprobs, graphdef))
    out = np.zeros((len(pairs), 2), np.float32)
    with jax.set_mesh(mesh):
        for start in range(0, len(pairs), batch_size):
            indices = np.arange(start, min(len(pairs), start + batch_size))
            batch = sharding.global_batch(mesh, pair_batch(pairs, indices, batch_size))
            out[indices] = np.asarray(score(params, batch))[: len(indices)]
    return out


def pair_dataset(pairs: PreferencePairs, batch_size: int, seed: int) -> grain.IterDataset:
    """Batches of `batch_size` pairs, reshuffled every epoch, forever; its iterator's
    get_state / set_state resume it exactly (the loop checkpoints it)."""
    return (
        grain.MapDataset.range(len(pairs))
        .shuffle(seed=seed)
        .repeat()
        .batch(batch_size, drop_remainder=True)
        .map(lambda indices: pair_batch(pairs, indices))
        .to_iter_dataset()
    )


def pair_evaluator(objective: Objective, pairs: PreferencePairs, batch_size: int):
    """evaluate(graphdef, params, mesh) -> {"loss", "accuracy", "margin"}: the objective's
    means over every pair, `batch_size` pairs a call (held-out pairs: the loop runs it as its
    task evaluation)."""

    @functools.partial(jax.jit, static_argnums=0)
    def sums_of(graphdef, params, batch):
        return objective.loss(graphdef, params, batch, None)[1]

    def evaluate(graphdef, params, mesh) -> dict:
        totals = {"xent": 0.0, "correct": 0.0, "reward_margin": 0.0}
        with jax.set_mesh(mesh):
            for start in range(0, len(pairs), batch_size):
                indices = np.arange(start, min(len(pairs), start + batch_size))
                batch = sharding.global_batch(mesh, pair_batch(pairs, indices, batch_size))
                sums = sums_of(graphdef, params, batch)
                for name in totals:
                    totals[name] += float(sums[name])
        count = max(len(pairs), 1)
        return {
            "loss": totals["xent"] / count,
            "accuracy": totals["correct"] / count,
            "margin": totals["reward_margin"] / count,
        }

    return evaluate
