"""launch.convert and launch.train --init_from as a user runs them: subprocesses, real flags."""

import os

import numpy as np
import pytest
import transformers

from research.checkpoint import load_model, load_pretrained
from research.checkpoint.param_arrays import to_flat
from research.data import Tokenizer, train_tokenizer
from tests.checkpoint.test_hf import cirrus_logits, randomize, torch_logits
from tests.launch.test_sample_eval import run_module
from tests.launch.test_train_cli import TINY_RUN

TEXT = "Once more unto the breach, dear friends, once more; or close the wall up with our dead."


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random Qwen2-style (GQA, q/k/v biases) HF model with a tokenizer.json."""
    directory = tmp_path_factory.mktemp("hf")
    tokenizer = train_tokenizer([TEXT] * 20, 300)
    config = transformers.Qwen2Config(
        vocab_size=tokenizer.vocab_size, hidden_size=40, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, num_hidden_layers=2,
        max_position_embeddings=64, attn_implementation="eager",
    )  # fmt: skip
    model = randomize(transformers.Qwen2ForCausalLM(config))
    model.save_pretrained(directory)
    tokenizer.save(str(directory))
    return directory, model, tokenizer


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run") / "imported"
    result = run_module("launch.convert", [f"--from_hf={hf_dir[0]}", f"--workdir={workdir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_convert_from_hf_then_load_model(hf_dir, imported):
    _, model, tokenizer = hf_dir
    loaded = load_model(str(imported))
    assert loaded.step == 0 and loaded.model_config.qkv_bias
    assert loaded.tokenizer.encode(TEXT) == tokenizer.encode(TEXT)
    tokens = [tokenizer.encode(TEXT)[:20]]
    np.testing.assert_allclose(
        cirrus_logits(loaded.model_config, loaded.params, tokens),
        torch_logits(model, tokens),
        atol=1e-4,
    )
    assert "model.qkv_bias = True" in (imported / "config.gin").read_text()


def test_load_pretrained_reads_an_imported_run(imported):
    pretrained = load_pretrained(str(imported))
    assert pretrained.source["format"] == "cirrus" and pretrained.source["family"] == "qwen2"
    assert os.path.isfile(os.path.join(pretrained.tokenizer_dir, "tokenizer.json"))


def test_convert_to_hf_loads_in_transformers(hf_dir, imported, tmp_path):
    _, model, tokenizer = hf_dir
    result = run_module("launch.convert", [f"--workdir={imported}", f"--to_hf={tmp_path / 'out'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "as qwen2" in result.stdout
    exported = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager"
    )
    tokens = [tokenizer.encode(TEXT)[:20]]
    np.testing.assert_allclose(
        torch_logits(exported, tokens), torch_logits(model, tokens), atol=1e-5
    )
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert their_tokenizer(TEXT, add_special_tokens=False).input_ids == tokenizer.encode(TEXT)


def test_convert_from_gguf_then_load_model(tmp_path):
    from tests.checkpoint.test_gguf import LLAMA, Q8_0, reference_with, write_llama_gguf

    tokenizer = train_tokenizer([TEXT] * 20, 300)
    config = transformers.LlamaConfig(**dict(LLAMA, vocab_size=tokenizer.vocab_size))
    model = randomize(transformers.LlamaForCausalLM(config))
    weights = write_llama_gguf(tmp_path / "m.gguf", model, "llama", Q8_0, tokenizer=tokenizer)
    workdir = tmp_path / "run"
    result = run_module(
        "launch.convert", [f"--from_gguf={tmp_path / 'm.gguf'}", f"--workdir={workdir}"]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = load_model(str(workdir))
    assert loaded.tokenizer.encode(TEXT) == tokenizer.encode(TEXT)
    tokens = [tokenizer.encode(TEXT)[:20]]
    np.testing.assert_allclose(
        cirrus_logits(loaded.model_config, loaded.params, tokens),
        torch_logits(reference_with(model, weights), tokens),
        atol=1e-4,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--from_hf=/nonexistent/model"], "Hugging Face model directory"),
        (["--from_hf=a", "--to_hf=b"], "exactly one of"),
        (["--from_hf=a", "--gin_bindings=model.d_model=8"], "no gin configuration"),
    ],
)
def test_convert_user_errors_exit_1(args, message, tmp_path):
    result = run_module("launch.convert", [*args, f"--workdir={tmp_path / 'w'}"])
    assert result.returncode == 1, result.stderr[-3000:]
    assert message in result.stderr and "Traceback" not in result.stderr


def test_convert_refuses_a_workdir_with_checkpoints(hf_dir, imported):
    result = run_module("launch.convert", [f"--from_hf={hf_dir[0]}", f"--workdir={imported}"])
    assert result.returncode == 1 and "already holds checkpoints" in result.stderr


@pytest.mark.slow
def test_train_init_from_starts_at_imported_weights(hf_dir, tmp_path):
    """Fine-tuning with a learning rate of ~0 ends where the import began."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index in range(12):
        (corpus / f"doc{index}.txt").write_text(f"Scene {index}. " + TEXT * 4)
    bindings = TINY_RUN + [
        f"data.sources = ('{corpus}',)",
        f"data.cache_dir = '{tmp_path}/cache'",
        "train.num_steps = 2",
        "train.eval_every = 0",
        "train.learning_rate = 1e-9",
    ]
    workdir = tmp_path / "finetune"
    flags = ["--gin_file=configs/experiment/demo.gin", f"--workdir={workdir}", "--sample_tokens=4"]
    flags += [f"--init_from={hf_dir[0]}"] + [f"--gin_bindings={b}" for b in bindings]
    result = run_module("launch.train", flags)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "--init_from: hf" in result.stdout
    operative = (workdir / "config.gin").read_text()
    assert "model.d_model = 40" in operative and "model.mlp_dim = 48" in operative  # not gin's
    start = to_flat(load_pretrained(str(hf_dir[0])).params)
    end = to_flat(load_model(str(workdir)).params)
    for path in start:
        np.testing.assert_allclose(end[path], start[path], atol=1e-5, err_msg=str(path))
    tokenizer = Tokenizer.load(str(workdir / "tokenizer"))
    assert tokenizer.encode(TEXT) == hf_dir[2].encode(TEXT)
