"""The serving engine: continuous batching and a prefix cache on the Sampler's fixed slots.

One engine thread owns the device state and loops:

  1. cancellations: a cancelled request (client gone) leaves its slot or the queue at once;
  2. admission: waiting requests take free slots in arrival order; the longest run of their
     prompt's leading blocks found in the prefix cache is copied into the slot;
  3. chunked prefill: at most `prefill_chunk` prompt tokens per loop go through the model
     (`Sampler.extend`), so a long prompt never stalls the running streams for more than one
     chunk; a finished prompt makes its slot live (`Sampler.activate`, which also chooses
     its first token: streamed at once, so time to first token is the prefill alone) and
     gives its full blocks to the prefix cache;
  4. decode: one `Sampler.generate` call advances every live slot `steps_per_call` tokens.
     It is dispatched before the previous call's tokens are read: while the device computes,
     the host detokenizes those (stop strings cut exactly), hands them to each request's
     callback and frees the slots that finished (a request stopped by a stop string, or
     cancelled, costs at most one more call on the device, whose tokens are dropped).

Requests arrive from any thread through `submit`, which validates them at once (UserError
naming the field, QueueFull past `max_waiting`) and returns the request id; every request
then gets a sequence of `Output` events whose last one has `finish_reason` set. The HTTP
server wraps the callback with `loop.call_soon_threadsafe`.

Each request's tokens depend only on its own prompt, settings and seed (see sampling.py), so
a request's output is the same whatever else the engine is serving, cached prefix or not.
"""

import collections
import dataclasses
import itertools
import logging
import threading
import time
import traceback
from collections.abc import Callable, Sequence

import jax

from research.errors import UserError
from research.serving.detokenize import TextStream
from research.serving.metrics import ServingMetrics
from research.serving.prefix_cache import PrefixCache
from research.serving.sampler import Sampler, length_buckets
from research.serving.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Serving settings (gin: `serve.*`).

    num_slots: requests decoded together (the batch).
    max_len: tokens per slot, prompt + output; 0 = the model's max_seq_len.
    steps_per_call: decode steps per jitted call (more = less overhead, coarser streaming).
    prefill_chunk: prompt tokens prefilled per engine loop (chunked prefill), in calls of at
      most min(prefill_chunk, max_len) tokens; larger fills a burst of new requests in fewer
      loops (more throughput), smaller stalls running streams less (lower inter-token
      latency).
    prefill_rows: whole prompts prefilled together in one call when that many wait within
      the loop's budget (weights read once for all; 0 or 1: one call each).
    max_waiting: requests queued beyond the running ones; past it, submit raises QueueFull.
    prefix_cache_mb: device memory for cached prompt-prefix blocks; 0 turns the cache off.
    prefix_block: tokens per prefix-cache block.
    num_top_logprobs: the most alternatives per token a request may ask for.
    max_stop_tokens: the most stop token ids a request may give (eos included).
    """

    num_slots: int = 8
    max_len: int = 0
    steps_per_call: int = 4
    prefill_chunk: int = 128
    prefill_rows: int = 4
    max_waiting: int = 64
    prefix_cache_mb: float = 64.0
    prefix_block: int = 16
    num_top_logprobs: int = 5
    max_stop_tokens: int = 8

    def check(self) -> None:
        for name in ("num_slots", "steps_per_call", "prefill_chunk", "prefix_block"):
            if getattr(self, name) < 1:
                raise UserError(f"serve.{name}={getattr(self, name)} must be >= 1.")
        for name in ("max_len", "prefill_rows", "max_waiting", "prefix_cache_mb",
                     "num_top_logprobs"):  # fmt: skip
            if getattr(self, name) < 0:
                raise UserError(f"serve.{name}={getattr(self, name)} must be >= 0.")


@dataclasses.dataclass
class Output:
    """One event of one request; the last one has finish_reason set."""

    request_id: str
    text: str  # New text since the last event.
    token_ids: list[int]  # New tokens since the last event.
    logprobs: list[float]  # Raw model log-probability of each new token.
    top_logprobs: list[list[tuple[int, float]]]  # Per new token: num_logprobs (id, logprob).
    finish_reason: str | None  # None while running; "stop", "length" or "abort".
    prompt_tokens: int
    cached_tokens: int  # Prompt tokens whose keys and values came from the prefix cache.
    completion_tokens: int  # Generated so far.
    prompt_logprobs: list[float | None] | None = None  # First event, when asked.
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None


class QueueFull(Exception):
    """The waiting queue is full; retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineClosed(Exception):
    """The engine is shutting down (or failed) and takes no new requests."""


def _pairs(ids, logprobs) -> list[tuple[int, float]]:
    return [(int(i), float(p)) for i, p in zip(ids, logprobs, strict=True)]


@dataclasses.dataclass(eq=False)
class _Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    on_output: Callable[[Output], None]
    prompt_logprobs: int | None
    arrival: float
    stream: TextStream
    slot: int = -1
    prefilled: int = 0  # Prompt tokens in the slot's cache.
    cached: int = 0
    live: bool = False  # Decoding (prompt done).
    completion_tokens: int = 0
    last_emit: float = 0.0
    prompt_lp: list = dataclasses.field(default_factory=list)
    prompt_top: list = dataclasses.field(default_factory=list)
    prompt_sent: bool = False


class Engine:
    """Continuous batching over a Sampler; see the module docstring.

    Args:
      model_config, graphdef, params: the model (`nnx.split(model, nnx.Param)`).
      tokenizer: research.data.Tokenizer (detokenization, stop strings).
      config: EngineConfig.
      mesh: optional (data, fsdp, tensor) mesh for tensor-parallel serving.
      metrics: ServingMetrics to record into (a fresh one by default).
    """

    def __init__(
        self,
        model_config,
        graphdef,
        params,
        tokenizer,
        config: EngineConfig = EngineConfig(),
        *,
        mesh=None,
        metrics: ServingMetrics | None = None,
    ):
        config.check()
        self.config = config
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.metrics = metrics or ServingMetrics()
        self.sampler = Sampler(
            model_config,
            graphdef,
            params,
            num_slots=config.num_slots,
            max_len=config.max_len,
            steps_per_call=config.steps_per_call,
            num_top_logprobs=config.num_top_logprobs,
            max_stop_tokens=config.max_stop_tokens,
            mesh=mesh,
        )
        self.max_len = self.sampler.max_len
        self.prefix_cache = PrefixCache(
            model_config,
            self.max_len,
            config.prefix_cache_mb * 2**20,
            config.prefix_block,
            mesh=mesh,
        )
        self._chunk = min(config.prefill_chunk, self.max_len)  # Tokens per extend call.
        self._lock = threading.Condition()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._cancelled: set[str] = set()
        self._slots: list[_Request | None] = [None] * config.num_slots
        self._ids = itertools.count()
        self._ready = threading.Event()
        self._closing = False
        self._drain_deadline = float("inf")
        self._error: str | None = None
        self._thread: threading.Thread | None = None
        self._state = None
        self._inflight = None  # (Tokens on device, live request per slot) of the last call.

    # ---- public, any thread ---------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self._error is None

    @property
    def error(self) -> str | None:
        """Why the engine thread stopped, if it failed."""
        return self._error

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout) and self._error is None

    def start(self) -> None:
        """Starts the engine thread; it compiles and warms up, then `ready` turns True."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="cirrus-engine", daemon=True)
        self._thread.start()

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        on_output: Callable[[Output], None],
        *,
        prompt_logprobs: int | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queues a request; raises UserError (bad prompt or settings), QueueFull or
        EngineClosed. `on_output` is called from the engine thread, in order."""
        prompt_ids = [int(t) for t in prompt_ids]
        self.sampler.check_prompt(prompt_ids)
        self.sampler.check_request(params)
        if params.stop_strings and self.tokenizer is None:
            raise UserError("stop strings need the model's tokenizer; this engine has none.")
        if prompt_logprobs is not None and not 0 <= prompt_logprobs <= self.config.num_top_logprobs:
            raise UserError(
                f"prompt_logprobs={prompt_logprobs} must be in [0, "
                f"{self.config.num_top_logprobs}] (serve.num_top_logprobs)."
            )
        request = _Request(
            id=request_id or f"req-{next(self._ids)}",
            prompt_ids=prompt_ids,
            params=params,
            on_output=on_output,
            prompt_logprobs=prompt_logprobs,
            arrival=time.monotonic(),
            stream=TextStream(self.tokenizer, prompt_ids, params.stop_strings)
            if self.tokenizer is not None
            else None,
        )
        with self._lock:
            if self._closing or self._error is not None:
                raise EngineClosed(self._error or "the server is shutting down.")
            if len(self._waiting) >= self.config.max_waiting:
                raise QueueFull(
                    f"{len(self._waiting)} requests are already waiting (serve.max_waiting="
                    f"{self.config.max_waiting}); retry shortly.",
                    retry_after_s=1.0,
                )
            self._waiting.append(request)
            self._lock.notify()
        return request.id

    def cancel(self, request_id: str) -> None:
        """Ends a request (e.g. its client went away): frees its slot, sends a last Output
        with finish_reason "abort". Unknown or finished ids are ignored."""
        with self._lock:
            self._cancelled.add(request_id)
            self._lock.notify()

    def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Takes no new requests, lets accepted ones finish (aborting what is left after
        drain_timeout_s), and stops the engine thread."""
        with self._lock:
            self._closing = True
            self._drain_deadline = time.monotonic() + drain_timeout_s
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(drain_timeout_s + 30)

    def stats(self) -> dict:
        """A snapshot of the engine's load and caches."""
        with self._lock:
            running = [r for r in self._slots if r is not None]
            waiting = len(self._waiting)
        used = sum(len(r.prompt_ids) + r.completion_tokens for r in running)
        cache = self.prefix_cache
        return {
            "running": len(running),
            "waiting": waiting,
            "free_slots": self.config.num_slots - len(running),
            "kv_cache_usage": used / (self.config.num_slots * self.max_len),
            "prefix_cache_blocks": cache.used_blocks,
            "prefix_cache_capacity_blocks": cache.num_blocks,
            "prefix_cache_hit_rate": cache.hit_tokens / max(cache.queried_tokens, 1),
            "ready": self.ready,
        }

    # ---- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._warm_up()
            self._ready.set()
            while self._step():
                pass
        except Exception as error:  # noqa: BLE001 - reported to every request and /ready.
            self._error = f"the engine failed: {type(error).__name__}: {error}"
            log.error("%s\n%s", self._error, traceback.format_exc())
            self._ready.set()
            with self._lock:
                requests = [r for r in self._slots if r is not None] + list(self._waiting)
                self._waiting.clear()
                self._slots = [None] * self.config.num_slots
            for request in requests:
                self._emit(request, "abort")

    def _warm_up(self) -> None:
        """Compiles every jitted call the loop can make, on slot 0, then clears the state."""
        sampler = self.sampler
        state = sampler.init_state()
        rows = self.config.prefill_rows
        for bucket in length_buckets(self._chunk):
            state, _ = sampler.extend(state, 0, [0], 0, bucket=bucket)
            if 1 < rows <= self.config.num_slots:
                state = sampler.extend_rows(state, [(0, [0], 0)], num_rows=rows, bucket=bucket)
        state, _ = sampler.activate(state, 0, [0], SamplingParams(max_new_tokens=3, temperature=0))
        state, _ = sampler.generate(state, 1)
        state = sampler.release(state, 0)
        state = state.replace(cache=self.prefix_cache.warm_up(state.cache))
        jax.block_until_ready(state)
        self._state = sampler.init_state()

    def _step(self) -> bool:
        """One loop: cancellations, admission, a prefill chunk, a decode call. False = stop."""
        with self._lock:
            while not (self._waiting or self._cancelled or self._closing or any(self._slots)):
                self._lock.wait()
            cancelled, self._cancelled = self._cancelled, set()
            for request in [r for r in self._waiting if r.id in cancelled]:
                self._waiting.remove(request)
                self._emit(request, "abort")
            if self._closing and time.monotonic() > self._drain_deadline:
                cancelled |= {r.id for r in self._waiting} | {r.id for r in self._slots if r}
                for request in list(self._waiting):
                    self._emit(request, "abort")
                self._waiting.clear()
            admitted = self._admit()
        for slot, request in enumerate(self._slots):
            if request is not None and request.id in cancelled:
                self._free(slot, "abort")
        for request in admitted:
            self._load_prefix(request)
        self._prefill()
        if any(r is not None and r.live for r in self._slots):
            self._decode()
        elif self._inflight is not None:
            inflight, self._inflight = self._inflight, None
            self._collect(inflight)
        self._record_occupancy()
        with self._lock:
            return not (self._closing and not self._waiting and not any(self._slots))

    def _admit(self) -> list[_Request]:
        """Moves waiting requests into free slots (under the lock)."""
        admitted = []
        for slot in range(self.config.num_slots):
            if self._slots[slot] is None and self._waiting:
                request = self._waiting.popleft()
                request.slot = slot
                self._slots[slot] = request
                admitted.append(request)
        return admitted

    def _load_prefix(self, request: _Request) -> None:
        if request.prompt_logprobs is not None:  # Needs logits at every prompt position.
            chain = []
            self.prefix_cache.queried_tokens += len(request.prompt_ids)
        else:
            chain = self.prefix_cache.match(request.prompt_ids)
        if chain:
            cache = self.prefix_cache.load(self._state.cache, request.slot, chain)
            self._state = self._state.replace(cache=cache)
        request.prefilled = request.cached = len(chain) * self.prefix_cache.block
        self.metrics.prompt(len(request.prompt_ids), request.cached)

    def _prefill(self) -> None:
        """Up to `prefill_chunk` prompt tokens, oldest request first. Whole prompts that fit
        one call go `prefill_rows` at a time through `Sampler.extend_rows`."""
        budget = self.config.prefill_chunk
        rows = self.config.prefill_rows
        pending = [r for r in self._slots if r is not None and not r.live]
        together = []
        for request in sorted(pending, key=lambda r: r.arrival):
            if budget <= 0:
                break
            rest = len(request.prompt_ids) - request.prefilled
            if rows > 1 and request.prompt_logprobs is None and rest <= min(budget, self._chunk):
                together.append(request)
                budget -= rest
            else:
                budget = self._prefill_one(request, budget)
        groups = [together[i : i + rows] for i in range(0, len(together), max(rows, 1))]
        for group in groups:
            if len(group) < rows:  # Padding rows cost as much as real ones: one call each.
                for request in group:
                    self._prefill_one(request, len(request.prompt_ids))
                continue
            prefix = [(r.slot, r.prompt_ids[r.prefilled :], r.prefilled) for r in group]
            self._state = self.sampler.extend_rows(self._state, prefix, num_rows=rows)
            for request in group:
                request.prefilled = len(request.prompt_ids)
                self._activate(request)

    def _prefill_one(self, request: _Request, budget: int) -> int:
        """Chunks of one request's prompt within `budget` tokens; returns what is left."""
        prompt = request.prompt_ids
        while budget > 0 and request.prefilled < len(prompt):
            start = request.prefilled
            count = min(budget, len(prompt) - start, self._chunk)
            budget -= count
            tokens = prompt[start : start + count]
            if request.prompt_logprobs is None:
                self._state, _ = self.sampler.extend(self._state, request.slot, tokens, start)
            else:
                self._state, scores = self.sampler.extend(
                    self._state,
                    request.slot,
                    tokens,
                    start,
                    next_tokens=prompt[start + 1 : start + count + 1],
                    num_prompt_top=self.config.num_top_logprobs,
                )
                self._keep_prompt_logprobs(request, scores, count, start)
            request.prefilled += count
        if request.prefilled == len(prompt):
            self._activate(request)
        return budget

    def _activate(self, request: _Request) -> None:
        """A fully prefilled prompt: its slot goes live, its first token out at once."""
        prompt = request.prompt_ids
        self._state, first = self.sampler.activate(
            self._state, request.slot, prompt, request.params
        )
        request.live = True
        copies = self.prefix_cache.plan_store(prompt)
        self.prefix_cache.store(self._state.cache, request.slot, copies)
        self._deliver(request.slot, request, jax.device_get(first), 0)

    def _keep_prompt_logprobs(self, request: _Request, scores, count: int, start: int) -> None:
        chosen_t, top_ids_tn, top_logprobs_tn = jax.device_get(scores)
        n = request.prompt_logprobs
        known = min(count, len(request.prompt_ids) - 1 - start)  # The last has no next token.
        for t in range(known):
            request.prompt_lp.append(float(chosen_t[t]))
            request.prompt_top.append(_pairs(top_ids_tn[t, :n], top_logprobs_tn[t, :n]))

    def _decode(self) -> None:
        """Dispatches the next decode call, then hands out the previous call's tokens while
        the device computes (one call in flight: host work hides behind device work)."""
        self._state, steps = self.sampler.generate(self._state)
        live = [r if r is not None and r.live else None for r in self._slots]
        previous, self._inflight = self._inflight, (steps, live)
        if previous is not None:
            self._collect(previous)

    def _collect(self, inflight) -> None:
        """Delivers a decode call's tokens to the requests that were live when it was
        dispatched and still hold their slot (not finished, cancelled or replaced since)."""
        steps, requests = inflight
        steps = jax.device_get(steps)
        for slot, request in enumerate(requests):
            if request is not None and self._slots[slot] is request:
                self._deliver(slot, request, steps, slot)

    def _deliver(self, slot: int, request: _Request, steps, row: int) -> None:
        """Hands row `row` of a Tokens (host copy) to the request in `slot`: text, stop
        strings, metrics, its Output; frees the slot when the request is done."""
        now = time.monotonic()
        new_tokens, logprobs, tops, stopped = [], [], [], False
        text = ""
        n = request.params.num_logprobs
        for j, token in enumerate(steps.tokens[row]):
            if token < 0:  # Nothing chosen in that step (finished, or a pending token fed).
                continue
            new_tokens.append(int(token))
            logprobs.append(float(steps.logprobs[row, j]))
            tops.append(_pairs(steps.top_ids[row, j, :n], steps.top_logprobs[row, j, :n]))
            if request.stream is not None:
                text += request.stream.add(int(token))
                if request.stream.stopped:
                    stopped = True
                    break
        device_live = bool(steps.live[row])
        if not new_tokens and device_live:
            return
        if request.completion_tokens == 0:
            self.metrics.first_token(now - request.arrival)
            self.metrics.tokens(1, None)
            if len(new_tokens) > 1:
                self.metrics.tokens(len(new_tokens) - 1, 0.0)
        else:
            self.metrics.tokens(len(new_tokens), (now - request.last_emit) / len(new_tokens))
        request.completion_tokens += len(new_tokens)
        request.last_emit = now
        reason = None
        if stopped or (new_tokens and new_tokens[-1] in request.params.stop_token_ids):
            reason = "stop"
        elif not device_live:
            reason = "length"
        if reason is not None and request.stream is not None and not stopped:
            text += request.stream.finish()
        self._emit(request, reason, text, new_tokens, logprobs, tops)
        if reason is not None:
            self._free(slot, None, release=device_live)

    def _free(self, slot: int, abort_reason: str | None, release: bool = True) -> None:
        """Empties `slot`; with abort_reason, the request gets its last Output first."""
        request = self._slots[slot]
        if release and request.live:
            self._state = self.sampler.release(self._state, slot)
        with self._lock:
            self._slots[slot] = None
        if abort_reason is not None:
            self._emit(request, abort_reason)

    def _emit(
        self,
        request: _Request,
        reason: str | None,
        text: str = "",
        tokens=(),
        logprobs=(),
        tops=(),
    ) -> None:
        output = Output(
            request_id=request.id,
            text=text,
            token_ids=list(tokens),
            logprobs=list(logprobs),
            top_logprobs=list(tops),
            finish_reason=reason,
            prompt_tokens=len(request.prompt_ids),
            cached_tokens=request.cached,
            completion_tokens=request.completion_tokens,
        )
        complete = len(request.prompt_lp) == len(request.prompt_ids) - 1
        if request.prompt_logprobs is not None and complete and not request.prompt_sent:
            output.prompt_logprobs = [None, *request.prompt_lp]
            output.prompt_top_logprobs = [[], *request.prompt_top]
            request.prompt_sent = True
        if reason is not None:
            self.metrics.finished(reason, time.monotonic() - request.arrival)
        try:
            request.on_output(output)
        except Exception:  # noqa: BLE001 - a client's callback must not stop the engine.
            log.exception("on_output of %s failed", request.id)

    def _record_occupancy(self) -> None:
        stats = self.stats()
        self.metrics.occupancy(stats["running"], stats["waiting"], stats["kv_cache_usage"])
