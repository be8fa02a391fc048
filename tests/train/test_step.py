"""Pure train step: accumulation equals one batch; every mesh gives the same numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from research import sharding
from research.model import ModelConfig
from research.train import (
    TrainConfig,
    build_trainer,
    learning_rate_schedule,
    weight_decay_mask,
)
from research.train.state import abstract_model
from research.train.step import cross_entropy

TINY = ModelConfig(
    vocab_size=37,
    d_model=16,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=24,
    max_seq_len=16,
)


def _batch(seed: int, batch_size: int = 8, seq_len: int = 12, vocab: int = 37):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, size=(batch_size, seq_len + 1)).astype(np.int32)
    segment_ids = np.ones((batch_size, seq_len), np.int32)
    segment_ids[1, 7:] = 2  # A packed second document.
    segment_ids[2, 9:] = 0  # Padding.
    positions = np.tile(np.arange(seq_len, dtype=np.int32), (batch_size, 1))
    positions[1, 7:] = np.arange(seq_len - 7)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": segment_ids,
        "positions": positions,
        "weights": (segment_ids > 0).astype(np.float32),
    }


def _one_step(mesh, model_config=TINY, batch_size=8, **train_overrides):
    config = TrainConfig(
        num_steps=10, batch_size=batch_size, seq_len=12, warmup_steps=0, **train_overrides
    )
    trainer, state = build_trainer(model_config, config, mesh)
    with jax.set_mesh(mesh):
        batch = sharding.global_batch(mesh, _batch(0, batch_size))
        state, metrics = trainer.train_step(state, batch)
    params = jax.tree.map(np.asarray, jax.device_get(state.params))
    return float(metrics["loss"]), float(metrics["grad_norm"]), params


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(2, 5))
    weights = (rng.random((2, 5)) > 0.3).astype(np.float32)
    loss_sum, xent_sum, correct = cross_entropy(jnp.asarray(logits), targets, weights)
    log_z = np.log(np.exp(logits).sum(-1))
    xent = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(xent_sum, (xent * weights).sum(), rtol=1e-5)
    np.testing.assert_allclose(loss_sum, xent_sum, rtol=1e-6)
    assert correct == ((logits.argmax(-1) == targets) * weights).sum()
    z_sum, _, _ = cross_entropy(jnp.asarray(logits), targets, weights, z_loss=1e-2)
    np.testing.assert_allclose(z_sum, ((xent + 1e-2 * log_z**2) * weights).sum(), rtol=1e-5)


def test_schedule_warmup_then_cosine_to_final_fraction():
    config = TrainConfig(
        num_steps=110, learning_rate=1.0, warmup_steps=10, final_lr_fraction=0.1, batch_size=8
    )
    schedule = learning_rate_schedule(config)
    np.testing.assert_allclose(schedule(0), 0.0)
    np.testing.assert_allclose(schedule(5), 0.5, rtol=1e-6)
    np.testing.assert_allclose(schedule(10), 1.0, rtol=1e-6)
    np.testing.assert_allclose(schedule(60), 0.1 + 0.9 * 0.5, rtol=1e-5)  # Cosine midpoint.
    np.testing.assert_allclose(schedule(110), 0.1, rtol=1e-5)
    linear = learning_rate_schedule(config.replace(schedule="linear"))
    np.testing.assert_allclose(linear(60), 0.55, rtol=1e-5)


def test_weight_decay_mask_skips_norms_biases_and_embeddings():
    gpt2 = TINY.replace(positions="learned", norm="layernorm", mlp_activation="gelu", use_bias=True)
    _, params = abstract_model(gpt2)
    mask = weight_decay_mask(params)
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): value
        for path, value in jax.tree_util.tree_leaves_with_path(mask)
    }
    shapes = {
        "/".join(str(getattr(k, "key", k)) for k in path): value.shape
        for path, value in jax.tree_util.tree_leaves_with_path(params)
    }
    assert any(flat.values()) and not all(flat.values())
    for name, decays in flat.items():
        if len(shapes[name]) < 2 or "embed" in name:
            assert not decays, name
        else:
            assert decays, name
    with_embeddings = weight_decay_mask(params, decay_embeddings=True)
    assert sum(jax.tree.leaves(with_embeddings)) > sum(jax.tree.leaves(mask))


def test_optimizer_state_is_sharded_like_params():
    mesh = sharding.make_mesh((2, 2, 2))
    config = TrainConfig(num_steps=10, batch_size=8, seq_len=12)
    _, state = build_trainer(TINY, config, mesh)
    adam = state.opt_state[1][0]
    param_specs = jax.tree.leaves(jax.tree.map(lambda x: x.sharding.spec, state.params))
    mu_specs = jax.tree.leaves(jax.tree.map(lambda x: x.sharding.spec, adam.mu))
    assert param_specs == mu_specs
    assert any(spec != jax.sharding.PartitionSpec() for spec in param_specs)


def test_gradient_accumulation_equals_one_large_batch():
    mesh = sharding.make_mesh((2, 2, 2))
    loss_one, norm_one, params_one = _one_step(mesh, batch_size=16)
    loss_acc, norm_acc, params_acc = _one_step(mesh, batch_size=16, micro_batches=4)
    np.testing.assert_allclose(loss_acc, loss_one, rtol=1e-5)
    np.testing.assert_allclose(norm_acc, norm_one, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(params_acc), jax.tree.leaves(params_one), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)])
def test_same_loss_and_update_on_every_mesh(shape):
    one_device = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    loss_ref, norm_ref, params_ref = _one_step(one_device)
    loss, norm, params = _one_step(sharding.make_mesh(shape))
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    np.testing.assert_allclose(norm, norm_ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_ref), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_gradients_match_across_meshes():
    """Raw gradients (not just the update) agree between one device and a (2, 2, 2) mesh."""

    def grads_on(mesh):
        config = TrainConfig(num_steps=10, batch_size=8, seq_len=12)
        trainer, state = build_trainer(TINY, config, mesh)

        def loss_fn(params, batch):
            model = nnx.merge(trainer.graphdef, params)
            logits = model(
                batch["inputs"],
                positions_bt=batch["positions"],
                segment_ids_bt=batch["segment_ids"],
            )
            loss_sum, _, _ = cross_entropy(logits, batch["targets"], batch["weights"])
            return loss_sum / batch["weights"].sum()

        with jax.set_mesh(mesh):
            batch = sharding.global_batch(mesh, _batch(1))
            grads = jax.jit(jax.grad(loss_fn))(state.params, batch)
        return [np.asarray(g) for g in jax.tree.leaves(grads)]

    reference = grads_on(sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    for a, b in zip(grads_on(sharding.make_mesh((2, 2, 2))), reference, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert optax.global_norm(reference) > 0
