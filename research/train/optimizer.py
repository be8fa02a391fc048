"""optax AdamW with warmup + decay, global-norm clipping and a weight-decay mask."""

import jax
import optax

from research.train.config import TrainConfig


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warmup to the peak, then cosine / linear decay (or constant) to the end."""
    peak = config.learning_rate
    warmup = min(config.warmup_steps, config.num_steps)
    decay_steps = max(config.num_steps - warmup, 1)
    final = peak * config.final_lr_fraction
    if config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.final_lr_fraction)
    elif config.schedule == "linear":
        decay = optax.linear_schedule(peak, final, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def weight_decay_mask(params, decay_embeddings: bool = False):
    """True for the parameters AdamW decays: matrices, never norms or biases.

    Embedding tables (token and learned position) are decayed only when asked.
    """

    def decays(path, leaf) -> bool:
        names = [str(getattr(key, "key", getattr(key, "name", key))) for key in path]
        if leaf.ndim < 2:
            return False
        is_embedding = any("embed" in name for name in names)
        return decay_embeddings or not is_embedding

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: TrainConfig, trainable=None) -> optax.GradientTransformation:
    """The full update rule: clip by global norm, then AdamW with the schedule.

    trainable: trainable(path) -> bool (plain keys): the others get no update and no
    optimizer state (LoRA's frozen base: AdamW's moments exist for the adapters only)."""
    chain = []
    if config.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
    chain.append(
        optax.adamw(
            learning_rate_schedule(config),
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=lambda params: weight_decay_mask(params, config.decay_embeddings),
        )
    )
    tx = optax.chain(*chain)
    if trainable is None:
        return tx
    from research.train.objective import param_path

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "train" if trainable(param_path(path)) else "frozen", params
        )

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
