"""Depth pruning: layer scores from the residual stream, and a smaller model that still runs."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research import sharding
from research.compression import prune
from research.model import Decoder, make_attention_mask
from tests.compression.test_quantize import CONFIG, _logits
from tests.model.helpers import random_model

CONFIG4 = CONFIG.replace(num_layers=4)


def _blocks(model, tokens, layers):
    """The residual stream through the given blocks, by hand, then the head."""
    x = model.embed(tokens)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    mask = make_attention_mask(jnp.ones(tokens.shape, jnp.int32))
    inputs = []
    for i in layers:
        inputs.append(x)
        x = model.layers[i](x, positions, mask)
    return inputs, x, model.unembed(x)


def test_influence_is_one_minus_cosine_of_block_input_and_output():
    model = random_model(lambda: Decoder(CONFIG4, rngs=nnx.Rngs(0)), scale=0.3)
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, size=(2, 8)))
    scores = prune.layer_importance(graphdef, params, [tokens])
    inputs, last, _ = _blocks(model, tokens, range(4))
    outputs = [*inputs[1:], last]
    for i in range(4):
        x, y = np.asarray(inputs[i], np.float64), np.asarray(outputs[i], np.float64)
        cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
        np.testing.assert_allclose(scores[i], np.mean(1 - cos), rtol=1e-4)


def test_dropping_layers_gives_the_model_without_them():
    model = random_model(lambda: Decoder(CONFIG4, rngs=nnx.Rngs(0)), scale=0.3)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    keep = prune.least_important(np.array([0.0, 0.5, 0.1, 0.0]), 1)
    assert keep == [0, 1, 3]  # Layer 2 is the least influential of the middle ones.
    config, pruned = prune.drop_layers(CONFIG4, params, keep)
    assert config.num_layers == 3 and sorted(pruned["layers"]) == [0, 1, 2]
    tokens = np.random.default_rng(1).integers(0, CONFIG.vocab_size, size=(1, 6))
    _, _, expected = _blocks(model, jnp.asarray(tokens), keep)
    np.testing.assert_allclose(_logits(config, pruned, tokens), expected, rtol=1e-5, atol=1e-5)


def _zeroed(params, config, mlp_keep, group_keep):
    """params with the dropped MLP channels and kv groups' query heads zeroed in place of
    removal: down_proj rows and o_proj heads, so they add nothing to the residual stream."""
    pure = jax.tree.map(np.array, params)
    per_group = config.num_heads // config.num_kv_heads
    for i, layer in pure["layers"].items():
        dropped = np.setdiff1d(np.arange(config.mlp_dim), mlp_keep[i])
        layer["mlp"]["down_proj"]["kernel"][dropped] = 0.0
        groups = np.setdiff1d(np.arange(config.num_kv_heads), group_keep[i])
        for g in groups:
            layer["attention"]["o_proj"]["kernel"][g * per_group : (g + 1) * per_group] = 0.0
    return pure


def test_width_pruning_equals_zeroing_the_dropped_channels_and_heads():
    model = random_model(lambda: Decoder(CONFIG, rngs=nnx.Rngs(0)), scale=0.3)
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = np.random.default_rng(2).integers(0, CONFIG.vocab_size, size=(2, 12))
    energy = prune.activation_energy(graphdef, params, [tokens])
    mlp_scores, group_scores = prune.width_importance(CONFIG, energy)
    assert mlp_scores.shape == (2, 128) and group_scores.shape == (2, 2)
    # The scores are the mean squares of down_proj's inputs, recomputed here by hand.
    x = model.embed(jnp.asarray(tokens))
    layer = model.layers[0]
    positions = jnp.broadcast_to(jnp.arange(12), tokens.shape)
    x = x + layer.attention(layer.attention_norm(x), positions, make_attention_mask(tokens * 0 + 1))
    h = layer.mlp_norm(x)
    hidden = jax.nn.silu(layer.mlp.gate_proj(h)) * layer.mlp.up_proj(h)
    expected = np.mean(np.square(np.asarray(hidden, np.float64)).reshape(-1, 128), axis=0)
    np.testing.assert_allclose(mlp_scores[0], expected, rtol=1e-4, atol=1e-7)

    config, pruned = prune.prune_width(
        CONFIG, params, mlp_scores, group_scores, mlp_dim=80, num_kv_heads=1
    )
    assert (config.mlp_dim, config.num_kv_heads, config.num_heads) == (80, 1, 2)
    assert config.resolved_head_dim == CONFIG.resolved_head_dim
    mlp_keep = [np.argsort(-mlp_scores[i], kind="stable")[:80] for i in range(2)]
    group_keep = [np.argsort(-group_scores[i], kind="stable")[:1] for i in range(2)]
    full = nnx.state(model, nnx.Param).to_pure_dict()
    expected = _logits(CONFIG, _zeroed(full, CONFIG, mlp_keep, group_keep), tokens)
    np.testing.assert_allclose(_logits(config, pruned, tokens), expected, rtol=1e-4, atol=1e-5)


def test_magnitude_masks_drop_the_smallest_weights_of_each_matrix():
    model = random_model(lambda: Decoder(CONFIG, rngs=nnx.Rngs(0)), scale=0.3)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    masks = prune.sparsity_masks(CONFIG, params, 0.5)
    assert len(masks) == 2 * 7  # q, k, v, o and gate, up, down in each layer.
    w = np.asarray(params["layers"][1]["attention"]["o_proj"]["kernel"])
    mask = masks[("layers", 1, "attention", "o_proj", "kernel")]
    assert mask.shape == w.shape and mask.mean() == 0.5
    assert np.abs(w[mask == 0]).max() <= np.abs(w[mask == 1]).min()
    sparse = prune.apply_sparsity(params, masks)
    assert prune.sparsity_of(sparse, masks) == 0.5
    np.testing.assert_array_equal(
        sparse["embedding"]["embedding"], params["embedding"]["embedding"]
    )


def test_wanda_scores_weights_by_input_norm_within_each_output():
    model = random_model(lambda: Decoder(CONFIG, rngs=nnx.Rngs(0)), scale=0.3)
    graphdef, state = nnx.split(model, nnx.Param)
    params = state.to_pure_dict()
    tokens = np.random.default_rng(3).integers(0, CONFIG.vocab_size, size=(2, 10))
    energy = prune.activation_energy(graphdef, state, [tokens])
    masks = prune.sparsity_masks(CONFIG, params, 0.25, energy=energy)
    path = ("layers", 0, "mlp", "down_proj", "kernel")
    w = np.asarray(params["layers"][0]["mlp"]["down_proj"]["kernel"])  # [F, D]
    score = np.abs(w) * np.sqrt(energy[path])[:, None]
    for n in range(w.shape[1]):  # Every output keeps its 96 best-scored inputs of 128.
        kept = set(np.flatnonzero(masks[path][:, n]))
        assert kept == set(np.argsort(-score[:, n], kind="stable")[:96])


def test_two_of_four_keeps_two_in_every_block_of_four_inputs():
    model = random_model(lambda: Decoder(CONFIG, rngs=nnx.Rngs(0)), scale=0.3)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    masks = prune.sparsity_masks(CONFIG, params, 0.5, pattern="2:4")
    path = ("layers", 0, "attention", "q_proj", "kernel")
    w = np.abs(np.asarray(params["layers"][0]["attention"]["q_proj"]["kernel"])).reshape(16, 4, -1)
    mask = masks[path].reshape(16, 4, -1)
    np.testing.assert_array_equal(mask.sum(1), 2.0)
    kept_min = np.where(mask == 1, w, np.inf).min(1)
    dropped_max = np.where(mask == 0, w, -np.inf).max(1)
    assert np.all(kept_min >= dropped_max)


def test_masks_hold_after_train_steps():
    from research.train import TrainConfig, build_trainer, next_token, with_masks

    config = CONFIG.replace(max_seq_len=16)
    train_config = TrainConfig(batch_size=8, seq_len=8, learning_rate=1e-2, warmup_steps=1)
    trainer, state = build_trainer(config, train_config)
    params = state.params.to_pure_dict()
    masks = prune.sparsity_masks(config, params, 0.5)
    objective = with_masks(next_token(), masks)
    trainer, state = build_trainer(config, train_config, objective=objective)
    state = state.replace(params=jax.device_put(state.params, trainer.shardings.params))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, size=(8, 9)).astype(np.int32)
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(8, dtype=np.int32), (8, 8)),
        "segment_ids": np.ones((8, 8), np.int32),
        "weights": np.ones((8, 8), np.float32),
    }
    before = jax.device_get(state.params.to_pure_dict())
    with jax.set_mesh(trainer.mesh):
        for _ in range(3):
            state, _ = trainer.train_step(state, sharding.global_batch(trainer.mesh, batch))
    after = jax.device_get(state.params.to_pure_dict())
    path = ("layers", 0, "mlp", "up_proj", "kernel")
    mask = masks[path]
    w0, w1 = (
        before["layers"][0]["mlp"]["up_proj"]["kernel"],
        after["layers"][0]["mlp"]["up_proj"]["kernel"],
    )
    assert np.all(w1[mask == 0] == 0.0)  # Pruned weights stay exactly zero...
    assert np.all(w1[mask == 1] != w0[mask == 1])  # ...and the kept ones train.
    assert prune.sparsity_of(after, masks) >= 0.5
    # Unmasked parameters (the embedding) train as usual.
    assert not np.allclose(before["embedding"]["embedding"], after["embedding"]["embedding"])
