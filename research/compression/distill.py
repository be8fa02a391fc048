"""Knowledge distillation: a student learns the teacher's next-token distribution.

loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE
(Hinton et al. 2015; the MaxText / Minitron form). The teacher runs in the same jitted step
as the student, on the same batch, frozen; alpha = 0 is plain cross-entropy training of the
same student with the same data and optimizer (the comparison the report makes).

Training text is the bundled corpus (research/compression/corpus.py), tokenized with the
model's tokenizer: never the held-out evaluation text.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from research.train.config import TrainConfig
from research.train.optimizer import make_optimizer


def distill_loss(student_btv, teacher_btv, targets_bt, weights_bt, *, alpha, temperature):
    """(loss, {"kd", "ce"}), each a weighted mean over tokens; float32."""
    student = student_btv.astype(jnp.float32)
    teacher = jax.lax.stop_gradient(teacher_btv.astype(jnp.float32))
    total = jnp.maximum(jnp.sum(weights_bt), 1.0)
    logp_s = jax.nn.log_softmax(student / temperature, axis=-1)
    logp_t = jax.nn.log_softmax(teacher / temperature, axis=-1)
    kl_bt = jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1)
    kd = temperature**2 * jnp.sum(kl_bt * weights_bt) / total
    logz_bt = jax.nn.logsumexp(student, axis=-1)
    target_bt = jnp.take_along_axis(student, targets_bt[..., None], axis=-1)[..., 0]
    ce = jnp.sum((logz_bt - target_bt) * weights_bt) / total
    return alpha * kd + (1 - alpha) * ce, {"kd": kd, "ce": ce}


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 256
    learning_rate: float = 3e-4
    alpha: float = 0.9
    temperature: float = 1.0


def distill(student, teacher, batches, config: DistillConfig, log=print):
    """Trains `student` (graphdef, params) towards `teacher` (graphdef, params) for
    config.steps steps; returns (new student params, [per-step metrics])."""
    s_graphdef, s_params = student
    t_graphdef, t_params = teacher
    train = TrainConfig(
        num_steps=config.steps,
        learning_rate=config.learning_rate,
        warmup_steps=max(1, config.steps // 10),
        weight_decay=0.0,
    )
    tx = make_optimizer(train)
    opt_state = tx.init(s_params)

    @jax.jit
    def step(s_params, opt_state, t_params, rows_bt):
        inputs, targets = rows_bt[:, :-1], rows_bt[:, 1:]
        weights = jnp.ones(targets.shape, jnp.float32)
        teacher_btv = nnx.merge(t_graphdef, t_params)(inputs) if config.alpha else None

        def loss_fn(params):
            student_btv = nnx.merge(s_graphdef, params)(inputs)
            reference = student_btv if teacher_btv is None else teacher_btv
            return distill_loss(
                student_btv, reference, targets, weights,
                alpha=config.alpha, temperature=config.temperature,
            )  # fmt: skip

        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(s_params)
        updates, opt_state = tx.update(grads, opt_state, s_params)
        return optax.apply_updates(s_params, updates), opt_state, {"loss": loss, **parts}

    history, start = [], time.perf_counter()
    tokens = config.batch_size * config.seq_len
    for i in range(config.steps):
        s_params, opt_state, metrics = step(s_params, opt_state, t_params, next(batches))
        if (i + 1) % max(1, config.steps // 10) == 0 or i + 1 == config.steps:
            metrics = {k: float(v) for k, v in metrics.items()}
            elapsed = time.perf_counter() - start
            rate = (i + 1) * tokens / elapsed
            eta = (config.steps - i - 1) * tokens / rate
            log(
                f"distill step {i + 1}/{config.steps}: loss {metrics['loss']:.4f} (kd "
                f"{metrics['kd']:.4f}, ce {metrics['ce']:.4f}), {rate:,.0f} tokens/s, "
                f"ETA {eta:.0f} s"
            )
            history.append({"step": i + 1, **metrics})
    return s_params, history


def plot_history(history: list[dict], path: str) -> None:
    """The distillation loss curve (total, KD and CE parts) as a PNG."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history]
    for key in ("loss", "kd", "ce"):
        ax.plot(steps, [h[key] for h in history], marker="o", label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
