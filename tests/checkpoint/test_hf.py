"""Hugging Face interchange against the real `transformers` PyTorch models (CPU, float32).

Random Llama (GQA), Mistral, Qwen2 and GPT-2 models are built offline with transformers,
every parameter (norms and biases included) drawn at random so that a swapped or
mis-transposed tensor changes the logits.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from research.checkpoint import hf
from research.checkpoint.param_arrays import to_flat
from research.data import train_tokenizer
from research.errors import UserError
from research.model import Decoder, ModelConfig
from research.serving import generate_reference
from research.train.state import abstract_model

transformers.logging.set_verbosity_error()

# Distinct sizes (STYLE.md section 7): D=24, N=4, K=2, H=6, F=40, V=67.
LLAMA_SIZES = dict(
    vocab_size=67,
    hidden_size=24,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=40,
    num_hidden_layers=2,
    max_position_embeddings=64,
)
GPT2_SIZES = dict(vocab_size=67, n_embd=24, n_head=4, n_layer=2, n_positions=32, n_inner=40)
TOKENS = np.random.default_rng(0).integers(0, 67, (2, 12))
LLAMA3_ROPE = dict(
    rope_type="llama3", rope_theta=10_000.0, factor=8.0, low_freq_factor=1.0,
    high_freq_factor=4.0, original_max_position_embeddings=256,
)  # fmt: skip

CASES = {
    "llama_gqa_untied": ("LlamaConfig", "LlamaForCausalLM", dict(LLAMA_SIZES)),
    "llama_tied_biases": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(LLAMA_SIZES, tie_word_embeddings=True, attention_bias=True, rope_theta=500.0),
    ),
    # Llama 3.1 RoPE scaling with H=6: one frequency kept, one interpolated, one stretched.
    "llama_rope_scaling": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(LLAMA_SIZES, rope_parameters=LLAMA3_ROPE),
    ),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(LLAMA_SIZES, sliding_window=16, head_dim=8),
    ),
    "qwen2_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(LLAMA_SIZES, tie_word_embeddings=True)),
    "qwen2_untied": ("Qwen2Config", "Qwen2ForCausalLM", dict(LLAMA_SIZES)),
    "gpt2_tied": ("GPT2Config", "GPT2LMHeadModel", dict(GPT2_SIZES)),
    "gpt2_untied": ("GPT2Config", "GPT2LMHeadModel", dict(GPT2_SIZES, tie_word_embeddings=False)),
}


def randomize(model, seed=0, std=0.2):
    """Every parameter random: weights N(0, std), norm scales 1 + N(0, 0.1), biases N(0, 0.1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name or ".ln_" in name:
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            else:
                param.copy_(std * noise)
    return model.eval()


def hf_model(case: str, seed=0):
    config_name, model_name, sizes = CASES[case]
    config = getattr(transformers, config_name)(
        **sizes, attn_implementation="eager", bos_token_id=1, eos_token_id=2
    )
    return randomize(getattr(transformers, model_name)(config), seed)


def torch_logits(model, tokens_bt) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens_bt))).logits.numpy()


def cirrus_logits(model_config, params, tokens_bt) -> np.ndarray:
    graphdef, _ = abstract_model(model_config)
    return np.asarray(nnx.merge(graphdef, params)(jnp.asarray(tokens_bt)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_matches_transformers_logits(case, tmp_path):
    model = hf_model(case)
    model.save_pretrained(tmp_path)
    model_config, params, family, _ = hf.load_hf(str(tmp_path))
    assert family == case.split("_")[0]
    assert model_config.tie_embeddings == model.config.tie_word_embeddings
    np.testing.assert_allclose(
        cirrus_logits(model_config, params, TOKENS), torch_logits(model, TOKENS), atol=1e-4
    )


def test_mistral_sliding_window_caps_context(tmp_path):
    hf_model("mistral").save_pretrained(tmp_path)
    model_config, *_ = hf.load_hf(str(tmp_path))
    assert model_config.max_seq_len == 16 and model_config.head_dim == 8


def test_sharded_bfloat16_checkpoint(tmp_path):
    model = hf_model("llama_gqa_untied").to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model_config, params, _, _ = hf.load_hf(str(tmp_path))
    expected = model.model.layers[1].self_attn.k_proj.weight.detach().float().numpy()
    kernel = to_flat(params)[("layers", 1, "attention", "k_proj", "kernel")]
    np.testing.assert_array_equal(kernel.reshape(24, -1).T, expected)
    # transformers' own float32 load of the file (its RoPE cache stays float32, unlike .float()).
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager"
    )
    np.testing.assert_allclose(
        cirrus_logits(model_config, params, TOKENS), torch_logits(reference, TOKENS), atol=1e-4
    )


def random_cirrus(config: ModelConfig, seed=0):
    """A Decoder's params with every leaf random (biases and norms too)."""
    _, params = nnx.split(Decoder(config, rngs=nnx.Rngs(seed)), nnx.Param)
    rng = np.random.default_rng(seed)
    flat = {
        path: value + rng.normal(0, 0.1, value.shape) for path, value in to_flat(params).items()
    }
    from research.checkpoint.param_arrays import from_flat

    return from_flat(config, flat)


EXPORTS = {
    "llama": ModelConfig(
        vocab_size=67, d_model=24, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=40,
        max_seq_len=32, rope_theta=1000.0,
    ),
    "qwen2": ModelConfig(
        vocab_size=67, d_model=24, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=40,
        max_seq_len=32, qkv_bias=True, tie_embeddings=True,
    ),
    "llama_biases_head_dim": ModelConfig(
        vocab_size=67, d_model=24, num_layers=2, num_heads=4, num_kv_heads=1, mlp_dim=40,
        max_seq_len=32, use_bias=True, head_dim=10,
    ),
    "llama_rope_scaling": ModelConfig(
        vocab_size=67, d_model=24, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=40,
        max_seq_len=32, rope_scaling_factor=8.0, rope_scaling_original_len=256,
    ),
    "gpt2": ModelConfig(
        vocab_size=67, d_model=24, num_layers=2, num_heads=4, num_kv_heads=4, mlp_dim=40,
        max_seq_len=32, positions="learned", norm="layernorm", mlp_activation="gelu",
        use_bias=True, tie_embeddings=True,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(EXPORTS))
def test_export_loads_in_transformers_and_round_trips(case, tmp_path):
    config = EXPORTS[case]
    params = random_cirrus(config)
    family = hf.save_hf(str(tmp_path), config, params, max_shard_bytes=30_000)
    assert family == case.split("_")[0]
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")  # sharded
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    np.testing.assert_allclose(
        torch_logits(model, TOKENS), cirrus_logits(config, params, TOKENS), atol=1e-4
    )
    config_back, params_back, _, _ = hf.load_hf(str(tmp_path))
    assert config_back == config.replace(dtype="float32")
    before, after = to_flat(params), to_flat(params_back)
    assert before.keys() == after.keys()
    for path in before:
        np.testing.assert_array_equal(before[path], after[path], err_msg=str(path))


def test_greedy_generation_matches_transformers(tmp_path):
    model = hf_model("llama_gqa_untied", seed=3)
    model.save_pretrained(tmp_path)
    model_config, params, _, _ = hf.load_hf(str(tmp_path))
    prompt = [5, 17, 42, 8]
    graphdef, _ = abstract_model(model_config)
    ours = generate_reference(
        graphdef, params, prompt, max_new_tokens=32, max_seq_len=len(prompt) + 32
    )
    with torch.no_grad():
        theirs = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=32,
            min_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    assert ours == theirs


def test_export_writes_tokenizer_that_transformers_loads(tmp_path):
    tokenizer = train_tokenizer(["to be or not to be, that is the question"] * 20, 300)
    config = EXPORTS["llama"].replace(vocab_size=tokenizer.vocab_size)
    tokenizer.save(str(tmp_path / "tok"))
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    hf.save_hf(
        str(tmp_path / "out"),
        config,
        random_cirrus(config),
        tokenizer_dir=str(tmp_path / "tok"),
        special_ids=ids,
    )
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "that is the question"
    assert loaded(text, add_special_tokens=False).input_ids == tokenizer.encode(text)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["eos_token_id"] == tokenizer.eos_id


# --- user errors -------------------------------------------------------------------------------


def _write(directory, config: dict, tensors: dict):
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "model.safetensors"))


def _saved(case, tmp_path):
    from safetensors.numpy import load_file

    model = hf_model(case)
    model.save_pretrained(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    return config, load_file(str(tmp_path / "src" / "model.safetensors"))


def test_unsupported_architecture_lists_supported(tmp_path):
    config, tensors = _saved("llama_gqa_untied", tmp_path)
    config.update(architectures=["FalconForCausalLM"], model_type="falcon")
    _write(tmp_path / "bad", config, tensors)
    with pytest.raises(UserError, match=r"FalconForCausalLM.*LlamaForCausalLM") as error:
        hf.load_hf(str(tmp_path / "bad"))
    assert "GPT2LMHeadModel" in str(error.value)


def test_missing_and_unexpected_tensors_are_listed(tmp_path):
    config, tensors = _saved("llama_gqa_untied", tmp_path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.1.mlp.extra.weight"] = np.zeros(3, np.float32)
    _write(tmp_path / "bad", config, tensors)
    with pytest.raises(UserError) as error:
        hf.load_hf(str(tmp_path / "bad"))
    message = str(error.value)
    assert "missing tensors: model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected tensors: model.layers.1.mlp.extra.weight" in message
    assert "expected 21 tensors, found 21" in message


def test_wrong_shape_names_tensor_and_shapes(tmp_path):
    config, tensors = _saved("gpt2_tied", tmp_path)
    config["n_inner"] = 48
    _write(tmp_path / "bad", config, tensors)
    with pytest.raises(UserError, match=r"transformer.h.0.mlp.c_fc.weight has shape \[24, 40\]"):
        hf.load_hf(str(tmp_path / "bad"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling 'yarn'"),
    ],
)
def test_unsupported_config_values(change, message, tmp_path):
    config, tensors = _saved("llama_gqa_untied", tmp_path)
    _write(tmp_path / "bad", {**config, **change}, tensors)
    with pytest.raises(UserError, match=message):
        hf.load_hf(str(tmp_path / "bad"))


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match="safe_serialization=True"):
        hf.SafetensorsTensors(str(tmp_path))
    with pytest.raises(UserError, match="Hugging Face model directory"):
        hf.load_hf(str(tmp_path / "nowhere"))


def test_export_rejects_unrepresentable_config():
    config = EXPORTS["llama"].replace(norm="layernorm")
    with pytest.raises(UserError, match="no Hugging Face family"):
        hf.export_family(config)


def test_llama3_rope_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from research.model.positional import RopeScaling, rope_inverse_frequency

    config = transformers.LlamaConfig(
        hidden_size=128, num_attention_heads=2, rope_parameters=dict(LLAMA3_ROPE, factor=32.0)
    )
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    scaling = RopeScaling(32.0, 1.0, 4.0, 256)
    ours = rope_inverse_frequency(64, 10_000.0, scaling)
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-6)
    unscaled = np.asarray(rope_inverse_frequency(64, 10_000.0))
    assert (ours < unscaled).any() and (ours == unscaled).any()  # some stretched, some kept


def test_bad_rope_scaling_is_a_user_error():
    with pytest.raises(UserError, match="rope_scaling_factor"):
        EXPORTS["llama"].replace(rope_scaling_factor=0.5)


def _indexed(directory, weight_map: dict) -> str:
    """A model directory whose index maps tensors to `weight_map`'s files; returns its path."""
    os.makedirs(directory, exist_ok=True)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return str(directory)


@pytest.mark.parametrize(
    "file", ["../outside.safetensors", "shards/../../outside.safetensors", "/abs.safetensors"]
)
def test_index_entry_outside_the_model_directory_is_refused(file, tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.ones(2, np.float32)}, str(tmp_path / "outside.safetensors"))
    model = _indexed(tmp_path / "model", {"w": file})
    with pytest.raises(UserError, match="outside the model directory") as error:
        hf.SafetensorsTensors(model)
    assert repr(file) in str(error.value) and "'w'" in str(error.value)
    assert "model.safetensors.index.json" in str(error.value)


def test_index_entry_symlinked_out_of_the_model_directory_is_refused(tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.ones(2, np.float32)}, str(tmp_path / "outside.safetensors"))
    model = _indexed(tmp_path / "model", {"w": "model-1.safetensors"})
    os.symlink(tmp_path / "outside.safetensors", tmp_path / "model" / "model-1.safetensors")
    with pytest.raises(UserError, match="'model-1.safetensors' points outside"):
        hf.SafetensorsTensors(model)


def test_index_entries_inside_and_hugging_face_cache_links_load(tmp_path):
    from safetensors.numpy import save_file

    # The hub cache: snapshots/<revision>/ files are symlinks into the repository's blobs/.
    repo = tmp_path / "models--org--name"
    os.makedirs(repo / "blobs")
    save_file({"a": np.ones(2, np.float32)}, str(repo / "blobs" / "0123abcd"))
    model = _indexed(repo / "snapshots" / "rev", {"a": "model-1.safetensors", "b": "sub/b.st"})
    os.symlink("../../blobs/0123abcd", repo / "snapshots" / "rev" / "model-1.safetensors")
    os.makedirs(repo / "snapshots" / "rev" / "sub")
    save_file({"b": np.zeros(3, np.float32)}, str(repo / "snapshots" / "rev" / "sub" / "b.st"))
    tensors = hf.SafetensorsTensors(model)
    np.testing.assert_array_equal(tensors["a"], np.ones(2, np.float32))
    np.testing.assert_array_equal(tensors["b"], np.zeros(3, np.float32))
