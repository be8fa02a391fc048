"""An imported model behaves as it does in transformers: the same prompt tokens (special
tokens by the tokenizer's own convention), the same greedy continuation token for token
through `launch.sample` and through /v1/completions, and the same prompt log-probabilities
(echo) within 1e-4.

Models, each saved by transformers itself: the real SmolLM2-135M-Instruct (the bundled GGUF,
loaded and saved as a Hugging Face directory by transformers, which launch.sample reads,
while the server reads the GGUF as `make serve-demo` does, and answers a chat; its
tokenizer adds no bos), and
tiny random Llama (one kv head, rope_theta 5e5, untied head, a tokenizer that adds bos),
Qwen2 (qkv biases, no bos) and GPT-2 (learned positions, no bos) models.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tokenizers
import tokenizers.processors
import torch
import transformers

from research.data import Tokenizer, default_corpus_documents, train_tokenizer
from tests.checkpoint.test_gguf import smollm2_path
from tests.checkpoint.test_hf import randomize
from tests.serving import server_fixtures

transformers.logging.set_verbosity_error()
ROOT = server_fixtures.ROOT
PROMPTS = ("The king", "Thou art a villain, and", "O Romeo, Romeo! wherefore art thou")
NEW_TOKENS = 12

TINY = {
    # (config class, model class, sizes, tokenizer adds bos)
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(num_key_value_heads=1, rope_theta=5e5, tie_word_embeddings=False),
        True,
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2), False),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(), False),
}


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer of the bundled corpus (Cirrus's own), 320 tokens."""
    return train_tokenizer(default_corpus_documents()[:40], 320)


def save_tiny(kind: str, directory, bpe) -> str:
    """A tiny random model of `kind` and the tokenizer (bos added or not), as transformers
    saves them."""
    config_name, model_name, extra, adds_bos = TINY[kind]
    vocab = bpe.vocab_size
    if kind == "gpt2":
        sizes = dict(vocab_size=vocab, n_embd=32, n_head=4, n_layer=2, n_positions=128)
    else:
        sizes = dict(
            vocab_size=vocab,
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=48,
            num_hidden_layers=2,
            max_position_embeddings=128,
        )
    special = dict(bos_token_id=bpe.bos_id, eos_token_id=bpe.eos_id, pad_token_id=bpe.pad_id)
    config = getattr(transformers, config_name)(**sizes, **extra, **special)
    model = randomize(getattr(transformers, model_name)(config), seed=3, std=0.3)
    model.save_pretrained(directory)
    hf_tokenizer = tokenizers.Tokenizer.from_str(bpe.hf_tokenizer.to_str())
    if not adds_bos:  # The convention lives in the post-processor, as transformers reads it.
        hf_tokenizer.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)
    tokenizer = Tokenizer(
        hf_tokenizer, bos_token=bpe.bos_token, eos_token=bpe.eos_token, pad_token=bpe.pad_token
    )
    tokenizer.save(str(directory), model_max_length=128)
    return str(directory)


def transformers_side(directory: str, **load):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager", **load
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, **load)
    return model, tokenizer


def hf_greedy(model, ids: list[int], eos_id: int) -> list[int]:
    """transformers' greedy continuation, up to and including eos."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
        )[0, len(ids) :].tolist()
    return out[: out.index(eos_id) + 1] if eos_id in out else out


def hf_log_softmax(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def launch_sample(source: str, prompt: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "launch.sample", f"--workdir={source}", f"--prompt={prompt}",
         f"--max_new_tokens={NEW_TOKENS}", "--temperature=0", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def check_against_transformers(
    source: str, model, their_tokenizer, eos_id: int, serve_flags=(), chat=None
):
    """Prompt ids, greedy continuations (launch.sample of `source`, /v1/completions of a
    `launch.serve` of `serve_flags`, default --from_hf=source) and echo log-probabilities
    of every prompt against transformers; `chat(client)` runs more checks on the server."""
    expected = {}
    for prompt in PROMPTS:
        ids = their_tokenizer(prompt).input_ids
        expected[prompt] = (ids, hf_greedy(model, ids, eos_id), hf_log_softmax(model, ids))
    sampled = launch_sample(source, PROMPTS[-1])
    ids, continuation, _ = expected[PROMPTS[-1]]
    assert sampled["prompt_ids"] == ids
    assert sampled["token_ids"] == continuation
    server = server_fixtures.start_server(
        [*(serve_flags or [f"--from_hf={source}"]), "--model_name=m",
         "--gin_bindings=serve.num_slots=2"]
    )  # fmt: skip
    try:
        client = server_fixtures.make_client(server.url)
        for prompt, (ids, continuation, log_softmax) in expected.items():
            response = client.completions.create(
                model="m", prompt=prompt, max_tokens=NEW_TOKENS, temperature=0
            )
            assert response.usage.prompt_tokens == len(ids), prompt
            choice = response.choices[0]
            got = server_fixtures.make_client(server.url).completions.create(
                model="m",
                prompt=prompt,
                max_tokens=NEW_TOKENS,
                temperature=0,
                logprobs=1,
                extra_body={"return_tokens_as_token_ids": True},
            )
            tokens = [int(t.split(":")[1]) for t in got.choices[0].logprobs.tokens]
            assert tokens == continuation, prompt
            assert choice.text == got.choices[0].text
            scored = (
                client.completions.create(
                    model="m", prompt=prompt, max_tokens=0, echo=True, logprobs=1
                )
                .choices[0]
                .logprobs.token_logprobs
            )
            assert scored[0] is None and len(scored) == len(ids)
            want = [log_softmax[t - 1, ids[t]] for t in range(1, len(ids))]
            np.testing.assert_allclose(scored[1:], want, atol=1e-4, err_msg=prompt)
        if chat is not None:
            chat(client)
    finally:
        assert server_fixtures.stop_server(server) == 0, server.log()[-3000:]


@pytest.mark.parametrize("kind", sorted(TINY))
def test_tiny_models_match_transformers_token_for_token(kind, bpe, tmp_path):
    directory = save_tiny(kind, tmp_path / kind, bpe)
    model, their_tokenizer = transformers_side(directory)
    ours = Tokenizer.load(directory)
    adds_bos = TINY[kind][3]
    assert ours.add_bos == adds_bos
    for prompt in PROMPTS:  # The bos rule is transformers' own.
        assert ours.encode_prompt(prompt) == their_tokenizer(prompt).input_ids
        assert (ours.encode_prompt(prompt)[0] == bpe.bos_id) == adds_bos
    check_against_transformers(directory, model, their_tokenizer, bpe.eos_id)


@pytest.mark.slow
def test_smollm2_matches_transformers_token_for_token(tmp_path):
    path = smollm2_path()
    directory, name = os.path.split(path)
    loaded, their_tokenizer = transformers_side(directory, gguf_file=name)
    hf_dir = str(tmp_path / "smollm2")
    # transformers dequantized the GGUF; a plain copy of the model saves as float32.
    model = type(loaded)(loaded.config).eval()
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(hf_dir)
    their_tokenizer.save_pretrained(hf_dir)
    ours = Tokenizer.load(hf_dir)
    assert not ours.add_bos  # SmolLM2's tokenizer adds no bos (its bos is <|im_start|>).
    for prompt in PROMPTS:
        assert ours.encode_prompt(prompt) == their_tokenizer(prompt).input_ids

    def chat(client):  # What `make serve-demo` serves: the GGUF's own chat template.
        answer = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0,
        )
        assert "Paris" in answer.choices[0].message.content
        assert answer.choices[0].finish_reason == "stop"  # <|im_end|>

    # launch.sample reads the HF directory; the server reads the GGUF itself (serve-demo).
    check_against_transformers(
        hf_dir, model, their_tokenizer, their_tokenizer.eos_token_id,
        serve_flags=[f"--from_gguf={path}", "--gin_bindings=serve.max_len=256"], chat=chat,
    )  # fmt: skip
