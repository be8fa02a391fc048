"""The one scheduler: requests over a Sampler's slots, driven by the threaded Engine and by
`complete()` alike.

Each `step()`:
  1. admission: waiting requests take free slots (lowest first) in arrival order; the longest
     run of their prompt's leading blocks found in the prefix cache (under the request's
     owner: tenants never share cached prompts) is copied into the slot;
  2. prefill: at most `prefill_chunk` prompt tokens go through the model (`Sampler.extend`),
     so a long prompt never stalls the running streams for more than one chunk; whole
     prompts that wait together go `prefill_rows` to a call. A prompt that is in makes its
     slot live (`Sampler.activate`, which also chooses the first token: delivered at once)
     and gives its full blocks to the prefix cache;
  3. decode: one `Sampler.generate` call advances every live slot `steps_per_call` tokens, in
     the smallest bucket that holds the live slots and their lengths. It is dispatched
     before the previous call's tokens are read: while the device computes, the host
     detokenizes those (stop strings cut exactly), hands them out and frees finished slots.

Every request gets a sequence of `Output` events whose last one has `finish_reason` set:
"stop", "length", "abort" (cancelled) or "error" (with `error` set). With `isolate_errors`
(the server), an exception while serving one request fails that request alone; one in a call
over every slot (decode) fails the requests in slots, and the slots start afresh. Without it
(`complete()`), the exception propagates.

Each request's tokens depend only on its own prompt, settings and seed (sampling.py): never
on a cached prefix, and on its neighbours only through float rounding between batch
buckets.
"""

import collections
import dataclasses
import logging
import time
import traceback
from collections.abc import Callable

import jax

from research.errors import RequestError
from research.serving.core.detokenize import TextStream
from research.serving.core.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Output:
    """One event of one request; the last one has finish_reason set."""

    request_id: str
    text: str  # New text since the last event.
    token_ids: list[int]  # New tokens since the last event.
    logprobs: list[float]  # Raw model log-probability of each new token.
    top_logprobs: list[list[tuple[int, float]]]  # Per new token: num_logprobs (id, logprob).
    finish_reason: str | None  # None while running; "stop", "length", "abort" or "error".
    prompt_tokens: int
    cached_tokens: int  # Prompt tokens whose keys and values came from the prefix cache.
    completion_tokens: int  # Generated so far.
    prompt_logprobs: list[float | None] | None = None  # First event, when asked.
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None
    error: str | None = None  # With finish_reason "error": what went wrong (server side).


@dataclasses.dataclass(eq=False)
class Request:
    """A request as the scheduler tracks it."""

    id: str
    prompt_ids: list[int]
    params: SamplingParams
    on_output: Callable[[Output], None]
    prompt_logprobs: int | None = None
    owner: str = ""  # Prefix-cache namespace (the API key's tenant).
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    stream: TextStream | None = None
    slot: int = -1
    prefilled: int = 0  # Prompt tokens in the slot's cache.
    cached: int = 0
    live: bool = False  # Decoding (prompt done).
    length_bound: int = 0  # At least the slot's cache length (prompt + tokens fed).
    completion_tokens: int = 0
    last_emit: float = 0.0
    prompt_lp: list = dataclasses.field(default_factory=list)
    prompt_top: list = dataclasses.field(default_factory=list)
    prompt_sent: bool = False
    finished: bool = False


def _pairs(ids, logprobs) -> list[tuple[int, float]]:
    return [(int(i), float(p)) for i, p in zip(ids, logprobs, strict=True)]


class Scheduler:
    """Continuous batching over a Sampler; see the module docstring.

    Args:
      sampler: the Sampler (its slots, jitted calls and checks).
      tokenizer: research.data.Tokenizer for text and stop strings, or None (tokens only).
      prefill_chunk: prompt tokens prefilled per step, in calls of at most
        min(prefill_chunk, max_len) tokens.
      prefill_rows: whole prompts prefilled together in one call (0 or 1: one call each).
      prefix_cache: a PrefixCache, or None.
      metrics: a ServingMetrics, or None.
      isolate_errors: fail the request (or the requests in slots) on an exception instead of
        raising it.
    """

    def __init__(
        self,
        sampler,
        tokenizer=None,
        *,
        prefill_chunk: int = 128,
        prefill_rows: int = 4,
        prefix_cache=None,
        metrics=None,
        isolate_errors: bool = False,
    ):
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.prefill_rows = min(prefill_rows, sampler.num_slots)
        self.chunk = min(prefill_chunk, sampler.max_len)  # Tokens per extend call.
        self.prefix_cache = prefix_cache
        self.metrics = metrics
        self.isolate_errors = isolate_errors
        self.waiting: collections.deque[Request] = collections.deque()
        self.slots: list[Request | None] = [None] * sampler.num_slots
        self.state = None
        self._inflight = None  # (Tokens on device, live request per row) of the last call.
        self.consecutive_failures = 0

    # ---- requests ------------------------------------------------------------------------

    def new_request(self, request_id: str, prompt_ids, params: SamplingParams, on_output,
                    **fields) -> Request:  # fmt: skip
        """A checked Request (RequestError names a bad field) with its text stream."""
        prompt_ids = list(prompt_ids)
        self.sampler.check_prompt(prompt_ids)
        self.sampler.check_request(params)
        if params.stop_strings and self.tokenizer is None:
            raise RequestError("stop_strings", params.stop_strings, "need the model's tokenizer")
        stream = None
        if self.tokenizer is not None:
            stream = TextStream(self.tokenizer, prompt_ids, params.stop_strings)
        return Request(
            id=request_id,
            prompt_ids=[int(t) for t in prompt_ids],
            params=params,
            on_output=on_output,
            stream=stream,
            **fields,
        )

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(self.slots) or self._inflight is not None

    def running(self) -> list[Request]:
        return [r for r in self.slots if r is not None]

    def cancel(self, request_ids: set[str], reason: str = "abort", error: str | None = None):
        """Ends the named requests, waiting or running, with finish_reason `reason` (and,
        for "error", the message `error`)."""
        for request in [r for r in self.waiting if r.id in request_ids]:
            self.waiting.remove(request)
            self.emit(request, reason, error=error)
        for slot, request in enumerate(self.slots):
            if request is not None and request.id in request_ids:
                self._free(slot, reason, error=error)

    def fail_all(self, message: str) -> None:
        """Every waiting and running request ends with finish_reason "error"."""
        requests = list(self.waiting) + self.running()
        self.waiting.clear()
        self.slots = [None] * len(self.slots)
        self._inflight = None
        for request in requests:
            self.emit(request, "error", error=message)

    # ---- one step ------------------------------------------------------------------------

    def step(self) -> None:
        """Admission, a prefill budget and a decode call (see the module docstring)."""
        if self.state is None:
            self.state = self.sampler.init_state()
        for request in self._admit():
            self._guard(self._load_prefix, request)
        self._prefill()
        if any(r is not None and r.live for r in self.slots):
            self._decode()
        elif self._inflight is not None:
            inflight, self._inflight = self._inflight, None
            self._guard_all(self._collect, inflight)

    def flush(self) -> None:
        """Delivers the decode call still in flight, if any."""
        if self._inflight is not None:
            inflight, self._inflight = self._inflight, None
            self._guard_all(self._collect, inflight)

    def _admit(self) -> list[Request]:
        admitted = []
        for slot in range(len(self.slots)):
            if self.slots[slot] is None and self.waiting:
                request = self.waiting.popleft()
                request.slot = slot
                self.slots[slot] = request
                admitted.append(request)
        return admitted

    def _load_prefix(self, request: Request) -> None:
        cache = self.prefix_cache
        chain = []
        if cache is not None and cache.enabled:
            if request.prompt_logprobs is not None:  # Needs logits at every prompt position.
                cache.queried_tokens += len(request.prompt_ids)
            else:
                chain = cache.match(request.prompt_ids, request.owner)
        if chain:
            self.state = self.state.replace(cache=cache.load(self.state.cache, request.slot, chain))
        request.prefilled = request.cached = len(chain) * cache.block if chain else 0
        if self.metrics is not None:
            self.metrics.prompt(len(request.prompt_ids), request.cached)

    def _prefill(self) -> None:
        """Up to `prefill_chunk` prompt tokens, oldest request first. Whole prompts that fit
        one call go `prefill_rows` at a time."""
        budget = self.prefill_chunk
        rows = self.prefill_rows
        pending = [r for r in self.slots if r is not None and not r.live]
        together = []
        for request in sorted(pending, key=lambda r: r.arrival):
            if budget <= 0:
                break
            rest = len(request.prompt_ids) - request.prefilled
            if rows > 1 and request.prompt_logprobs is None and rest <= min(budget, self.chunk):
                together.append(request)
                budget -= rest
            else:
                budget = self._guard(self._prefill_one, request, budget, default=budget)
        groups = [together[i : i + rows] for i in range(0, len(together), max(rows, 1))]
        for group in groups:
            if len(group) < rows:  # Padding rows cost as much as real ones: one call each.
                for request in group:
                    self._guard(self._prefill_one, request, len(request.prompt_ids))
                continue
            self._guard_group(self._prefill_group, group)

    def _prefill_group(self, group: list[Request]) -> None:
        prefix = [(r.slot, r.prompt_ids[r.prefilled :], r.prefilled) for r in group]
        self.state, _ = self.sampler.extend(self.state, prefix, num_rows=self.prefill_rows)
        for request in group:
            request.prefilled = len(request.prompt_ids)
        for request in group:
            self._guard(self._activate, request)

    def _prefill_one(self, request: Request, budget: int) -> int:
        """Chunks of one request's prompt within `budget` tokens; returns what is left."""
        prompt = request.prompt_ids
        while budget > 0 and request.prefilled < len(prompt):
            start = request.prefilled
            count = min(budget, len(prompt) - start, self.chunk)
            budget -= count
            rows = [(request.slot, prompt[start : start + count], start)]
            if request.prompt_logprobs is None:
                self.state, _ = self.sampler.extend(self.state, rows)
            else:
                self.state, scores = self.sampler.extend(
                    self.state,
                    rows,
                    next_tokens=prompt[start + 1 : start + count + 1],
                    num_prompt_top=self.sampler.num_top_logprobs,
                )
                self._keep_prompt_logprobs(request, scores, count, start)
            request.prefilled += count
        if request.prefilled == len(prompt):
            self._activate(request)
        return budget

    def _activate(self, request: Request) -> None:
        """A fully prefilled prompt: its slot goes live, its first token out at once."""
        prompt = request.prompt_ids
        self.state, first = self.sampler.activate(self.state, request.slot, prompt, request.params)
        request.live = True
        request.length_bound = len(prompt)
        if self.prefix_cache is not None and self.prefix_cache.enabled:
            copies = self.prefix_cache.plan_store(prompt, request.owner)
            self.prefix_cache.store(self.state.cache, request.slot, copies)
        self._deliver(request.slot, request, jax.device_get(first), 0)

    def _keep_prompt_logprobs(self, request: Request, scores, count: int, start: int) -> None:
        chosen_t, top_ids_tn, top_logprobs_tn = jax.device_get(scores)
        n = request.prompt_logprobs
        known = min(count, len(request.prompt_ids) - 1 - start)  # The last has no next token.
        for t in range(known):
            request.prompt_lp.append(float(chosen_t[t]))
            request.prompt_top.append(_pairs(top_ids_tn[t, :n], top_logprobs_tn[t, :n]))

    def _decode(self) -> None:
        """Dispatches the next decode call, then hands out the previous call's tokens while
        the device computes (one call in flight: host work hides behind device work)."""
        live = [r if r is not None and r.live else None for r in self.slots]
        steps = self.sampler.steps_per_call
        num_rows = max(slot for slot, r in enumerate(live) if r is not None) + 1
        num_keys = max(r.length_bound for r in live if r is not None) + steps
        try:
            self.state, tokens = self.sampler.generate(
                self.state, num_rows=num_rows, num_keys=num_keys
            )
        except Exception as error:  # noqa: BLE001 - see _fail_slots.
            self._fail_slots(error)
            return
        for request in live:
            if request is not None:
                request.length_bound = min(request.length_bound + steps, self.sampler.max_len)
        previous, self._inflight = self._inflight, (tokens, live)
        if previous is not None:
            self._guard_all(self._collect, previous)

    def _collect(self, inflight) -> None:
        """Delivers a decode call's tokens to the requests that were live when it was
        dispatched and still hold their slot (not finished, cancelled or replaced since)."""
        tokens, requests = inflight
        tokens = jax.device_get(tokens)
        self.consecutive_failures = 0
        for slot, request in enumerate(requests):
            if request is not None and self.slots[slot] is request:
                self._guard(self._deliver, slot, request, tokens, slot)

    def _deliver(self, slot: int, request: Request, steps, row: int) -> None:
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
        if self.metrics is not None:
            if request.completion_tokens == 0:
                self.metrics.first_token(now - request.arrival)
                self.metrics.tokens(1, None)
                if len(new_tokens) > 1:
                    self.metrics.tokens(len(new_tokens) - 1, 0.0)
            elif new_tokens:
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
        self.emit(request, reason, text, new_tokens, logprobs, tops)
        if reason is not None:
            self._free(slot, None, release=device_live)

    def _free(self, slot: int, reason: str | None, release: bool = True, **fields) -> None:
        """Empties `slot`; with a reason, the request gets its last Output first."""
        request = self.slots[slot]
        self.slots[slot] = None
        if release and request.live and self.state is not None:
            self.state = self.sampler.release(self.state, slot)
        if reason is not None:
            self.emit(request, reason, **fields)

    def emit(self, request: Request, reason: str | None, text: str = "", tokens=(),
             logprobs=(), tops=(), error: str | None = None) -> None:  # fmt: skip
        """Sends one Output to the request (at most one with a finish_reason)."""
        if request.finished:
            return
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
            error=error,
        )
        complete = len(request.prompt_lp) == len(request.prompt_ids) - 1
        if request.prompt_logprobs is not None and complete and not request.prompt_sent:
            output.prompt_logprobs = [None, *request.prompt_lp]
            output.prompt_top_logprobs = [[], *request.prompt_top]
            request.prompt_sent = True
        if reason is not None:
            request.finished = True
            if self.metrics is not None:
                self.metrics.finished(reason, time.monotonic() - request.arrival)
        try:
            request.on_output(output)
        except Exception:  # noqa: BLE001 - a client's callback must not stop the engine.
            log.exception("on_output of %s failed", request.id)

    # ---- failures ------------------------------------------------------------------------

    def _guard(self, function, request: Request, *args, default=None):
        """Runs function(request, ...); an exception fails that request alone (or, without
        isolate_errors, propagates)."""
        try:
            return function(request, *args)
        except Exception as error:  # noqa: BLE001 - one request must not stop the others.
            if not self.isolate_errors:
                raise
            self._fail_request(request, error)
            return default

    def _guard_group(self, function, group: list[Request]) -> None:
        try:
            function(group)
        except Exception as error:  # noqa: BLE001 - as _guard, for a batched call.
            if not self.isolate_errors:
                raise
            for request in group:
                self._fail_request(request, error)

    def _guard_all(self, function, *args) -> None:
        try:
            function(*args)
        except Exception as error:  # noqa: BLE001 - see _fail_slots.
            self._fail_slots(error)

    def _fail_request(self, request: Request, error: Exception) -> None:
        message = f"{type(error).__name__}: {error}"
        log.error("request %s failed: %s\n%s", request.id, message, traceback.format_exc())
        if self._state_lost():
            self._fail_slots(error)
            return
        if 0 <= request.slot < len(self.slots) and self.slots[request.slot] is request:
            self._free(
                request.slot, "error", error=f"the server failed on this request ({message})"
            )
        else:
            self.emit(request, "error", error=f"the server failed on this request ({message})")

    def _fail_slots(self, error: Exception) -> None:
        """A call over every slot failed: the requests in slots fail, the slots start over.
        Raises after three such failures in a row (the engine is then dead)."""
        if not self.isolate_errors:
            raise error
        self.consecutive_failures += 1
        message = f"{type(error).__name__}: {error}"
        log.error("a call over every slot failed: %s\n%s", message, traceback.format_exc())
        requests = self.running()
        self.slots = [None] * len(self.slots)
        self._inflight = None
        self.state = None  # Donated buffers may be gone: step() makes a fresh state.
        for request in requests:
            self.emit(request, "error", error=f"the server failed while decoding ({message})")
        if self.consecutive_failures >= 3:
            raise RuntimeError(f"three decode calls failed in a row; last: {message}") from error

    def _state_lost(self) -> bool:
        """Whether a failed call left the device state unusable (its buffers donated)."""
        if self.state is None:
            return False
        return any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(self.state))
