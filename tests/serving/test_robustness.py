"""Nothing a client sends can stop, wedge or starve the server.

Every case runs against a live server (the real app on uvicorn, or `launch.serve` itself) and
is followed by a normal request that must still succeed. Engine faults (a request whose
activation raises, decode calls that raise or hang) are injected by wrapping the Sampler's
methods of a real engine; `launch.serve`'s exit on a hung engine runs the real entry point
under tests/serving/fault_serve.py.
"""

import contextlib
import re
import signal
import threading
import time

import httpx2
import openai
import pytest

from research.checkpoint import load_model
from research.serving.core.sampling import SamplingParams
from research.serving.engine import Engine, EngineConfig, QueueFull
from research.serving.http.server import create_app
from tests.serving import server_fixtures

MODEL = "tiny"
CONFIG = EngineConfig(
    max_len=128,
    num_slots=2,
    steps_per_call=2,
    prefill_chunk=64,
    max_waiting=8,
    prefix_cache_mb=4,
    prefix_block=8,
    num_top_logprobs=3,
    watchdog_s=0,
)
MARKER = [5, 5, 5, 5, 5]  # A token-id prompt the fault injection recognizes.


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    workdir = server_fixtures.write_tiny_workdir(tmp_path_factory.mktemp("robust") / "run")
    return load_model(workdir, log=lambda _: None)


@contextlib.contextmanager
def running_engine(loaded, config=CONFIG):
    engine = Engine(loaded.model_config, loaded.graphdef, loaded.params, loaded.tokenizer, config)
    engine.start()
    assert engine.wait_ready(300), engine.error
    try:
        yield engine
    finally:
        engine.shutdown(drain_timeout_s=5)


@pytest.fixture(scope="module")
def engine(loaded):
    with running_engine(loaded) as engine:
        yield engine


@pytest.fixture(scope="module")
def url(engine):
    with server_fixtures.serving(create_app(engine, model_name=MODEL)) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return server_fixtures.make_client(url)


def normal(client) -> None:
    """A plain request that must succeed after every bad one."""
    response = client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
    )
    assert response.usage.completion_tokens == 3


def needs_decode(client, model: str = MODEL, max_tokens: int = 4):
    """A request that must reach a decode call: greedy, and its first token (sampled at
    prefill) cannot end it, as a sampled eos from the random model would."""
    return client.completions.create(
        model=model,
        prompt="Hi",
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True},
    )


def post(url: str, body: dict, path: str = "/v1/completions"):
    return httpx2.post(f"{url}{path}", json=body, timeout=60)


def post_raw(url: str, text: str, path: str = "/v1/completions"):
    """A body sent as written (JSON escapes such as a lone surrogate pass through)."""
    headers = {"Content-Type": "application/json"}
    return httpx2.post(f"{url}{path}", content=text.encode(), headers=headers, timeout=60)


def error_of(response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


# ---- validation at the edge -------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"top_k": 2**31}, "top_k"),  # Crashed the engine for every later request once.
        ({"top_k": -2}, "top_k"),
        ({"temperature": 1e39}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 1e-46}, "repetition_penalty"),
        ({"repetition_penalty": 1e9}, "repetition_penalty"),
        ({"min_p": 1.0}, "min_p"),
        ({"max_tokens": 100_000}, "max_tokens"),  # Past the 128-token context: 400.
        ({"max_tokens": 2**40}, "max_tokens"),
        ({"n": 10**6}, "n"),
        ({"n": 9}, "n"),  # More than the queue could ever hold at once.
        ({"seed": 2**70}, "seed"),
        ({"logprobs": 21}, "logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # Without stream.
        ({"stop": ["x"] * 17}, "stop"),  # Says the bound, not "must be a list of strings".
        ({"stop": "y" * 257}, "stop"),
        ({"stop": ["y" * 257]}, "stop"),
        ({"prompt": [1, 2**40]}, "prompt"),
        ({"prompt": [1, 10**6]}, "prompt"),
        ({"prompt": ["Hi"] * 257}, "prompt"),
        ({"prompt": [[1, 2]] * 257}, "prompt"),
        ({"user": 5}, "user"),
    ],
)
def test_out_of_range_fields_are_400_naming_them(url, client, fields, param):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, **fields}
    error = error_of(post(url, body))
    assert error["param"] == param and param in error["message"], error
    assert error["type"] == "invalid_request_error"
    if param in ("stop", "prompt") and not isinstance(fields[param][-1], int):
        # A union field with a value of the right kind past a bound: the message says which.
        assert re.search(r"at most (16|256) (items|characters)", error["message"]), error
    normal(client)


def test_top_k_past_the_vocabulary_keeps_every_token(url, client):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "top_k": 2**31 - 1, "seed": 1}
    assert post(url, body).status_code == 200
    normal(client)


@pytest.mark.parametrize(
    "path, text, param",
    [
        ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
        ("/v1/completions", '{"prompt": ["ok", "\\udfff"], "max_tokens": 2}', "prompt"),
        ("/v1/completions", '{"prompt": "Hi", "stop": ["\\ud800"], "max_tokens": 2}', "stop"),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "\\ud83d"}], "max_tokens": 2}',
            "messages",
        ),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
            "messages",
        ),
    ],
)
def test_lone_surrogates_are_400_not_500(url, client, path, text, param):
    error = error_of(post_raw(url, text, path))
    assert error["param"] == param and "UTF-8" in error["message"], error
    normal(client)


def test_chat_max_tokens_past_the_context_is_400(url, client):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
    error = error_of(post(url, {**body, "max_completion_tokens": 100_000}, "/v1/chat/completions"))
    assert error["param"] == "max_completion_tokens"
    error = error_of(post(url, {**body, "max_tokens": 100_000}, "/v1/chat/completions"))
    assert error["param"] == "max_tokens" and error["code"] == "context_length_exceeded"
    # Without max_tokens, the answer may use all the room left.
    response = post(url, {**body, "temperature": 0}, "/v1/chat/completions")
    assert response.status_code == 200
    normal(client)


# ---- tenants: API keys ------------------------------------------------------------------------


def test_the_prefix_cache_is_per_api_key(engine):
    app = create_app(engine, model_name=MODEL, api_keys=("key-a", "key-b"))
    prompt = list(range(10, 60))  # 50 tokens: six full blocks of 8.
    with server_fixtures.serving(app) as url:
        a = server_fixtures.make_client(url, "key-a")
        b = server_fixtures.make_client(url, "key-b")

        def cached(client):
            response = client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=1, temperature=0
            )
            return response.usage.prompt_tokens_details.cached_tokens

        assert cached(a) == 0
        assert cached(a) == 48  # Key a's own blocks.
        assert cached(b) == 0  # Key b never learns that key a sent this prompt.
        assert cached(b) == 48
        normal(a)


def test_one_owner_holds_at_most_its_share_of_the_queue(loaded):
    """max_waiting 4, share 0.5: an owner may queue 2; a third is QueueFull, another owner
    still gets in; requests without an owner are limited by max_waiting only."""
    config = EngineConfig(num_slots=1, max_waiting=4, max_waiting_share=0.5)
    engine = Engine(loaded.model_config, loaded.graphdef, loaded.params, loaded.tokenizer, config)
    request = SamplingParams(max_new_tokens=2, temperature=0.0)
    outputs = []
    for _ in range(2):  # Not started: nothing drains the queue.
        engine.submit([1, 2], request, outputs.append, owner="a")
    with pytest.raises(QueueFull, match="share"):
        engine.submit([1, 2], request, outputs.append, owner="a")
    engine.submit([1, 2], request, outputs.append, owner="b")
    engine.submit([1, 2], request, outputs.append)
    with pytest.raises(QueueFull, match="max_waiting=4"):
        engine.submit([1, 2], request, outputs.append, owner="c")
    engine.start()
    engine.shutdown(drain_timeout_s=60)
    assert [o.finish_reason for o in outputs if o.finish_reason] == ["length"] * 4


def test_n_past_a_keys_share_of_the_queue_is_400(engine):
    app = create_app(engine, model_name=MODEL, api_keys=("key-a",))
    with server_fixtures.serving(app) as url:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "n": 5}  # Share: 4 of 8.
        response = httpx2.post(
            f"{url}/v1/completions",
            json=body,
            headers={"Authorization": "Bearer key-a"},
            timeout=60,
        )
        assert error_of(response)["param"] == "n"
        normal(server_fixtures.make_client(url, "key-a"))


# ---- faults inside the engine -----------------------------------------------------------------


def test_an_error_on_one_request_fails_that_request_alone(loaded):
    with (
        running_engine(loaded) as engine,
        server_fixtures.serving(create_app(engine, model_name=MODEL)) as url,
    ):
        activate = engine.sampler.activate

        def faulty(state, slot, prompt_ids, request):
            if list(prompt_ids) == MARKER:
                raise RuntimeError("injected fault")
            return activate(state, slot, prompt_ids, request)

        engine.sampler.activate = faulty
        client = server_fixtures.make_client(url)
        with pytest.raises(openai.InternalServerError) as raised:
            client.completions.create(model=MODEL, prompt=MARKER, max_tokens=4)
        assert raised.value.status_code == 500
        assert "injected fault" in raised.value.body["message"]
        # Streaming: the headers are out, so the error arrives as an event the client raises.
        stream = client.completions.create(model=MODEL, prompt=MARKER, max_tokens=4, stream=True)
        with pytest.raises(openai.APIError, match="injected fault"):
            list(stream)
        # Others running at the same time, and the next ones, are served.
        normal(client)
        assert engine.alive and server_fixtures.http_status(f"{url}/health") == 200


def test_an_engine_that_dies_says_so_and_fails_in_flight_requests(loaded):
    with (
        running_engine(loaded) as engine,
        server_fixtures.serving(create_app(engine, model_name=MODEL)) as url,
    ):
        client = server_fixtures.make_client(url)
        normal(client)

        def broken(state, **kwargs):
            raise RuntimeError("the device is gone")

        engine.sampler.generate = broken
        statuses = []
        for _ in range(3):  # Three decode calls fail in a row: the engine gives up.
            with pytest.raises(openai.APIStatusError) as raised:
                needs_decode(client)
            statuses.append(raised.value.status_code)
        assert statuses[:2] == [500, 500] and statuses[2] in (500, 503)
        assert engine.wait_failed(30) and not engine.alive
        assert server_fixtures.http_status(f"{url}/health") == 503
        assert server_fixtures.http_status(f"{url}/ready") == 503
        with pytest.raises(openai.APIStatusError) as raised:
            needs_decode(client)
        assert raised.value.status_code == 503


def test_a_hung_decode_trips_the_watchdog(loaded):
    config = EngineConfig(**{**vars(CONFIG), "watchdog_s": 1.0})
    release = threading.Event()
    with (
        running_engine(loaded, config) as engine,
        server_fixtures.serving(create_app(engine, model_name=MODEL)) as url,
    ):
        generate = engine.sampler.generate

        def hung(state, **kwargs):
            release.wait(60)
            return generate(state, **kwargs)

        engine.sampler.generate = hung
        client = server_fixtures.make_client(url)
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as raised:
            needs_decode(client)
        assert raised.value.status_code == 503 and "stuck" in raised.value.body["message"]
        assert time.monotonic() - started < 30
        assert server_fixtures.http_status(f"{url}/health") == 503
        release.set()


def test_sigterm_past_the_drain_gives_the_running_request_a_503_and_exits_0(loaded, tmp_path):
    """A request still running when --drain_timeout_s runs out gets OpenAI's error object
    with 503 (retry elsewhere), not uvicorn's bare 500 nor 200 with finish_reason "abort"."""
    workdir = server_fixtures.write_tiny_workdir(tmp_path / "run")
    server = server_fixtures.start_server(
        ["--workdir", workdir, "--drain_timeout_s=3", "--gin_bindings", "serve.num_slots=2"],
        module="tests.serving.fault_serve",
        env={"CIRRUS_FAULT": "slow"},
    )
    try:
        client = server_fixtures.make_client(server.url)
        result = {}

        def long_request():
            try:  # ~60 decode calls of 0.5 s: far past the drain.
                needs_decode(client, model="run", max_tokens=120)
            except openai.APIStatusError as error:
                result["error"] = error

        thread = threading.Thread(target=long_request)
        thread.start()
        time.sleep(2)
        server.process.send_signal(signal.SIGTERM)
        thread.join(60)
        assert not thread.is_alive()
        error = result["error"]
        assert error.status_code == 503 and "shut down" in error.body["message"], error.body
        assert server.process.wait(60) == 0
    finally:
        server_fixtures.stop_server(server)


def test_launch_serve_exits_non_zero_when_its_engine_hangs(loaded, tmp_path):
    workdir = server_fixtures.write_tiny_workdir(tmp_path / "run")
    server = server_fixtures.start_server(
        [
            "--workdir",
            workdir,
            "--gin_bindings",
            "serve.watchdog_s=2",
            "--gin_bindings",
            "serve.num_slots=2",
        ],
        module="tests.serving.fault_serve",
        env={"CIRRUS_FAULT": "hang"},
    )
    try:
        client = server_fixtures.make_client(server.url)
        with pytest.raises(openai.APIStatusError) as raised:
            needs_decode(client, model="run")
        assert raised.value.status_code == 503
        assert server.process.wait(60) == 3
    finally:
        server_fixtures.stop_server(server)
    assert "exiting with code 3" in server.log()
