"""The OpenAI-compatible server, through the official `openai` client, against a real Engine.

One tiny random-weights model (tests/serving/server_fixtures.py) and one started Engine serve
the whole module; apps with other settings (API keys, rate limits, body limit) wrap the same
engine, each on its own uvicorn thread on 127.0.0.1. One test runs `launch.serve` itself.
"""

import json
import re
import signal
import socket
import time

import httpx2
import jax
import numpy as np
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings, strategies

from research.checkpoint import load_model, save_hf
from research.serving.engine import Engine, EngineConfig
from research.serving.http.chat import read_chat_template
from research.serving.http.server import create_app
from tests.serving import server_fixtures
from tests.serving.helpers import full_logits

MODEL = "tiny"
MODEL_LEN = 2048  # The checkpoint's max_seq_len; the shared engine serves 128 of it.
CONFIG = EngineConfig(
    max_len=128,
    num_slots=4,
    steps_per_call=4,
    prefill_chunk=64,
    max_waiting=8,
    prefix_cache_mb=4,
    prefix_block=8,
    num_top_logprobs=3,
)
# One slot, one waiting place, one token per call, 2048 tokens of context: a request that
# is still running while a test disconnects it, or fills the queue.
LONG_CONFIG = EngineConfig(
    num_slots=1, max_waiting=1, steps_per_call=1, prefill_chunk=16, prefix_cache_mb=0
)
LONG_PROMPT = (
    "Two households, both alike in dignity, in fair Verona, where we lay our scene, from "
    "ancient grudge break to new mutiny, where civil blood makes civil hands unclean."
)


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve") / "run"
    return server_fixtures.write_tiny_workdir(directory, max_seq_len=MODEL_LEN)


@pytest.fixture(scope="module")
def loaded(workdir):
    return load_model(workdir, log=lambda _: None)


@pytest.fixture(scope="module")
def engine(loaded):
    engine = Engine(loaded.model_config, loaded.graphdef, loaded.params, loaded.tokenizer, CONFIG)
    engine.start()
    assert engine.wait_ready(300), engine.error
    yield engine
    engine.shutdown(drain_timeout_s=5)


@pytest.fixture(scope="module")
def long_engine(loaded):
    engine = Engine(
        loaded.model_config, loaded.graphdef, loaded.params, loaded.tokenizer, LONG_CONFIG
    )
    engine.start()
    assert engine.wait_ready(300), engine.error
    yield engine
    engine.shutdown(drain_timeout_s=5)


@pytest.fixture(scope="module")
def tokenizer(loaded):
    return loaded.tokenizer


serving = server_fixtures.serving
make_client = server_fixtures.make_client


@pytest.fixture(scope="module")
def url(engine, workdir):
    template = read_chat_template(f"{workdir}/tokenizer")
    with serving(create_app(engine, model_name=MODEL, chat_template=template)) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return make_client(url)


def model_log_softmax(loaded, ids):
    """[T, V] log-probabilities of the next token after each of `ids`, from the full forward."""
    logits = full_logits(loaded.graphdef, loaded.params, [ids])[0]
    return np.asarray(jax.nn.log_softmax(logits.astype(np.float64), axis=-1))


def ids_of(tokens):
    """Token ids from 'token_id:<id>' strings (return_tokens_as_token_ids)."""
    return [int(t.split(":", 1)[1]) for t in tokens]


def greedy(client, prompt, **kwargs):
    kwargs = {"model": MODEL, "max_tokens": 12, "temperature": 0.0, **kwargs}
    return client.completions.create(prompt=prompt, **kwargs)


def abort_count(engine) -> float:
    sample = engine.metrics.registry.get_sample_value(
        "vllm:request_success_total", {"model_name": "cirrus", "finished_reason": "abort"}
    )
    return sample or 0.0


def wait_for(engine, running: int, waiting: int, timeout_s: float = 60.0) -> dict:
    """engine.stats() once `running` requests hold slots and `waiting` are queued."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = engine.stats()
        if (stats["running"], stats["waiting"]) == (running, waiting):
            return stats
        time.sleep(0.005)
    pytest.fail(f"the engine never had {running} running, {waiting} waiting: {engine.stats()}")


def open_request(url: str, body: dict) -> socket.socket:
    """Sends POST /v1/completions on a raw socket and returns it unread: closing it is a
    client that goes away."""
    data = json.dumps(body).encode()
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    connection = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    connection.sendall(head.encode() + data)
    return connection


# ---- endpoints --------------------------------------------------------------------------------


def test_models_health_ready_metrics_and_openapi(client, url, engine):
    (card,) = client.models.list().data
    assert (card.id, card.root, card.owned_by) == (MODEL, MODEL, "cirrus")
    assert card.created > 0 and card.model_extra["max_model_len"] == engine.max_len == 128
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx2.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx2.get(f"{url}/ready").status_code == 200
    greedy(client, "ROMEO:", max_tokens=2)
    metrics = httpx2.get(f"{url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    names = ("vllm:time_to_first_token_seconds_bucket", "vllm:prompt_tokens_total",
             "vllm:num_requests_running", 'cirrus:http_requests_total{status="200"}')  # fmt: skip
    for name in names:
        assert name in metrics.text
    schema = httpx2.get(f"{url}/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(schema["paths"])


def test_completion_logprobs_and_echo_are_the_models_own(client, loaded, tokenizer):
    prompt_ids = tokenizer.encode_prompt("ROMEO: But soft, what light")
    response = greedy(
        client,
        prompt_ids,
        max_tokens=6,
        logprobs=3,
        echo=True,
        extra_body={"return_tokens_as_token_ids": True},
    )
    (choice,) = response.choices
    logprobs = choice.logprobs
    ids = ids_of(logprobs.tokens)
    assert ids[: len(prompt_ids)] == prompt_ids and len(ids) == len(prompt_ids) + 6
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert choice.text.startswith(tokenizer.decode(prompt_ids))
    expected = model_log_softmax(loaded, ids)
    for i in range(1, len(ids)):
        row = expected[i - 1]
        np.testing.assert_allclose(logprobs.token_logprobs[i], row[ids[i]], atol=2e-4)
        alternatives = logprobs.top_logprobs[i]
        top = dict(zip(ids_of(alternatives), alternatives.values(), strict=True))
        assert list(top) == list(np.argsort(-row)[:3])
        np.testing.assert_allclose(list(top.values()), np.sort(row)[::-1][:3], atol=2e-4)
        if i >= len(prompt_ids):  # Generated greedily: the argmax.
            assert ids[i] == int(np.argmax(row))
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.usage.completion_tokens == 6

    # max_tokens=0 with echo scores the prompt alone: the same numbers, nothing generated.
    scored = greedy(client, prompt_ids, max_tokens=0, echo=True, logprobs=0)
    assert scored.choices[0].text == tokenizer.decode(prompt_ids)
    assert scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs == pytest.approx(
        logprobs.token_logprobs[: len(prompt_ids)], abs=2e-4
    )


def test_chat_uses_the_tokenizer_template_and_reports_logprobs(client, loaded, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    response = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_completion_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"return_tokens_as_token_ids": True},
    )
    # The fixture's tokenizer_config.json template (server_fixtures.CHAT_TEMPLATE), by hand.
    text = "### system:\nBe brief.\n### user:\nHi\n### assistant:\n"
    prompt_ids = [tokenizer.bos_id, *tokenizer.encode(text)]
    assert response.usage.prompt_tokens == len(prompt_ids)
    (choice,) = response.choices
    assert choice.message.role == "assistant"
    content = choice.logprobs.content
    generated = ids_of([entry.token for entry in content])
    assert response.usage.completion_tokens == len(generated) == 5
    assert choice.finish_reason == "length"
    expected = model_log_softmax(loaded, prompt_ids + generated)
    for j, entry in enumerate(content):
        row = expected[len(prompt_ids) - 1 + j]
        assert generated[j] == int(np.argmax(row))
        np.testing.assert_allclose(entry.logprob, row[generated[j]], atol=2e-4)
        assert ids_of([t.token for t in entry.top_logprobs]) == list(np.argsort(-row)[:2])


def test_default_chat_template_is_chatml(engine, tokenizer):
    with serving(create_app(engine, model_name=MODEL)) as url:
        response = make_client(url).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1
        )
    text = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert response.usage.prompt_tokens == 1 + len(tokenizer.encode(text))


def test_tokenizer_endpoints_read_text_as_transformers_does(url, client, tokenizer, workdir):
    """vLLM's /tokenize, /detokenize, /tokenizer_info (lm-evaluation-harness's remote
    tokenizer): the ids transformers gives for the run's tokenizer directory, special-token
    spellings included, while a completions text prompt reads those as plain text."""
    import transformers  # Only this test needs it (a ~1.5 s import).

    theirs = transformers.AutoTokenizer.from_pretrained(f"{workdir}/tokenizer")
    info = httpx2.get(f"{url}/tokenizer_info").json()
    assert (info["bos_token"], info["eos_token"]) == (theirs.bos_token, theirs.eos_token)
    assert info["model_max_length"] == 128 and info["add_bos_token"] is True
    assert info["chat_template"] == read_chat_template(f"{workdir}/tokenizer")

    def tokenize(**body):
        response = httpx2.post(f"{url}/tokenize", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    for text in ("ROMEO: But soft", f"the end{tokenizer.eos_token}", ""):
        for add in (True, False):
            got = tokenize(prompt=text, add_special_tokens=add)
            assert got["tokens"] == theirs(text, add_special_tokens=add).input_ids, (text, add)
            assert got["count"] == len(got["tokens"]) and got["max_model_len"] == 128
    assert tokenize(prompt=tokenizer.eos_token, add_special_tokens=False)["tokens"] == [
        tokenizer.eos_id
    ]
    assert tokenize(prompt="ROMEO")["tokens"] == tokenizer.encode_prompt("ROMEO")
    spelled = greedy(client, tokenizer.eos_token, max_tokens=1).usage.prompt_tokens
    assert spelled == len(tokenizer.encode_prompt(tokenizer.eos_token)) > 2  # Plain text.
    strings = tokenize(prompt="ROMEO: hi", return_token_strs=True)
    assert strings["token_strs"] == theirs.convert_ids_to_tokens(strings["tokens"])
    assert tokenize(prompt="ROMEO: hi")["token_strs"] is None
    ids = strings["tokens"] + [tokenizer.eos_id]
    detokenized = httpx2.post(f"{url}/detokenize", json={"tokens": ids}).json()
    assert detokenized == {"prompt": theirs.decode(ids)}

    def error(path, body):
        response = httpx2.post(f"{url}{path}", json=body)
        return response.status_code, response.json()["error"]

    status, body = error("/detokenize", {"tokens": [tokenizer.vocab_size]})
    assert status == 400 and body["param"] == "tokens"
    status, body = error("/tokenize", {"prompt": 7})
    assert status == 400 and body["message"].startswith("'prompt' input should be a valid string")
    status, body = error("/tokenize", {"prompt": "Hi", "model": "other"})
    assert status == 404 and body["code"] == "model_not_found"


def test_streaming_equals_non_streaming(client):
    for prompt in ("JULIET:", "O Romeo, Romeo"):
        whole = greedy(client, prompt, max_tokens=16)
        stream = greedy(
            client, prompt, max_tokens=16, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
        usage = chunks[-1].usage  # The repeat may read its prompt from the prefix cache.
        assert chunks[-1].choices == [] and usage.prompt_tokens == whole.usage.prompt_tokens
        assert usage.completion_tokens == whole.usage.completion_tokens
        text = "".join(c.text for chunk in chunks[:-1] for c in chunk.choices)
        assert text == whole.choices[0].text
        assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason

    messages = [{"role": "user", "content": "Speak, fair one."}]
    whole = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_n_with_seed_is_distinct_and_reproducible(client):
    def texts(**kwargs):
        response = client.completions.create(
            model=MODEL, prompt="MERCUTIO:", max_tokens=8, temperature=1.0, **kwargs
        )
        assert [c.index for c in response.choices] == list(range(len(response.choices)))
        return [c.text for c in response.choices]

    first = texts(n=3, seed=7)
    assert len(set(first)) == 3
    assert texts(n=3, seed=7) == first
    assert texts(n=1, seed=8) == first[1:2]  # Choice i samples with seed + i.
    assert texts(n=2) != texts(n=2)  # No seed: fresh random seeds.

    streamed = ["", "", ""]
    for chunk in client.completions.create(
        model=MODEL, prompt="MERCUTIO:", max_tokens=8, temperature=1.0, n=3, seed=7, stream=True
    ):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == first


def test_several_prompts_and_token_prompts(client, tokenizer):
    prompts = ["ROMEO:", "JULIET: Ay me"]
    response = greedy(client, prompts, n=2, max_tokens=6)
    alone = [greedy(client, p, max_tokens=6).choices[0].text for p in prompts]
    assert [c.text for c in response.choices] == [alone[0], alone[0], alone[1], alone[1]]
    token_prompts = [tokenizer.encode_prompt(p) for p in prompts]
    by_ids = greedy(client, token_prompts, max_tokens=6)
    assert [c.text for c in by_ids.choices] == alone
    assert by_ids.usage.prompt_tokens == sum(len(p) for p in token_prompts)
    assert response.usage.prompt_tokens == by_ids.usage.prompt_tokens  # Each prompt once.
    assert response.usage.completion_tokens == 4 * 6


def test_usage_counts_are_exact(client, tokenizer):
    prompt = "Good night, good night! Parting is such sweet sorrow"
    response = greedy(client, prompt, max_tokens=7)
    usage = response.usage
    assert usage.prompt_tokens == 1 + len(tokenizer.encode(prompt))  # bos + the text
    assert usage.completion_tokens == 7 and response.choices[0].finish_reason == "length"
    assert usage.total_tokens == usage.prompt_tokens + 7
    # max_tokens may use exactly the room left (the slot is full at 128); past it, a 400.
    room = 128 - usage.prompt_tokens
    full = greedy(client, prompt, max_tokens=room, extra_body={"ignore_eos": True})
    assert full.usage.completion_tokens == room and full.choices[0].finish_reason == "length"
    error = _error(lambda: greedy(client, prompt, max_tokens=room + 1))
    assert error.status_code == 400 and error.body["param"] == "max_tokens"
    assert error.code == "context_length_exceeded" and str(room) in error.body["message"]


def test_stop_sequences(client):
    prompt = "What's in a name?"
    base = greedy(client, prompt, max_tokens=24).choices[0].text
    start = next(
        k
        for k in range(len(base) // 3, len(base) - 2)
        if base[k : k + 2].isprintable() and "\ufffd" not in base[k : k + 2]
    )
    stop = base[start : start + 2]
    expected = base[: base.find(stop)]
    for value in (stop, ["never-in-the-output", stop]):
        response = greedy(client, prompt, max_tokens=24, stop=value)
        assert response.choices[0].text == expected
        assert response.choices[0].finish_reason == "stop"
    chunks = greedy(client, prompt, max_tokens=24, stop=stop, stream=True)
    assert "".join(c.text for chunk in chunks for c in chunk.choices) == expected


def test_eos_stops_unless_ignore_eos(client, tokenizer):
    def sample(**kwargs):
        kwargs = {"temperature": 2.0, "max_tokens": 24, "logprobs": 0, **kwargs}
        extra = {"return_tokens_as_token_ids": True, **kwargs.pop("extra_body", {})}
        return client.completions.create(model=MODEL, prompt="Hi", extra_body=extra, **kwargs)

    # Hot sampling ends some texts at eos early; find a seed that does (reproducibly).
    for base in range(0, 600, 8):
        ended = [c for c in sample(n=8, seed=base).choices if c.finish_reason == "stop"]
        if ended:
            seed = base + ended[0].index
            break
    else:
        pytest.fail("no sample of 600 seeds drew the eos token")
    stopped = sample(seed=seed).choices[0]
    tokens = ids_of(stopped.logprobs.tokens)
    assert stopped.finish_reason == "stop" and tokens[-1] == tokenizer.eos_id
    ignored = sample(seed=seed, extra_body={"ignore_eos": True})
    assert ignored.choices[0].finish_reason == "length"
    assert ignored.usage.completion_tokens == 24
    assert ids_of(ignored.choices[0].logprobs.tokens)[: len(tokens)] == tokens  # eos inside


def test_sampling_parameters_are_honoured(client):
    prompt = "ROMEO: With love's light wings"
    plain = greedy(client, prompt, max_tokens=16).choices[0].text
    # Filters that keep only the most likely token make sampling greedy, whatever the seed.
    for kwargs in ({"extra_body": {"top_k": 1}}, {"top_p": 1e-6},
                   {"extra_body": {"min_p": 0.999999}}):  # fmt: skip
        sampled = greedy(client, prompt, max_tokens=16, temperature=1.0, seed=3, **kwargs)
        assert sampled.choices[0].text == plain, kwargs
    # Penalties change a repetitive greedy output; `user` and unknown fields are accepted.
    for kwargs in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0},
                   {"extra_body": {"repetition_penalty": 3.0}}):  # fmt: skip
        penalized = greedy(client, prompt, max_tokens=16, user="someone", **kwargs)
        assert penalized.choices[0].text != plain, kwargs
    extra = {"best_of": 1, "some_future_field": {"x": 1}}
    assert greedy(client, prompt, max_tokens=16, extra_body=extra).choices[0].text == plain


def test_prefix_cache_hits_are_reported(client, tokenizer):
    prompt = LONG_PROMPT + " Unique to the prefix-cache test."
    prompt_tokens = 1 + len(tokenizer.encode(prompt))
    first = greedy(client, prompt, max_tokens=4)
    second = greedy(client, prompt, max_tokens=4)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= prompt_tokens - 2 * CONFIG.prefix_block and cached % CONFIG.prefix_block == 0
    assert second.choices[0].text == first.choices[0].text


# ---- errors -----------------------------------------------------------------------------------


def _error(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as raised:
        call()
    error = raised.value
    assert set(error.body) == {"message", "type", "param", "code"}, error.body
    return error


def test_invalid_parameters_are_400_naming_the_field(client, url, engine):
    def completion(**kwargs):
        return lambda: client.completions.create(
            **{"model": MODEL, "prompt": "Hi", "max_tokens": 2, **kwargs}
        )

    cases = [
        (completion(temperature=-1), "temperature"),
        (completion(top_p=0), "top_p"),
        (completion(n=0), "n"),
        (completion(max_tokens=0), "max_tokens"),
        (completion(logprobs=CONFIG.num_top_logprobs + 1), "logprobs"),
        (completion(prompt={"not": "a prompt"}), "prompt"),
        (completion(prompt=[]), "prompt"),
        (completion(prompt=[1, 10**6]), "prompt"),
        (completion(stop=[""]), "stop"),
        (completion(seed=2**70), "seed"),
        (completion(n=CONFIG.max_waiting + 1), "n"),
        (completion(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
        (lambda: client.chat.completions.create(model=MODEL, messages=[]), "messages"),
        (
            lambda: client.chat.completions.create(
                model=MODEL, messages=[{"role": "wizard", "content": "Hi"}]
            ),
            "messages",
        ),
        (
            lambda: client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            ),
            "messages",
        ),
        (
            lambda: client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}], top_logprobs=2
            ),
            "top_logprobs",
        ),
    ]
    for call, param in cases:
        error = _error(call)
        assert error.status_code == 400 and error.body["param"] == param, error.body
        assert error.body["type"] == "invalid_request_error"
        assert param in error.body["message"], error.body
    # Not JSON at all.
    response = httpx2.post(f"{url}/v1/completions", content=b"{nope", timeout=30)
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    # A prompt longer than the context.
    error = _error(completion(prompt=[1] * engine.max_len))
    assert error.status_code == 400 and error.code == "context_length_exceeded"
    assert str(engine.max_len) in error.body["message"]
    # Unknown model and unknown path: 404.
    error = _error(completion(model="gpt-5"))
    assert error.status_code == 404 and error.code == "model_not_found"
    response = httpx2.get(f"{url}/v2/nothing")
    assert response.status_code == 404 and "/v1" in response.json()["error"]["message"]
    # The server keeps serving.
    assert greedy(client, "Hi", max_tokens=2).choices[0].finish_reason == "length"


def test_request_too_large_is_413(engine):
    with serving(create_app(engine, model_name=MODEL, max_request_bytes=4096)) as url:
        client = make_client(url)
        error = _error(lambda: greedy(client, "x" * 5000))
        assert error.status_code == 413 and error.code == "request_too_large"
        assert greedy(client, "x" * 100, max_tokens=1).usage.completion_tokens == 1


def test_api_keys(engine):
    with serving(create_app(engine, model_name=MODEL, api_keys=("alpha", "beta"))) as url:
        error = _error(lambda: make_client(url, "wrong").models.list())
        assert error.status_code == 401 and error.code == "invalid_api_key"
        response = httpx2.post(f"{url}/v1/completions", json={"prompt": "Hi"})
        assert (
            response.status_code == 401 and "Authorization" in response.json()["error"]["message"]
        )
        assert httpx2.get(f"{url}/metrics").status_code == 401
        assert httpx2.post(f"{url}/tokenize", json={"prompt": "Hi"}).status_code == 401
        assert httpx2.get(f"{url}/health").status_code == 200  # Probes need no key.
        assert httpx2.get(f"{url}/ready").status_code == 200
        for key in ("alpha", "beta"):
            assert greedy(make_client(url, key), "Hi", max_tokens=1).usage.completion_tokens == 1


def test_per_key_rate_limits(engine):
    app = create_app(engine, model_name=MODEL, api_keys=("alpha", "beta"), rate_limit_rpm=2)
    with serving(app) as url:
        alpha = make_client(url, "alpha")
        greedy(alpha, "Hi", max_tokens=1)
        greedy(alpha, "Hi", max_tokens=1)
        error = _error(lambda: greedy(alpha, "Hi", max_tokens=1))
        assert error.status_code == 429 and error.code == "rate_limit_exceeded"
        assert int(error.response.headers["retry-after"]) >= 1
        assert "2 requests per minute" in error.body["message"]
        greedy(make_client(url, "beta"), "Hi", max_tokens=1)  # Another key has its own budget.

    # Tokens: a request reserves prompt + max_tokens, settled to what it used.
    request_tokens = 1 + len(engine.tokenizer.encode("Hi")) + 10
    limit = 2 * request_tokens + 5
    with serving(create_app(engine, model_name=MODEL, rate_limit_tpm=limit)) as url:
        client = make_client(url)
        for _ in range(2):
            response = greedy(client, "Hi", max_tokens=10, extra_body={"ignore_eos": True})
            assert response.usage.total_tokens == request_tokens
        error = _error(lambda: greedy(client, "Hi", max_tokens=10))
        assert error.status_code == 429 and f"{limit} tokens per minute" in error.body["message"]
        error = _error(lambda: greedy(client, "Hi", max_tokens=limit))
        assert error.status_code == 429 and "lower max_tokens" in error.body["message"]


def test_not_ready_is_503_until_warm(loaded, engine):
    cold = Engine(
        loaded.model_config, loaded.graphdef, loaded.params, loaded.tokenizer, CONFIG
    )  # Never started: it never compiles.
    with serving(create_app(cold, model_name=MODEL)) as url:
        assert httpx2.get(f"{url}/health").status_code == 200
        response = httpx2.get(f"{url}/ready")
        assert response.status_code == 503 and response.json()["error"]["code"] == "not_ready"
        error = _error(lambda: greedy(make_client(url), "Hi"))
        assert error.status_code == 503 and "GET /ready" in error.body["message"]


def test_a_full_queue_is_429_and_disconnects_free_the_slot(long_engine):
    long = {"model": MODEL, "prompt": "Hi", "max_tokens": 2000, "ignore_eos": True}
    aborted = abort_count(long_engine)
    with serving(create_app(long_engine, model_name=MODEL)) as url:
        client = make_client(url)
        with (
            httpx2.Client(timeout=60) as http,
            http.stream("POST", f"{url}/v1/completions", json={**long, "stream": True}) as stream,
        ):
            assert stream.status_code == 200
            lines = stream.iter_lines()  # Kept: a closed iterator closes the connection.
            assert next(lines).startswith("data: {")
            wait_for(long_engine, running=1, waiting=0)  # The streaming request decodes...
            queued = open_request(url, long)
            wait_for(long_engine, running=1, waiting=1)  # ...another one waits: queue full.
            error = _error(lambda: greedy(client, "Hi", max_tokens=1))
            assert error.status_code == 429 and error.code == "queue_full"
            assert int(error.response.headers["retry-after"]) >= 1
            queued.close()  # A waiting request whose client leaves is dropped from the queue.
            wait_for(long_engine, running=1, waiting=0)
        # The streaming client left mid-stream: its slot is free.
        assert wait_for(long_engine, running=0, waiting=0)["free_slots"] == 1
        assert abort_count(long_engine) == aborted + 2

        # A running non-streaming request whose client leaves frees its slot too.
        running = open_request(url, long)
        wait_for(long_engine, running=1, waiting=0)
        running.close()
        assert wait_for(long_engine, running=0, waiting=0)["free_slots"] == 1
        assert abort_count(long_engine) == aborted + 3
        assert greedy(client, "Hi", max_tokens=3).usage.completion_tokens == 3


def test_prompts_are_not_logged_unless_asked(engine, client, caplog):
    with caplog.at_level("INFO", logger="cirrus.serve"):
        greedy(client, "a private prompt", max_tokens=2)
        assert "completion tokens" in caplog.text and "private" not in caplog.text
        with serving(create_app(engine, model_name=MODEL, log_prompts=True)) as url:
            greedy(make_client(url), "a logged prompt", max_tokens=2)
        assert "a logged prompt" in caplog.text


def test_chat_template_errors_are_400(engine):
    template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with serving(create_app(engine, model_name=MODEL, chat_template=template)) as url:
        error = _error(
            lambda: make_client(url).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}]
            )
        )
    assert error.status_code == 400 and error.body["param"] == "messages"
    assert "roles must alternate" in error.body["message"]


# ---- fuzzing ----------------------------------------------------------------------------------


def test_fuzzed_requests_never_get_5xx(url, engine):
    """Schemathesis cases from /openapi.json, valid and invalid, for both POST endpoints.

    (Through `as_strategy`: schemathesis.pytest.from_fixture fails under pytest 9.)
    """
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    posts = [op for op in operations if op.method.upper() == "POST"]
    assert {op.path for op in posts} == {
        "/v1/completions",
        "/v1/chat/completions",
        "/tokenize",
        "/detokenize",
    }
    for operation in posts:
        cases = strategies.one_of(
            operation.as_strategy(schemathesis.GenerationMode.POSITIVE),
            operation.as_strategy(schemathesis.GenerationMode.NEGATIVE),
        )

        @settings(
            max_examples=25,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=cases)
        def check(case):
            response = case.call(timeout=60)
            assert response.status_code < 500, (case.body, response.text[:500])
            if response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        check()
    wait_for(engine, running=0, waiting=0)
    assert greedy(make_client(url), "Hi", max_tokens=2).usage.completion_tokens == 2


# ---- launch.serve -----------------------------------------------------------------------------


def test_launch_serve_a_run_tensor_parallel(workdir, tmp_path, client):
    keys = tmp_path / "keys.txt"
    keys.write_text("# serving keys\nfile-key\n")
    server = server_fixtures.start_server(
        [
            f"--workdir={workdir}",
            f"--api_keys_file={keys}",
            "--model_name=tiny-run",
            "--gin_bindings=serve.num_slots=2",
            "--gin_bindings=serve.max_len=64",
            "--mesh_shape=1,1,2",  # Tensor-parallel over two of the eight CPU devices.
        ],
        env={"CIRRUS_API_KEYS": "env-key"},
    )
    try:
        assert server_fixtures.http_status(f"{server.url}/health") == 200
        assert server_fixtures.http_status(f"{server.url}/v1/models") == 401
        run_client = make_client(server.url, "file-key")
        (card,) = run_client.models.list().data
        assert card.id == "tiny-run" and card.model_extra["max_model_len"] == 64
        response = make_client(server.url, "env-key").chat.completions.create(
            model="tiny-run",
            messages=[{"role": "user", "content": "a secret prompt"}],
            max_tokens=3,
            temperature=0,
        )
        assert response.usage.completion_tokens == 3
        # Split over two devices, the model decodes as the one-device engine does.
        sharded = greedy(run_client, "ROMEO:", model="tiny-run")
        assert sharded.choices[0].text == greedy(client, "ROMEO:").choices[0].text
        # SIGTERM mid-stream: the stream still completes, then the process exits 0.
        stream = run_client.completions.create(
            model="tiny-run",
            prompt="Hi",
            max_tokens=50,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        reasons = []
        for i, chunk in enumerate(stream):
            if i == 0:
                server.process.send_signal(signal.SIGTERM)
            reasons += [c.finish_reason for c in chunk.choices if c.finish_reason]
        assert reasons == ["length"]
        assert server_fixtures.stop_server(server) == 0
    finally:
        server_fixtures.stop_server(server)
    log = server.log()
    assert "a secret prompt" not in log and "shutting down" in log
    assert not re.search(r"Traceback", log), log


def test_launch_serve_a_hugging_face_directory(workdir, loaded, tokenizer, tmp_path):
    hf_dir = tmp_path / "tiny-hf"
    save_hf(str(hf_dir), loaded.model_config, loaded.params, tokenizer_dir=f"{workdir}/tokenizer")
    server = server_fixtures.start_server(
        [f"--from_hf={hf_dir}", "--gin_bindings=serve.max_len=64"]
    )
    try:
        client = make_client(server.url)
        assert [m.id for m in client.models.list().data] == ["tiny-hf"]  # The directory's name.
        messages = [{"role": "user", "content": "Hi"}]
        via_hf = client.chat.completions.create(
            model="tiny-hf", messages=messages, max_tokens=4, temperature=0
        )
        # The chat template came along in tokenizer_config.json.
        text = "### user:\nHi\n### assistant:\n"
        assert via_hf.usage.prompt_tokens == 1 + len(tokenizer.encode(text))
    finally:
        assert server_fixtures.stop_server(server) == 0
