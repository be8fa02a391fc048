"""The engine: chunked prefill and prefix reuse are exact, batching never changes a request."""

import threading

import jax
import numpy as np
import pytest

from research.errors import UserError
from research.serving import Sampler, SamplingParams, complete, generate_reference
from research.serving.engine import Engine, EngineClosed, EngineConfig, QueueFull
from research.serving.engine.prefix_cache import PrefixCache
from tests.evaluation.helpers import CharTokenizer
from tests.serving.helpers import LLAMA, full_logits, random_split

CONFIG = LLAMA.replace(max_seq_len=64)
LONG = [1, *range(3, 30), *range(5, 20)]  # 43 tokens: several blocks of 8.


@pytest.fixture(scope="module")
def model():
    return random_split(CONFIG)


@pytest.fixture(scope="module")
def engine(model):
    config = EngineConfig(
        num_slots=3, steps_per_call=3, prefill_chunk=16, prefix_block=8, num_top_logprobs=3
    )
    engine = Engine(CONFIG, *model, CharTokenizer(), config)
    engine.start()
    assert engine.wait_ready(120)
    yield engine
    engine.shutdown()


def run(engine, prompts, requests, start=False, **kwargs):
    """Submits every request at once (then starts the engine, if asked, so that they all
    wait together); returns per request its outputs."""
    results = []
    for prompt, request in zip(prompts, requests, strict=True):
        outputs, done = [], threading.Event()

        def on_output(output, outputs=outputs, done=done):
            outputs.append(output)
            if output.finish_reason is not None:
                done.set()

        engine.submit(prompt, request, on_output, **kwargs)
        results.append((outputs, done))
    if start:
        engine.start()
    for _, done in results:
        assert done.wait(60)
    return [outputs for outputs, _ in results]


def tokens_of(outputs):
    return [t for o in outputs for t in o.token_ids]


def test_chunked_extend_equals_the_full_forward(model):
    graphdef, params = model
    sampler = Sampler(CONFIG, graphdef, params, num_slots=2, steps_per_call=8)
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    state = sampler.init_state()
    for start in range(0, len(LONG), 10):  # Chunks of 10 into slot 1, padded to 16.
        state, _ = sampler.extend(state, [(1, LONG[start : start + 10], start)])
    np.testing.assert_allclose(
        state.logits[1], full_logits(graphdef, params, [LONG])[0, -1], atol=1e-4
    )
    state, first = sampler.activate(state, 1, LONG, greedy)  # Chooses the first token.
    state, steps = sampler.generate(state)  # Feeds it, then chooses the next 7.
    expected = generate_reference(
        graphdef, params, LONG, max_new_tokens=8, max_seq_len=CONFIG.max_seq_len
    )
    assert int(first.tokens[0, 0]) == expected[0] and bool(first.live[0])
    assert [int(t) for t in steps.tokens[1] if t >= 0] == expected[1:]
    assert int(steps.tokens[1, 0]) == -1  # The step that fed the pending token chose none.
    assert not bool(steps.live[1])  # max_new_tokens reached.
    assert not bool(steps.live[0])  # The other slot never started.


def test_extend_of_several_rows_equals_one_extend_per_slot(model):
    """Three prompts in one padded call (one after an earlier chunk of its own) leave every
    slot's cache (up to its length) and logits as one extend each would; slot 4 untouched."""
    graphdef, params = model
    sampler = Sampler(CONFIG, graphdef, params, num_slots=5)
    rows = [(3, LONG[:10], 0), (0, [1, 7, 9], 0), (2, LONG[10:30], 10)]
    single = sampler.extend(sampler.init_state(), [(2, LONG[:10], 0)])[0]
    batched = sampler.extend(sampler.init_state(), [(2, LONG[:10], 0)])[0]
    for slot, tokens, start in rows:
        single, _ = sampler.extend(single, [(slot, tokens, start)])
    batched, _ = sampler.extend(batched, rows, num_rows=4)
    lengths = {0: 3, 2: 30, 3: 10}  # Past them: padding's keys, never attended to.
    for a, b in zip(jax.tree.leaves(single.cache), jax.tree.leaves(batched.cache), strict=True):
        for slot, length in lengths.items():
            np.testing.assert_allclose(a[slot, :, :length], b[slot, :, :length], atol=1e-5)
    np.testing.assert_allclose(single.logits, batched.logits, atol=1e-4)
    np.testing.assert_allclose(
        batched.logits[2], full_logits(graphdef, params, [LONG[:30]])[0, -1], atol=1e-4
    )
    assert not np.any(np.asarray(batched.cache.keys[0][0][4]))
    with pytest.raises(UserError, match="extend"):
        sampler.extend(batched, [(1, [5], 0), (1, [6], 0)])


def test_batched_requests_equal_each_request_alone(engine, model):
    prompts = [LONG, [1, 7, 9], [1, 4], LONG[:20], [1, 3, 3, 3, 3]]
    requests = [
        SamplingParams(max_new_tokens=10, temperature=0.0),
        SamplingParams(max_new_tokens=12, temperature=1.2, top_p=0.9, seed=3),
        SamplingParams(max_new_tokens=5, temperature=0.8, top_k=5, seed=4),
        SamplingParams(max_new_tokens=7, temperature=1.0, frequency_penalty=0.5, seed=5),
        SamplingParams(max_new_tokens=9, temperature=0.0, presence_penalty=1.0),
    ]
    outputs = run(engine, prompts, requests)  # 5 requests on 3 slots: some wait.
    alone = complete(Sampler(CONFIG, *model, num_slots=1), prompts, requests)
    for got, want in zip(outputs, alone, strict=True):
        assert tokens_of(got) == want.token_ids
        assert got[-1].finish_reason == "length"
        assert got[-1].completion_tokens == len(want.token_ids)
        assert "".join(o.text for o in got) == CharTokenizer().decode(want.token_ids)


def test_stop_strings_and_tokens(engine, model):
    greedy = SamplingParams(max_new_tokens=20, temperature=0.0)
    (plain,) = run(engine, [LONG], [greedy])
    text = "".join(o.text for o in plain)
    stop = text[5:7]
    (cut,) = run(
        engine, [LONG], [SamplingParams(max_new_tokens=20, temperature=0.0, stop_strings=(stop,))]
    )
    assert "".join(o.text for o in cut) == text[: text.index(stop)]
    assert cut[-1].finish_reason == "stop"
    token = tokens_of(plain)[3]
    stop_at_token = SamplingParams(max_new_tokens=20, temperature=0.0, stop_token_ids=(token,))
    (ended,) = run(engine, [LONG], [stop_at_token])
    first = tokens_of(plain).index(token)
    assert tokens_of(ended) == tokens_of(plain)[: first + 1]
    assert ended[-1].finish_reason == "stop"


def test_prefix_cache_reuses_blocks_exactly(engine):
    system = [1, *range(10, 34)]  # 25 tokens: three full blocks of 8.
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    (first,) = run(engine, [system + [5, 6]], [greedy])
    (second,) = run(engine, [system + [7]], [greedy])
    (again,) = run(engine, [system + [5, 6]], [greedy])
    assert second[-1].cached_tokens == 24  # Blocks are shared by prefix, not whole prompts.
    assert again[-1].cached_tokens == 24
    assert tokens_of(again) == tokens_of(first)
    model_alone = Sampler(CONFIG, engine.sampler.graphdef, engine.sampler.params, num_slots=1)
    (want,) = complete(model_alone, [system + [7]], greedy)
    assert tokens_of(second) == want.token_ids
    assert engine.stats()["prefix_cache_hit_rate"] > 0


def test_prompt_logprobs_are_the_full_forward_log_softmax(engine, model):
    prompt = LONG[:30]
    (outputs,) = run(
        engine, [prompt], [SamplingParams(max_new_tokens=2, temperature=0.0)], prompt_logprobs=2
    )
    logits_tv = full_logits(*model, [prompt])[0]
    log_softmax_tv = np.asarray(logits_tv - jax.nn.logsumexp(logits_tv, axis=-1, keepdims=True))
    first = outputs[0]
    assert first.prompt_logprobs[0] is None
    for t in range(1, len(prompt)):
        np.testing.assert_allclose(
            first.prompt_logprobs[t], log_softmax_tv[t - 1, prompt[t]], atol=1e-4
        )
        assert [i for i, _ in first.prompt_top_logprobs[t]] == list(
            np.argsort(-log_softmax_tv[t - 1])[:2]
        )


def test_cancel_frees_the_slot(engine):
    outputs, done = [], threading.Event()

    def on_output(output):
        outputs.append(output)
        if output.finish_reason is not None:
            done.set()

    long = SamplingParams(max_new_tokens=60, temperature=0.0, stop_token_ids=())
    request_id = engine.submit([1, 5], long, on_output)
    engine.cancel(request_id)
    assert done.wait(30)
    assert outputs[-1].finish_reason == "abort"
    assert engine.stats()["running"] == 0


def test_bad_requests_are_named(engine):
    def ignore(_):
        pass

    with pytest.raises(UserError, match="empty"):
        engine.submit([], SamplingParams(), ignore)
    with pytest.raises(UserError, match="context of 64"):
        engine.submit([1] * 64, SamplingParams(), ignore)
    with pytest.raises(UserError, match="top_p"):
        engine.submit([1], SamplingParams(top_p=0.0), ignore)
    with pytest.raises(UserError, match="prompt_logprobs"):
        engine.submit([1], SamplingParams(), ignore, prompt_logprobs=9)


def test_queue_full_and_shutdown(model):
    engine = Engine(CONFIG, *model, CharTokenizer(), EngineConfig(num_slots=1, max_waiting=2))
    outputs = []
    for _ in range(2):  # Not started: nothing drains the queue.
        engine.submit([1, 2], SamplingParams(max_new_tokens=3, temperature=0.0), outputs.append)
    with pytest.raises(QueueFull) as error:
        engine.submit([1, 2], SamplingParams(), outputs.append)
    assert error.value.retry_after_s > 0
    engine.start()
    engine.shutdown(drain_timeout_s=60)  # Drains: both accepted requests finish.
    assert [o.finish_reason for o in outputs if o.finish_reason] == ["length", "length"]
    with pytest.raises(EngineClosed):
        engine.submit([1, 2], SamplingParams(), outputs.append)


def test_prefix_cache_evicts_least_recently_used_leaves_first():
    block_bytes = PrefixCache(CONFIG, 64, 1e9, block=4).block_bytes
    cache = PrefixCache(CONFIG, 64, 3 * block_bytes, block=4)
    assert cache.num_blocks == 3
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9]  # Two full blocks.
    assert [n for n, _ in cache.plan_store(a)] == [0, 1]
    assert len(cache.match(a)) == 2
    b = [9, 9, 9, 9, 8, 8, 8, 8, 7]
    copies = cache.plan_store(b)  # Needs two blocks, one is free: evicts a's leaf.
    assert [n for n, _ in copies] == [0, 1]
    assert len(cache.match(a)) == 1  # a's root survived.
    assert len(cache.match(b)) == 2


@pytest.mark.parametrize("prompt_len", [40, 300, 1100])
def test_prefix_cache_store_then_load_copies_rows_across_segments(prompt_len):
    """A store reads only the cache segments holding the prompt's blocks (1, 2 or all 3 of
    max_len 1,100: ends 256, 1,024, 1,100); loading the blocks into another slot gives that
    slot the same rows, and leaves every other row as it was."""
    from research.serving.core import kv_cache

    config = CONFIG.replace(max_seq_len=1100)
    pool = PrefixCache(config, 1100, 1e9, block=16)
    rng = np.random.default_rng(prompt_len)
    cache = jax.tree.map(
        lambda a: rng.standard_normal(a.shape).astype(a.dtype),
        kv_cache.init_cache(config, 2, 1100),
    )
    prompt = [int(t) for t in rng.integers(1, 200, prompt_len)]
    copies = pool.plan_store(prompt)
    assert len(copies) == prompt_len // 16
    pool.store(cache, 1, copies)
    chain = pool.match(prompt + [7])
    assert len(chain) == prompt_len // 16
    loaded = pool.load(jax.tree.map(np.copy, cache), 0, chain)
    n = len(chain) * 16
    for got, want in zip(loaded.keys + loaded.values, cache.keys + cache.values, strict=True):
        got_row = np.concatenate([np.asarray(s) for s in got], axis=2)  # [B, K, S, H]
        want_row = np.concatenate([np.asarray(s) for s in want], axis=2)
        np.testing.assert_array_equal(got_row[0, :, :n], want_row[1, :, :n])
        np.testing.assert_array_equal(got_row[0, :, n:], want_row[0, :, n:])
        np.testing.assert_array_equal(got_row[1], want_row[1])


def test_tensor_parallel_engine_gives_the_single_device_tokens(engine, model):
    from research.sharding import make_mesh

    mesh = make_mesh((1, 1, 2), devices=jax.devices()[:2])
    config = EngineConfig(num_slots=2, steps_per_call=4, prefill_chunk=16, prefix_block=8)
    sharded = Engine(CONFIG, *model, CharTokenizer(), config, mesh=mesh)
    sharded.start()
    assert sharded.wait_ready(120)
    try:
        prompts = [LONG, [1, 7, 9]]
        requests = [
            SamplingParams(max_new_tokens=8, temperature=0.0),
            SamplingParams(max_new_tokens=8, temperature=1.0, seed=11),
        ]
        got = run(sharded, prompts, requests)
        want = run(engine, prompts, requests)
        assert [tokens_of(o) for o in got] == [tokens_of(o) for o in want]
    finally:
        sharded.shutdown()


def test_a_one_token_request_ends_at_its_first_token(engine, model):
    (outputs,) = run(engine, [LONG], [SamplingParams(max_new_tokens=1, temperature=0.0)])
    expected = generate_reference(*model, LONG, max_new_tokens=1, max_seq_len=CONFIG.max_seq_len)
    assert tokens_of(outputs) == expected
    assert outputs[-1].finish_reason == "length" and outputs[-1].completion_tokens == 1
    assert engine.stats()["running"] == 0


@pytest.mark.parametrize("budget, live_after_one_loop", [(160, 3), (64, 1)])
def test_prefill_budget_per_loop_may_exceed_the_context(model, budget, live_after_one_loop):
    """serve.prefill_chunk is a per-loop budget: 3 prompts of 40 tokens (each call at most
    max_len = 64 tokens) all prefill in one loop under a budget of 160, one under 64."""
    config = EngineConfig(num_slots=3, steps_per_call=1, prefill_chunk=budget)
    engine = Engine(CONFIG, *model, CharTokenizer(), config)
    engine._warm_up()  # The engine thread's work, run here one loop at a time.
    for i in range(3):
        prompt = [1, *(3 + (i + t) % 30 for t in range(39))]
        engine.submit(prompt, SamplingParams(max_new_tokens=4), lambda output: None)
    engine._loop()
    assert sum(r is not None and r.live for r in engine.scheduler.slots) == live_after_one_loop


def test_a_slot_freed_by_a_stop_string_serves_the_next_request_exactly(model):
    """One slot, decode calls pipelined: the stopped request's extra in-flight tokens are
    dropped, and the request queued behind it gets its run-alone tokens."""
    config = EngineConfig(num_slots=1, steps_per_call=2, prefill_chunk=16)
    engine = Engine(CONFIG, *model, CharTokenizer(), config)
    engine.start()
    assert engine.wait_ready(120)
    try:
        greedy = SamplingParams(max_new_tokens=16, temperature=0.0)
        (plain,) = run(engine, [LONG], [greedy])
        text = "".join(o.text for o in plain)
        stop = SamplingParams(max_new_tokens=16, temperature=0.0, stop_strings=(text[3:5],))
        follow = SamplingParams(max_new_tokens=9, temperature=1.0, seed=11)
        cut, after = run(engine, [LONG, [1, 7, 9]], [stop, follow])
    finally:
        engine.shutdown()
    assert "".join(o.text for o in cut) == text[: text.index(text[3:5])]
    assert cut[-1].finish_reason == "stop"
    (alone,) = complete(Sampler(CONFIG, *model, num_slots=1), [[1, 7, 9]], [follow])
    assert tokens_of(after) == alone.token_ids


def test_prompts_waiting_together_prefill_in_one_call_and_equal_each_alone(model):
    config = EngineConfig(num_slots=4, steps_per_call=2, prefill_chunk=64, prefill_rows=4)
    engine = Engine(CONFIG, *model, CharTokenizer(), config)
    calls, extend = [], engine.sampler.extend

    def recorded(state, rows, **kwargs):  # The real call, its rows noted.
        calls.append(rows)
        return extend(state, rows, **kwargs)

    engine.sampler.extend = recorded
    prompts = [[1, 7, 9], LONG[:20], [1, 4], [1, 3, 3, 3, 3], [1, 8]]
    requests = [
        SamplingParams(max_new_tokens=6, temperature=0.0),
        SamplingParams(max_new_tokens=8, temperature=1.2, top_p=0.9, seed=3),
        SamplingParams(max_new_tokens=5, temperature=0.8, top_k=5, seed=4),
        SamplingParams(max_new_tokens=7, temperature=1.0, frequency_penalty=0.5, seed=5),
        SamplingParams(max_new_tokens=4, temperature=0.0),
    ]
    outputs = run(engine, prompts, requests, start=True)
    engine.shutdown()
    alone = complete(Sampler(CONFIG, *model, num_slots=1), prompts, requests)
    for got, want in zip(outputs, alone, strict=True):
        assert tokens_of(got) == want.token_ids
    together = [[slot for slot, _, _ in rows] for rows in calls if len(rows) > 1]
    assert together == [[0, 1, 2, 3]]  # The fifth waited for a slot, then went alone.


def test_requests_compile_nothing_once_warm(model):
    """Parameters on a one-device mesh (as `research.checkpoint.load` places them): once the
    engine is ready and its decode buckets are compiled, requests of every kind (lengths,
    batches, prompt logprobs, prefix-cache hits) compile nothing on the request path."""
    from research.serving import shard_params
    from research.sharding import make_mesh

    graphdef, params = model
    params = shard_params(params, make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    config = EngineConfig(num_slots=3, steps_per_call=2, prefill_chunk=16, prefix_block=8)
    engine = Engine(CONFIG, graphdef, params, CharTokenizer(), config)
    engine.start()
    assert engine.wait_ready(120)
    engine._compiler.join(120)  # The background compiles (decode buckets, echo prefill).
    assert engine.stats()["decode_buckets_compiled"] == engine.stats()["decode_buckets"]
    assert not engine.stats()["compiling"]
    sampler = engine.sampler

    def compiled():
        jitted = (sampler._extend, sampler._activate, sampler._release, sampler._init)
        return [f._cache_size() for f in jitted], len(sampler.compiled_buckets())

    before = compiled()
    try:
        greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
        run(engine, [LONG, [1, 7, 9], LONG[:20], [1, 4]], [greedy] * 4)
        run(engine, [LONG], [greedy], prompt_logprobs=2)
        run(engine, [LONG[:30] + [5]], [SamplingParams(max_new_tokens=3, num_logprobs=2)])
    finally:
        engine.shutdown()
    assert compiled() == before


def test_int8_cache_through_chunked_prefill_and_the_prefix_cache(model):
    """serve.kv_cache_dtype='int8': prompts prefilled in chunks of 16 and after prefix blocks
    pooled with their scales give the tokens of an int8 sampler that prefills each prompt
    whole; the pool holds int8 blocks and float32 scales. The engine's loop runs here."""
    config = EngineConfig(
        num_slots=2, steps_per_call=3, prefill_chunk=16, prefix_block=8, kv_cache_dtype="int8"
    )
    engine = Engine(CONFIG, *model, CharTokenizer(), config)
    engine._warm_up()

    def alone(prompt, request):
        outputs = []
        engine.submit(prompt, request, outputs.append)
        while not (outputs and outputs[-1].finish_reason):
            engine._loop()
        return outputs

    system = [1, *range(10, 34)]  # 25 tokens: three full blocks of 8.
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    # Each runs alone in slot 0; LONG overwrites the system prompt's rows before they are
    # loaded back from the pool.
    prompts = [system + [5, 6], LONG, system + [7]]
    got = [alone(prompt, greedy) for prompt in prompts]
    assert [o[-1].cached_tokens for o in got] == [0, 0, 24]
    want = complete(Sampler(CONFIG, *model, num_slots=1, kv_dtype="int8"), prompts, greedy)
    assert [tokens_of(o) for o in got] == [w.token_ids for w in want]
    pool = engine.prefix_cache.pool
    assert pool.keys[0][0].dtype == np.int8 and pool.key_scales[0][0].dtype == np.float32
    assert pool.key_scales[0][0].shape == (engine.prefix_cache.num_blocks, 2, 8, 1)


def test_requests_taken_into_a_step_still_count_as_waiting(model):
    """While the engine thread runs a step, the requests it took from the incoming list are
    in the scheduler's queue: submit must still count them (the queue stays full)."""
    engine = Engine(CONFIG, *model, CharTokenizer(), EngineConfig(num_slots=1, max_waiting=1))
    outputs, seen = [], []
    engine.submit([1, 2], SamplingParams(max_new_tokens=2), outputs.append, owner="a")

    def step():  # Mid-step, on the engine's side: the request left `_incoming`.
        seen.append(engine.stats()["waiting"])
        with pytest.raises(QueueFull, match="max_waiting=1"):
            engine.submit([1, 2], SamplingParams(), outputs.append, owner="b")

    engine.scheduler.step = step
    engine._loop()
    assert seen == [1] and not outputs
