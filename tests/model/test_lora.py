"""LoRA: the adapter's forward against NumPy, merging, frozen-base training (float and int8),
dropout, and the PEFT layout against the `peft` package."""

import jax
import numpy as np
import pytest
from flax import nnx

from research import sharding
from research.errors import UserError
from research.model import Decoder, lora
from research.train import TrainConfig, build_trainer
from tests.train.test_step import TINY as BASE
from tests.train.test_step import _batch

LORA = BASE.replace(lora_rank=4, lora_alpha=8.0, lora_targets=("q_proj", "o_proj", "down_proj"))


def _model(config, seed=0):
    graphdef, params = nnx.split(Decoder(config, rngs=nnx.Rngs(seed)), nnx.Param)
    return graphdef, params


def _with_b(params, value_fn):
    """params (pure dict) with every lora_b replaced by value_fn(shape)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: value_fn(np.shape(x)) if path[-1].key == "lora_b" else np.asarray(x),
        params,
    )


def _logits(config, pure, tokens):
    graphdef, params = _model(config, seed=5)
    nnx.replace_by_pure_dict(params, pure)
    return np.asarray(nnx.merge(graphdef, params)(tokens))


TOKENS = np.random.default_rng(0).integers(0, 37, size=(2, 9))


def test_targets_by_name_and_regex_and_a_typo_is_an_error():
    _, params = _model(LORA)
    found = lora.adapters(params)
    names = sorted({".".join(map(str, path[2:])) for path in found})
    assert names == ["attention.o_proj", "attention.q_proj", "mlp.down_proj"]
    assert len(found) == 6
    only_layer_1 = BASE.replace(lora_rank=2, lora_targets=(r"layers\.1\.attention\.(q|v)_proj",))
    assert sorted(lora.adapters(_model(only_layer_1)[1])) == [
        ("layers", 1, "attention", "q_proj"),
        ("layers", 1, "attention", "v_proj"),
    ]
    with pytest.raises(UserError, match="matches no layer.*q_proj"):
        _model(BASE.replace(lora_rank=2, lora_targets=("qproj",)))
    with pytest.raises(UserError, match="model.lora_rank=-1"):
        BASE.replace(lora_rank=-1)


def test_fresh_adapters_change_nothing_and_trained_ones_add_scaled_xab():
    _, base = _model(BASE)
    _, fresh = _model(LORA)
    pure = fresh.to_pure_dict()
    base_pure = base.to_pure_dict()
    # The base weights of the LoRA model = the base model's (same seed), B = 0: same logits.
    np.testing.assert_allclose(
        _logits(LORA, _with_b(pure, np.zeros), TOKENS),
        _logits(BASE, base_pure, TOKENS),
        rtol=1e-6,
        atol=1e-6,
    )
    rng = np.random.default_rng(1)
    trained = _with_b(pure, lambda shape: rng.normal(0, 0.3, shape).astype(np.float32))
    # One Dense by hand in NumPy: q_proj(x) = x W + (alpha / r) x A B.
    node = trained["layers"][0]["attention"]["q_proj"]
    x = rng.normal(size=(3, 16)).astype(np.float32)
    dense = nnx.merge(*_model(LORA)).layers[0].attention.q_proj
    dense.kernel[...] = node["kernel"]
    dense.lora_a[...], dense.lora_b[...] = node["lora_a"], node["lora_b"]
    a, b = node["lora_a"], node["lora_b"].reshape(4, -1)
    expected = x @ node["kernel"].reshape(16, -1) + 2.0 * (x @ a) @ b
    np.testing.assert_allclose(np.asarray(dense(x)).reshape(3, -1), expected, rtol=1e-5, atol=1e-5)
    # Merged (W + (alpha / r) A B, no adapters) gives the same logits.
    merged_config, merged = lora.merge(LORA, trained)
    assert merged_config.lora_rank == 0 and "lora_a" not in str(merged)
    np.testing.assert_allclose(
        _logits(merged_config, merged, TOKENS), _logits(LORA, trained, TOKENS), atol=2e-5
    )


def _train(model_config, steps=8, init=None, **overrides):
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    config = TrainConfig(
        num_steps=steps, batch_size=8, seq_len=12, warmup_steps=0, learning_rate=3e-2, **overrides
    )
    trainer, state = build_trainer(model_config, config, mesh)
    if init is not None:
        params = jax.tree.map(lambda x: x, state.params)
        nnx.replace_by_pure_dict(params, init)
        state = state.replace(params=jax.device_put(params, trainer.shardings.params))
    start = jax.tree.map(np.asarray, jax.device_get(state.params)).to_pure_dict()
    losses = []
    with jax.set_mesh(mesh):
        batch = sharding.global_batch(mesh, _batch(0))
        for _ in range(steps):
            state, metrics = trainer.train_step(state, batch)
            losses.append(float(metrics["loss"]))
    end = jax.tree.map(np.asarray, jax.device_get(state.params)).to_pure_dict()
    return start, end, losses, state


def _leaves(tree):
    return jax.tree_util.tree_leaves_with_path(tree)


def test_training_moves_only_the_adapters_and_the_loss_falls():
    start, end, losses, state = _train(LORA)
    assert losses[-1] < losses[0] - 0.05
    moved = []
    for (path, before), (_, after) in zip(_leaves(start), _leaves(end), strict=True):
        if path[-1].key in lora.ADAPTER_KEYS:
            moved.append(path[-1].key)
            assert not np.array_equal(before, after)  # A and B both learn (B from zero).
        else:
            np.testing.assert_array_equal(before, after)  # The base is frozen, bit for bit.
    assert len(moved) == 12
    # AdamW's moments exist for the adapters only.
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0)
    train, _ = lora.trainable_count(start)
    assert moments == 2 * train


def test_qlora_trains_adapters_over_a_frozen_int8_base():
    from research.compression.quantize import quantize_params

    _, base = _model(BASE.replace(init_std=0.1))
    qconfig, qparams = quantize_params(BASE, base, "int8", 0)
    config = qconfig.replace(lora_rank=4, lora_targets=("q_proj", "v_proj", "up_proj"))
    _, fresh = _model(config)
    init = {**fresh.to_pure_dict()}
    init = _overlay(init, qparams)
    start, end, losses, _ = _train(config, init=init)
    assert losses[-1] < losses[0] - 0.05
    for (path, before), (_, after) in zip(_leaves(start), _leaves(end), strict=True):
        if path[-1].key == "kernel_q":
            assert after.dtype == np.int8
        if path[-1].key not in lora.ADAPTER_KEYS:
            np.testing.assert_array_equal(before, after)


def _overlay(fresh, given):
    return {
        key: _overlay(value, given[key]) if isinstance(value, dict) else given.get(key, value)
        for key, value in fresh.items()
    }


def test_dropout_changes_the_step_and_repeats_for_the_same_step():
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    config = TrainConfig(num_steps=4, batch_size=8, seq_len=12, warmup_steps=0, learning_rate=3e-2)
    trainer, state = build_trainer(LORA.replace(lora_dropout=0.5), config, mesh)
    copy = jax.tree.map(lambda x: x.copy(), state)
    _, _, plain, _ = _train(LORA, steps=2)
    runs = []
    with jax.set_mesh(mesh):
        batch = sharding.global_batch(mesh, _batch(0))
        for start in (state, copy):
            losses = []
            for _ in range(2):
                start, metrics = trainer.train_step(start, batch)
                losses.append(float(metrics["loss"]))
            runs.append(losses)
    assert runs[0] == runs[1]  # The mask is a function of the step: a rerun repeats it.
    assert runs[0][0] == plain[0]  # B = 0 at step 0: dropout has nothing to drop yet.
    assert runs[0][1] != plain[1]


@pytest.mark.slow
def test_peft_export_loads_in_the_peft_package_with_the_same_logits(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from research.checkpoint import hf

    rng = np.random.default_rng(2)
    _, params = _model(LORA)
    trained = _with_b(params.to_pure_dict(), lambda s: rng.normal(0, 0.2, s).astype(np.float32))
    base_config = LORA.replace(lora_rank=0)
    base = lora._strip(trained)
    _, base_state = _model(base_config)
    nnx.replace_by_pure_dict(base_state, base)
    hf.save_hf(str(tmp_path / "base"), base_config, base_state)
    lora.save_peft(LORA, trained, str(tmp_path / "adapter"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    model = peft.PeftModel.from_pretrained(model, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(theirs, _logits(LORA, trained, TOKENS), atol=1e-4)
    # And back: the PEFT directory onto the base gives the same adapters.
    config, loaded = lora.load_peft(base_config, base, str(tmp_path / "adapter"))
    assert (config.lora_rank, config.lora_alpha) == (4, 8.0)
    for path, (a, b) in lora.adapters(trained).items():
        np.testing.assert_array_equal(lora.adapters(loaded)[path][0], a)
        np.testing.assert_array_equal(lora.adapters(loaded)[path][1], b)


def test_a_peft_directory_cirrus_cannot_load_is_a_clear_error(tmp_path):
    _, params = _model(LORA)
    lora.save_peft(LORA, params, str(tmp_path))
    config = (tmp_path / "adapter_config.json").read_text()
    (tmp_path / "adapter_config.json").write_text(
        config.replace('"use_dora": false', '"use_dora": true')
    )
    with pytest.raises(UserError, match="use_dora"):
        lora.load_peft(BASE, lora._strip(params.to_pure_dict()), str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(config)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="cannot be read"):
        lora.load_peft(BASE, lora._strip(params.to_pure_dict()), str(tmp_path))
    with pytest.raises(UserError, match="no adapter_config.json"):
        lora.load_peft(BASE, {}, str(tmp_path / "missing"))


def test_merged_parameters_flatten_for_export_like_a_plain_model():
    # launch.convert --to_hf of a LoRA run hands lora.merge's pure dict to the HF writer.
    from research.checkpoint.param_arrays import to_flat

    _, params = _model(LORA)
    config, merged = lora.merge(LORA, params)
    flat = to_flat(merged)
    assert config.lora_rank == 0 and flat.keys() == to_flat(_model(BASE)[1]).keys()
    kernel = merged["layers"][0]["attention"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(flat[("layers", 0, "attention", "q_proj", "kernel")], kernel)
