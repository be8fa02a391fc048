"""DPO: the loss against NumPy, reference log-probs against the model's own log-softmax, and
training through the common loop (full fine-tuning and LoRA adapters only)."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from research import sharding
from research.data import train_tokenizer
from research.data.chat import ChatTemplate
from research.finetune import (
    dpo_objective,
    dpo_terms,
    encode_pairs,
    pair_batch,
    pair_dataset,
    reference_logprobs,
)
from research.finetune.preference import Preference
from research.model import Decoder, ModelConfig
from research.train import TrainConfig, train
from research.train.state import abstract_model

CONFIG = ModelConfig(
    vocab_size=320, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
    max_seq_len=64,
)  # fmt: skip
SEQ_LEN = 48


def _preferences(count: int) -> list:
    return [
        Preference(f"x:{i}", [{"role": "user", "content": f"Say hello, {i}."}],
                   {"role": "assistant", "content": "Hello there, friend."},
                   {"role": "assistant", "content": f"Go away, {i}."})
        for i in range(count)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def pairs():
    texts = [f"<|im_start|>user\nSay hello, {i}.<|im_end|>\n" for i in range(20)]
    texts += ["<|im_start|>assistant\nHello there, friend.<|im_end|>\nGo away."] * 20
    template = ChatTemplate(train_tokenizer(texts, CONFIG.vocab_size))  # ChatML, bos first.
    pairs, report = encode_pairs(template, _preferences(8), seq_len=SEQ_LEN)
    assert report.kept == 8 and pairs.lengths.max() <= SEQ_LEN, report.describe()
    return pairs


def _base_params(seed: int = 0):
    """Random initial weights as the loaders give them (research/checkpoint/param_arrays.py:
    the abstract model's State, built under a mesh so its metadata matches the trainer's)."""
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
        _, params = abstract_model(CONFIG)
    nnx.replace_by_pure_dict(
        params, nnx.state(Decoder(CONFIG, rngs=nnx.Rngs(seed)), nnx.Param).to_pure_dict()
    )
    return params


def _numpy_logprobs(params, pairs) -> np.ndarray:
    """[N, 2]: each response's summed log-softmax (NumPy, float64) from logits of the
    sequences run without padding masks: causal attention keeps the zeros after a sequence
    from reaching it."""
    model = nnx.merge(nnx.graphdef(Decoder(CONFIG, rngs=nnx.Rngs(0))), params)
    rows = pairs.tokens[..., :-1].reshape(-1, pairs.tokens.shape[-1] - 1)
    logits = np.asarray(jax.jit(lambda tokens: model(tokens))(rows), np.float64)
    logits = logits.reshape(*pairs.tokens.shape[:2], *logits.shape[1:])
    out = np.zeros((len(pairs), 2))
    for index in range(len(pairs)):
        start = int(pairs.prompt_lengths[index])
        for row in range(2):
            tokens = pairs.tokens[index, row, : pairs.lengths[index, row]]
            row_logits = logits[index, row]
            top = row_logits.max(-1, keepdims=True)
            log_softmax = row_logits - top - np.log(np.exp(row_logits - top).sum(-1, keepdims=True))
            positions = np.arange(start - 1, len(tokens) - 1)  # Predicting the response.
            out[index, row] = log_softmax[positions, tokens[positions + 1]].sum()
    return out


def _numpy_dpo(policy, reference, beta):
    margin = beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
    return np.log1p(np.exp(-margin)), margin  # -log sigmoid(margin)


def test_dpo_loss_matches_numpy(pairs):
    rng = np.random.default_rng(0)
    policy, reference = rng.normal(-20, 3, (6, 2)), rng.normal(-20, 3, (6, 2))
    terms = dpo_terms(policy, reference, 0.5)
    loss, margin = _numpy_dpo(policy, reference, 0.5)
    np.testing.assert_allclose(terms["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(terms["margin"], margin, rtol=1e-5)
    np.testing.assert_allclose(terms["chosen_reward"], 0.5 * (policy[:, 0] - reference[:, 0]))
    # The objective on a model: the mean over real pairs (two padding pairs weigh nothing).
    params = _base_params(seed=1)
    batch = pair_batch(pairs, [0, 3, 5], size=5)
    batch["reference"][:3] = rng.normal(-30, 2, (3, 2))
    graphdef = nnx.graphdef(Decoder(CONFIG, rngs=nnx.Rngs(0)))
    objective_loss = jax.jit(dpo_objective(0.1).loss, static_argnums=0)
    loss_sum, sums = objective_loss(graphdef, params, batch, None)
    expected_loss, expected_margin = _numpy_dpo(
        _numpy_logprobs(params, pairs)[[0, 3, 5]], batch["reference"][:3], 0.1
    )
    pair_count = batch["weights"].sum()
    assert pair_count == 3
    np.testing.assert_allclose(float(loss_sum) / pair_count, expected_loss.mean(), rtol=1e-4)
    np.testing.assert_allclose(float(sums["reward_margin"]), expected_margin.sum(), rtol=1e-4)
    assert float(sums["correct"]) == (expected_margin > 0).sum()


def test_reference_logprobs_are_the_models_log_softmax_sums(pairs):
    params = _base_params()
    mesh = sharding.make_mesh((2, 1, 1), devices=jax.devices()[:2])
    # Three batches of 3 pairs (the last padded), the pairs split over two devices.
    reference = reference_logprobs(CONFIG, params, pairs, batch_size=4, mesh=mesh)
    np.testing.assert_allclose(reference, _numpy_logprobs(params, pairs), rtol=1e-4, atol=1e-3)
    # The same model with LoRA settings scores the same: adapters start at zero.
    with_lora = CONFIG.replace(lora_rank=4)
    np.testing.assert_array_equal(
        reference_logprobs(with_lora, params, pairs, batch_size=4, mesh=mesh), reference
    )


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_training_raises_the_margin_full_or_lora(pairs, tmp_path, lora_rank):
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    model_config = CONFIG.replace(lora_rank=lora_rank, lora_alpha=16.0, lora_targets=targets)
    base = jax.tree.map(np.asarray, _base_params())  # Host copies: the step donates its state.
    mesh = sharding.make_mesh((2, 1, 1), devices=jax.devices()[:2])
    pairs.reference = reference_logprobs(model_config, base, pairs, batch_size=4, mesh=mesh)
    config = TrainConfig(
        num_steps=6, batch_size=4, seq_len=SEQ_LEN, warmup_steps=0, schedule="constant",
        learning_rate=1e-2, weight_decay=0.0, log_every=1, eval_every=0,
        peak_flops_per_device=1e11,
    )  # fmt: skip
    lines = []
    _, state, last = train(
        model_config, config, data_dir=None, workdir=str(tmp_path), log=lines.append,
        mesh=mesh, init_params=base, objective=dpo_objective(0.1),
        dataset=pair_dataset(pairs, config.batch_size, seed=0),
    )  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    first = records[0]  # Step 1 scores the initial model: policy = reference.
    assert abs(first["loss"] - np.log(2)) < 1e-3 and abs(first["reward_margin"]) < 1e-3
    margins = [record["reward_margin"] for record in records]
    assert margins[-1] > 0.2 and margins[-1] > margins[2] > 0, margins
    assert last["reward_accuracy"] == 1.0
    assert last["loss"] < 0.6 and last["accuracy"] == last["reward_accuracy"]
    assert any("reward_accuracy" in line and "tok/s" in line and "ETA" in line for line in lines)
    trained = jax.device_get(state.params.to_pure_dict())
    kernel = trained["layers"][0]["attention"]["q_proj"]["kernel"]
    base_kernel = np.asarray(base.to_pure_dict()["layers"][0]["attention"]["q_proj"]["kernel"])
    if lora_rank:  # Only the adapters trained; the base is bit for bit the same.
        np.testing.assert_array_equal(kernel, base_kernel)
        assert np.abs(trained["layers"][0]["attention"]["q_proj"]["lora_b"]).max() > 0
    else:
        assert np.abs(kernel - base_kernel).max() > 0
