"""Knowledge distillation: a student learns the teacher's next-token distribution.

loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE
(Hinton et al. 2015; the MaxText / Minitron form). The teacher runs in the same jitted step
as the student, on the same batch, frozen; alpha = 0 is plain cross-entropy training of the
same student with the same data and optimizer (the comparison the report makes).

Training text is the bundled corpus (research/compression/corpus.py), tokenized with the
model's tokenizer: never the held-out evaluation text.
"""

import dataclasses
import hashlib
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research import sharding
from research.train.config import TrainConfig
from research.train.loop import build_trainer
from research.train.objective import Objective, _at, apply_masks, cross_entropy, forward
from research.train.state import abstract_model


def distill_sums(student_btv, teacher_btv, targets_bt, weights_bt, *, temperature):
    """Weighted SUMS over tokens: (T^2 * KL(teacher || student) at temperature T,
    cross-entropy, argmax hits); float32 scalars. The teacher gets no gradient."""
    student = student_btv.astype(jnp.float32)
    teacher = jax.lax.stop_gradient(teacher_btv.astype(jnp.float32))
    logp_s = jax.nn.log_softmax(student / temperature, axis=-1)
    logp_t = jax.nn.log_softmax(teacher / temperature, axis=-1)
    kl_bt = jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1)
    kd = temperature**2 * jnp.sum(kl_bt * weights_bt)
    _, xent, correct = cross_entropy(student, targets_bt, weights_bt)
    return kd, xent, correct


def distill_loss(student_btv, teacher_btv, targets_bt, weights_bt, *, alpha, temperature):
    """(loss, {"kd", "ce"}), each a weighted mean over tokens; float32."""
    kd, ce, _ = distill_sums(
        student_btv, teacher_btv, targets_bt, weights_bt, temperature=temperature
    )
    total = jnp.maximum(jnp.sum(weights_bt), 1.0)
    kd, ce = kd / total, ce / total
    return alpha * kd + (1 - alpha) * ce, {"kd": kd, "ce": ce}


def distill_objective(
    teacher_config, teacher_graphdef, teacher_params, *, alpha, temperature, masks=None
) -> Objective:
    """The train step's objective for distillation (research/train/objective.py): the
    teacher's parameters ride along as extras, sharded like its own training would shard them,
    and run in the same jitted step; `masks` ({param path: 0/1 array}) keep a sparse student
    sparse while it heals. alpha = 0 skips the teacher (cross-entropy only)."""
    masks = {tuple(path): mask for path, mask in (masks or {}).items()}

    def loss(graphdef, params, batch, extras):
        student_btv = forward(graphdef, params, batch)
        if not alpha:
            _, xent, correct = cross_entropy(student_btv, batch["targets"], batch["weights"])
            return xent, {"xent": xent, "correct": correct, "kd": jnp.zeros_like(xent)}
        teacher_btv = forward(teacher_graphdef, extras["teacher"], batch)
        kd, xent, correct = distill_sums(
            student_btv, teacher_btv, batch["targets"], batch["weights"], temperature=temperature
        )
        return alpha * kd + (1 - alpha) * xent, {"xent": xent, "correct": correct, "kd": kd}

    def shardings(mesh, param_shardings):
        from research.checkpoint.load import param_shardings as model_shardings

        teacher = model_shardings(teacher_config, mesh)[2].to_pure_dict() if alpha else None
        return {"teacher": teacher, "masks": {p: _at(param_shardings, p) for p in masks}}

    return Objective(
        loss=loss,
        extras={"teacher": _pure(teacher_params) if alpha else None, "masks": masks},
        extras_shardings=shardings,
        project=(lambda tree, extras: apply_masks(tree, extras["masks"])) if masks else None,
    )


def topk_kd(student_btv, values_btk, ids_btk, weights_bt, *, temperature):
    """Weighted SUM over tokens of T^2 * KL(teacher top-k softmax || student) at the k ids."""
    logp_s = jax.nn.log_softmax(student_btv.astype(jnp.float32) / temperature, axis=-1)
    logp_s_k = jnp.take_along_axis(logp_s, ids_btk, axis=-1)
    logp_t = jax.nn.log_softmax(values_btk.astype(jnp.float32) / temperature, axis=-1)
    kl_bt = jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s_k), axis=-1)
    return temperature**2 * jnp.sum(kl_bt * weights_bt)


def topk_objective(*, alpha, temperature, masks=None) -> Objective:
    """Distillation from cached teacher logits: the batch carries the teacher's top-k logits
    per token ("teacher_values" [B, T, k], "teacher_ids" [B, T, k]); the teacher distribution
    is their softmax at temperature T (renormalised over the k, as MaxText's offline
    distillation does), and KD is T^2 * sum_k p_t (log p_t - log p_s) with the student's full
    log-softmax read at the k ids. No teacher runs in the step."""
    masks = {tuple(path): mask for path, mask in (masks or {}).items()}

    def loss(graphdef, params, batch, extras):
        student_btv = forward(graphdef, params, batch)
        _, xent, correct = cross_entropy(student_btv, batch["targets"], batch["weights"])
        kd = topk_kd(
            student_btv, batch["teacher_values"], batch["teacher_ids"], batch["weights"],
            temperature=temperature,
        )  # fmt: skip
        return alpha * kd + (1 - alpha) * xent, {"xent": xent, "correct": correct, "kd": kd}

    def shardings(mesh, param_shardings):
        return {p: _at(param_shardings, p) for p in masks}

    return Objective(
        loss=loss,
        extras=masks or None,
        extras_shardings=shardings,
        project=(lambda tree, extras: apply_masks(tree, extras)) if masks else None,
    )


def teacher_topk(
    teacher_config, teacher_params, windows: np.ndarray, k: int, *, cache_dir="", log=print
):
    """The teacher's top-k logits for every window ([S, B, T + 1] tokens): (values float16
    [S, B, T, k], ids int32 [S, B, T, k]), one jitted teacher forward per batch. With
    `cache_dir` they are saved there once, keyed by the teacher's weights, the windows and k,
    and later calls with the same inputs read them back instead of running the teacher."""
    path = None
    if cache_dir:
        key = _cache_key(teacher_params, windows, k)
        path = os.path.join(os.path.expanduser(cache_dir), f"teacher_top{k}-{key}.npz")
        if os.path.exists(path):
            with np.load(path) as cached:
                log(f"distill: reusing the teacher's cached top-{k} logits {path}")
                return cached["values"], cached["ids"]
    graphdef, _ = abstract_model(teacher_config)

    @jax.jit
    def top(params, inputs):
        values, ids = jax.lax.top_k(nnx.merge(graphdef, params)(inputs).astype(jnp.float32), k)
        return values.astype(jnp.float16), ids.astype(jnp.int32)

    params = jax.tree.map(jnp.asarray, _pure(teacher_params))
    start = time.perf_counter()
    values, ids = [], []
    for i, rows in enumerate(windows):
        v, d = jax.device_get(top(params, jnp.asarray(rows[:, :-1])))
        values.append(v)
        ids.append(d)
        if (i + 1) % max(1, len(windows) // 5) == 0 or i + 1 == len(windows):
            log(
                f"distill: teacher top-{k} logits {i + 1}/{len(windows)} batches "
                f"({time.perf_counter() - start:.0f} s)"
            )
    values, ids = np.stack(values), np.stack(ids)
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = path + ".partial.npz"
        np.savez(partial, values=values, ids=ids)
        os.replace(partial, path)  # Whole or absent: a killed run leaves no half cache.
        log(
            f"distill: cached the teacher's top-{k} logits in {path} "
            f"({os.path.getsize(path) / 2**20:.1f} MiB)"
        )
    return values, ids


def _cache_key(teacher_params, windows, k) -> str:
    digest = hashlib.sha256(f"k={k};".encode())
    digest.update(np.ascontiguousarray(windows).tobytes())
    for path, leaf in sorted(
        jax.tree_util.tree_flatten_with_path(_pure(teacher_params))[0],
        key=lambda item: jax.tree_util.keystr(item[0]),
    ):
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return digest.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """steps x batch_size windows of seq_len + 1 tokens; AdamW at learning_rate (warmup then
    cosine); loss alpha * T^2 * KL + (1 - alpha) * CE at temperature T. teacher_topk > 0
    distills from the teacher's top-k logits, computed once before training (and kept in
    cache_dir when one is given) instead of running the teacher in every step."""

    steps: int = 200
    batch_size: int = 8
    seq_len: int = 256
    learning_rate: float = 3e-4
    alpha: float = 0.9
    temperature: float = 1.0
    teacher_topk: int = 0
    cache_dir: str = ""


def distill(student, teacher, batches, config: DistillConfig, *, masks=None, mesh=None, log=print):
    """Trains `student` (model config, params) towards `teacher` (model config, params) for
    config.steps steps with the training loop's own jitted step (research/train/loop.py
    build_trainer + distill_objective); `batches` yields [B, T + 1] token windows. Returns
    (new student params as an nnx.State, [logged metrics])."""
    s_config, s_params = student
    t_config, t_params = teacher
    t_graphdef, _ = abstract_model(t_config)
    train_config = TrainConfig(
        num_steps=config.steps,
        batch_size=config.batch_size,
        seq_len=config.seq_len,
        learning_rate=config.learning_rate,
        warmup_steps=max(1, config.steps // 10),
        weight_decay=0.0,
        mesh_shape=(1, 1, 1),
    )
    cached = None
    if config.teacher_topk and config.alpha:
        windows = np.stack([np.asarray(next(batches), np.int32) for _ in range(config.steps)])
        cached = teacher_topk(
            t_config, t_params, windows, config.teacher_topk, cache_dir=config.cache_dir, log=log
        )
        batches = iter(windows)
        objective = topk_objective(alpha=config.alpha, temperature=config.temperature, masks=masks)
    else:
        objective = distill_objective(
            t_config, t_graphdef, t_params,
            alpha=config.alpha, temperature=config.temperature, masks=masks,
        )  # fmt: skip
    if mesh is None:
        mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    trainer, state = build_trainer(s_config, train_config, mesh, objective)
    params = jax.tree.map(lambda x: x, state.params)
    nnx.replace_by_pure_dict(params, _pure(s_params))
    if masks:
        params = apply_masks(params, {tuple(p): m for p, m in masks.items()})
    # Copies (never aliases): the step donates the state, and a pruned student's arrays may be
    # the teacher's own.
    params = jax.device_put(params, trainer.shardings.params, may_alias=False)
    state = state.replace(params=params)
    history, start = [], time.perf_counter()
    tokens = config.batch_size * config.seq_len
    every = max(1, config.steps // 10)
    with jax.set_mesh(mesh):
        for i in range(config.steps):
            batch = _packed(next(batches))
            if cached is not None:
                batch["teacher_values"], batch["teacher_ids"] = cached[0][i], cached[1][i]
            batch = sharding.global_batch(mesh, batch)
            state, metrics = trainer.train_step(state, batch)
            if (i + 1) % every == 0 or i + 1 == config.steps:
                metrics = {k: float(v) for k, v in metrics.items()}
                kd, ce = metrics["kd"], metrics["loss"]
                record = {"loss": config.alpha * kd + (1 - config.alpha) * ce, "kd": kd, "ce": ce}
                elapsed = time.perf_counter() - start
                rate = (i + 1) * tokens / elapsed
                eta = (config.steps - i - 1) * tokens / rate
                log(
                    f"distill step {i + 1}/{config.steps}: loss {record['loss']:.4f} (kd "
                    f"{kd:.4f}, ce {ce:.4f}), {rate:,.0f} tokens/s, ETA {eta:.0f} s"
                )
                history.append({"step": i + 1, **record})
    return state.params, history


def _packed(rows_bt1) -> dict:
    """[B, T + 1] windows as the loop's batch: inputs, targets, positions, one segment each."""
    rows = np.asarray(rows_bt1, np.int32)
    inputs, targets = rows[:, :-1], rows[:, 1:]
    return {
        "inputs": inputs,
        "targets": targets,
        "positions": np.broadcast_to(np.arange(inputs.shape[1], dtype=np.int32), inputs.shape),
        "segment_ids": np.ones_like(inputs),
        "weights": np.ones(inputs.shape, np.float32),
    }


def _pure(params) -> dict:
    return params.to_pure_dict() if hasattr(params, "to_pure_dict") else params


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
