"""The slot sampler: exact against the full-forward oracle, batch-independent, checked input."""

import jax
import numpy as np
import pytest

from research.errors import UserError
from research.serving import Sampler, SamplingParams, complete, generate_reference
from research.sharding import make_mesh
from tests.evaluation.helpers import CharTokenizer
from tests.serving.helpers import FAMILIES, LLAMA, full_logits, random_split

PROMPTS = [[1, 5, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [3]]


@pytest.fixture(scope="module")
def llama():
    graphdef, params = random_split(LLAMA)
    return Sampler(LLAMA, graphdef, params, num_slots=4, steps_per_call=5, num_top_logprobs=3)


@pytest.fixture(scope="module")
def gpt2():
    config = FAMILIES["gpt2"]
    graphdef, params = random_split(config, seed=1)
    # 2 slots for 3 prompts: the third is admitted when a slot frees up.
    return Sampler(config, graphdef, params, num_slots=2, steps_per_call=4)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_full_forward_argmax(family, request):
    sampler = request.getfixturevalue(family)
    results = complete(sampler, PROMPTS, SamplingParams(max_new_tokens=9, temperature=0.0))
    for prompt, result in zip(PROMPTS, results, strict=True):
        expected = generate_reference(
            sampler.graphdef,
            sampler.params,
            prompt,
            max_new_tokens=9,
            max_seq_len=sampler.model_config.max_seq_len,
        )
        assert result.token_ids == expected
        assert result.finish_reason == "length"


def test_logprobs_are_the_full_forward_log_softmax(llama):
    prompt = PROMPTS[0]
    (result,) = complete(llama, [prompt], SamplingParams(max_new_tokens=6, num_logprobs=3))
    tokens = np.asarray([prompt + result.token_ids])
    logits_tv = full_logits(llama.graphdef, llama.params, tokens)[0]
    log_softmax_tv = logits_tv - jax.nn.logsumexp(logits_tv, axis=-1, keepdims=True)
    for j, token in enumerate(result.token_ids):
        row = np.asarray(log_softmax_tv[len(prompt) - 1 + j])
        np.testing.assert_allclose(result.logprobs[j], row[token], atol=1e-4)
        top = result.top_logprobs[j]
        assert [i for i, _ in top] == list(np.argsort(-row)[:3])
        np.testing.assert_allclose([p for _, p in top], np.sort(row)[::-1][:3], atol=1e-4)


def test_same_seed_same_output_whatever_the_other_slots_do(llama):
    request = SamplingParams(max_new_tokens=12, temperature=1.3, top_p=0.9, seed=7)
    (alone,) = complete(llama, [PROMPTS[0]], request)
    neighbours = [
        SamplingParams(max_new_tokens=3, temperature=0.0),
        SamplingParams(max_new_tokens=20, temperature=2.0, top_k=3, repetition_penalty=1.5),
        SamplingParams(max_new_tokens=8, temperature=0.7, min_p=0.1, frequency_penalty=0.5),
        SamplingParams(max_new_tokens=2, temperature=1.0, presence_penalty=1.0, seed=1),
    ]
    # The request lands in the last slot, after neighbours that finish at different times.
    prompts = [PROMPTS[1], PROMPTS[2], [4, 4], PROMPTS[0], PROMPTS[0], [9]]
    requests = [neighbours[0], neighbours[1], neighbours[2], request, neighbours[3], request]
    results = complete(llama, prompts, requests)
    assert results[3].token_ids == alone.token_ids
    assert results[5].token_ids != alone.token_ids  # Another prompt, another sample.
    np.testing.assert_allclose(results[3].logprobs, alone.logprobs, atol=1e-5)
    other_seed = complete(llama, [PROMPTS[0]], SamplingParams(**{**vars(request), "seed": 8}))
    assert other_seed[0].token_ids != alone.token_ids


def test_top_k_one_is_greedy(llama):
    greedy = complete(llama, PROMPTS, SamplingParams(max_new_tokens=8, temperature=0.0))
    top1 = complete(llama, PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.5, top_k=1))
    assert [r.token_ids for r in top1] == [r.token_ids for r in greedy]


def test_stop_token_and_capacity(llama):
    (greedy,) = complete(llama, [PROMPTS[0]], SamplingParams(max_new_tokens=8, temperature=0.0))
    stop = greedy.token_ids[3]
    first = greedy.token_ids.index(stop)
    (stopped,) = complete(
        llama,
        [PROMPTS[0]],
        SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=(stop,)),
    )
    assert stopped.token_ids == greedy.token_ids[: first + 1]
    assert stopped.finish_reason == "stop"
    # A prompt of max_len - 1 tokens has room for exactly one new token.
    long_prompt = [1] * (LLAMA.max_seq_len - 1)
    (full,) = complete(llama, [long_prompt], SamplingParams(max_new_tokens=8, temperature=0.0))
    assert len(full.token_ids) == 1 and full.finish_reason == "length"


def test_stop_strings_end_the_text_exactly(llama):
    tokenizer = CharTokenizer()
    prompt = [tokenizer.bos_id, *tokenizer.encode("the king")]
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    (full,) = complete(llama, [prompt], greedy, tokenizer=tokenizer)
    assert full.text == tokenizer.decode(full.token_ids) and len(full.text) >= 8
    stop = full.text[5:7]
    streamed = []
    (cut,) = complete(
        llama,
        [prompt],
        SamplingParams(max_new_tokens=12, temperature=0.0, stop_strings=(stop,)),
        tokenizer=tokenizer,
        on_text=lambda index, text: streamed.append(text),
    )
    assert cut.text == full.text[: full.text.index(stop)] == "".join(streamed)
    assert cut.finish_reason == "stop"
    needed = next(
        n for n in range(13) if stop in tokenizer.decode(full.token_ids[:n])
    )  # The tokens up to the one that completes the stop string.
    assert cut.token_ids == full.token_ids[:needed]


def test_frequency_penalty_forbids_repeats(llama):
    request = SamplingParams(max_new_tokens=20, temperature=0.0, frequency_penalty=1e4)
    (result,) = complete(llama, [PROMPTS[0]], request)
    assert len(set(result.token_ids)) == len(result.token_ids) == 20


def test_prompt_lengths_share_a_compiled_prefill(llama):
    state = llama.init_state()
    state, _ = llama.extend(state, [(0, [1, 2], 0)])
    before = llama._extend._cache_size()
    for length in (3, 5, 9, 16):  # all in the 16 bucket
        state, _ = llama.extend(state, [(0, [1] * length, 0)])
    assert llama._extend._cache_size() == before


def test_sharded_mesh_gives_the_single_device_tokens(llama):
    mesh_shape = (2, 1, 2)  # slots over data, kv heads over tensor
    requests = [
        SamplingParams(max_new_tokens=7, temperature=0.0),
        SamplingParams(max_new_tokens=7, temperature=1.0, top_k=5, seed=3),
    ]
    expected = complete(llama, PROMPTS[:2], requests)
    mesh = make_mesh(mesh_shape, devices=jax.devices()[: np.prod(mesh_shape)])
    sharded = Sampler(LLAMA, llama.graphdef, llama.params, num_slots=4, mesh=mesh)
    results = complete(sharded, PROMPTS[:2], requests)
    assert [r.token_ids for r in results] == [r.token_ids for r in expected]
    state = sharded.init_state()
    assert "tensor" in str(state.cache.keys[0][0].sharding.spec)


@pytest.mark.parametrize(
    "prompt, params, field",
    [
        ([], SamplingParams(), "prompt is empty"),
        ([1] * LLAMA.max_seq_len, SamplingParams(), "shorten it"),
        ([1, 99], SamplingParams(), "outside [0, 37)"),
        ([1], SamplingParams(max_new_tokens=0), "max_new_tokens"),
        ([1], SamplingParams(temperature=-0.5), "temperature"),
        ([1], SamplingParams(top_p=0.0), "top_p"),
        ([1], SamplingParams(top_p=1.5), "top_p"),
        ([1], SamplingParams(top_k=-1), "top_k"),
        ([1], SamplingParams(min_p=1.0), "min_p"),
        ([1], SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
        ([1], SamplingParams(stop_token_ids=(37,)), "stop_token_ids"),
        ([1], SamplingParams(num_logprobs=4), "num_logprobs"),
        ([1], SamplingParams(stop_strings=("\n",)), "tokenizer"),
    ],
)
def test_bad_input_is_a_user_error(llama, prompt, params, field):
    with pytest.raises(UserError, match=field.replace("[", r"\[").replace(")", r"\)")):
        complete(llama, [prompt], params)
