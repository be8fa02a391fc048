"""The serving engine: the scheduler (scheduler.py) on its own thread, fed from any thread.

One engine thread owns the device state and loops `Scheduler.step()`: cancellations,
admission, a prefill budget, a decode call (see scheduler.py). Requests arrive from any
thread through `submit`, which validates them at once (RequestError naming the field,
QueueFull past `max_waiting` or past one owner's share of it) and returns the request id;
every request then gets a sequence of `Output` events whose last one has `finish_reason`
set. The HTTP server wraps the callback with `loop.call_soon_threadsafe`.

Failure, as a load balancer or an orchestrator needs to see it:
  - an error while serving one request fails that request ("error"), the rest go on;
  - the engine thread dying (e.g. three decode calls failing in a row), or a device call
    running past `watchdog_s`, marks the engine failed: `alive` turns False, every request
    waiting or running gets an "error" Output at once, new requests get EngineClosed.
    The server's /health and /ready then answer 503 and `launch.serve` exits non-zero so
    that the replica is restarted.
"""

import collections
import dataclasses
import itertools
import logging
import math
import threading
import time
import traceback
from collections.abc import Callable, Sequence

import jax

from research.errors import RequestError, UserError
from research.serving.core.kv_cache import check_kv_dtype
from research.serving.core.sampler import Sampler, length_buckets
from research.serving.core.sampling import SamplingParams
from research.serving.engine.metrics import ServingMetrics
from research.serving.engine.prefix_cache import PrefixCache
from research.serving.engine.scheduler import Output, Request, Scheduler

log = logging.getLogger(__name__)
SHUTDOWN_ERROR = (
    "the server shut down before this request finished (drain_timeout_s passed); "
    "send it again (another replica, or this one once restarted)"
)

__all__ = ["Engine", "EngineClosed", "EngineConfig", "Output", "QueueFull"]


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
    max_waiting_share: the fraction of max_waiting one owner (API key) may hold; 1 = no
      per-owner limit. Requests without an owner are not limited per owner.
    prefix_cache_mb: device memory for cached prompt-prefix blocks; 0 turns the cache off.
    prefix_block: tokens per prefix-cache block.
    num_top_logprobs: the most alternatives per token a request may ask for.
    max_stop_tokens: the most stop token ids a request may give (eos included).
    watchdog_s: a device call running longer than this marks the engine failed (0 = off).
    kv_cache_dtype: the KV cache's (and prefix cache's) dtype: "auto" = the model's compute
      dtype; "int8" = int8 keys and values with a float32 scale per kv head and position
      (about a quarter of a float32 cache, half of a bfloat16 one; see kv_quant.py).
    """

    num_slots: int = 8
    max_len: int = 0
    steps_per_call: int = 4
    prefill_chunk: int = 128
    prefill_rows: int = 4
    max_waiting: int = 128
    max_waiting_share: float = 0.5
    prefix_cache_mb: float = 64.0
    prefix_block: int = 16
    num_top_logprobs: int = 20
    max_stop_tokens: int = 8
    watchdog_s: float = 300.0
    kv_cache_dtype: str = "auto"

    def check(self) -> None:
        for name in ("num_slots", "steps_per_call", "prefill_chunk", "prefix_block"):
            if getattr(self, name) < 1:
                raise UserError(f"serve.{name}={getattr(self, name)} must be >= 1.")
        for name in ("max_len", "prefill_rows", "max_waiting", "prefix_cache_mb",
                     "num_top_logprobs", "watchdog_s"):  # fmt: skip
            if getattr(self, name) < 0:
                raise UserError(f"serve.{name}={getattr(self, name)} must be >= 0.")
        if not 0 < self.max_waiting_share <= 1:
            raise UserError(
                f"serve.max_waiting_share={self.max_waiting_share} must be in (0, 1] (1 = no "
                "per-key share)."
            )
        check_kv_dtype(self.kv_cache_dtype, "serve.kv_cache_dtype")

    @property
    def max_waiting_per_owner(self) -> int:
        return max(1, math.ceil(self.max_waiting * self.max_waiting_share))


class QueueFull(Exception):
    """The waiting queue (or the owner's share of it) is full; retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineClosed(Exception):
    """The engine is shutting down (or failed) and takes no new requests."""


class Engine:
    """Continuous batching over a Sampler, on a thread; see the module docstring.

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
            kv_dtype=config.kv_cache_dtype,
            mesh=mesh,
        )
        # Requests never compile: a decode call takes the smallest bucket compiled so far.
        self.sampler.compile_on_demand = False
        self.max_len = self.sampler.max_len
        self.prefix_cache = PrefixCache(
            model_config,
            self.max_len,
            config.prefix_cache_mb * 2**20,
            config.prefix_block,
            kv_dtype=config.kv_cache_dtype,
            mesh=mesh,
        )
        self.scheduler = Scheduler(
            self.sampler,
            tokenizer,
            prefill_chunk=config.prefill_chunk,
            prefill_rows=config.prefill_rows,
            prefix_cache=self.prefix_cache,
            metrics=self.metrics,
            isolate_errors=True,
        )
        self._lock = threading.Condition()
        self._incoming: list[Request] = []
        self._cancelled: set[str] = set()
        self._waiting_by_owner: dict[str, int] = {}
        self._ids = itertools.count()
        self._ready = threading.Event()
        self._failed = threading.Event()
        self._closing = False
        self._drain_deadline = float("inf")
        self._error: str | None = None
        self._thread: threading.Thread | None = None
        self._compiler: threading.Thread | None = None
        self._busy_since: float | None = None  # When the engine thread's current step began.
        self._stats = {"running": 0, "waiting": 0, "kv_used": 0}

    # ---- public, any thread ---------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Warmed up and not failed: requests are served."""
        return self._ready.is_set() and self._error is None

    @property
    def alive(self) -> bool:
        """Not failed (it may still be warming up): the liveness answer."""
        return self._error is None

    @property
    def error(self) -> str | None:
        """Why the engine stopped serving, if it failed."""
        return self._error

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout) and self._error is None

    def wait_failed(self, timeout: float | None = None) -> bool:
        """Blocks until the engine fails (True) or the timeout passes (False)."""
        return self._failed.wait(timeout)

    def start(self) -> None:
        """Starts the engine thread (it compiles and warms up, then `ready` turns True) and,
        with `watchdog_s`, the watchdog thread."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="cirrus-engine", daemon=True)
        self._thread.start()
        if self.config.watchdog_s:
            threading.Thread(target=self._watch, name="cirrus-watchdog", daemon=True).start()

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        on_output: Callable[[Output], None],
        *,
        prompt_logprobs: int | None = None,
        request_id: str | None = None,
        owner: str = "",
    ) -> str:
        """Queues a request; raises RequestError (bad prompt or settings), QueueFull or
        EngineClosed. `on_output` is called from the engine thread, in order. `owner` names
        the tenant (API key): its prefix-cache namespace and its share of the queue."""
        if prompt_logprobs is not None and not 0 <= prompt_logprobs <= self.config.num_top_logprobs:
            raise RequestError(
                "prompt_logprobs",
                prompt_logprobs,
                f"must be in [0, {self.config.num_top_logprobs}] (serve.num_top_logprobs)",
            )
        request = self.scheduler.new_request(
            request_id or f"req-{next(self._ids)}",
            prompt_ids,
            params,
            on_output,
            prompt_logprobs=prompt_logprobs,
            owner=owner,
        )
        with self._lock:
            if self._closing or self._error is not None:
                raise EngineClosed(self._error or "the server is shutting down.")
            waiting = self._stats["waiting"] + len(self._incoming)
            if waiting >= self.config.max_waiting:
                raise QueueFull(
                    f"{waiting} requests are already waiting (serve.max_waiting="
                    f"{self.config.max_waiting}); retry shortly.",
                    retry_after_s=1.0,
                )
            share = self.config.max_waiting_per_owner
            mine = self._waiting_by_owner.get(owner, 0) + sum(
                1 for r in self._incoming if r.owner == owner
            )
            if owner and mine >= share:
                raise QueueFull(
                    f"this API key already has {share} requests waiting (its share of "
                    f"serve.max_waiting={self.config.max_waiting}); retry shortly.",
                    retry_after_s=1.0,
                )
            self._incoming.append(request)
            self._lock.notify()
        return request.id

    def cancel(self, request_id: str) -> None:
        """Ends a request (e.g. its client went away): frees its slot, sends a last Output
        with finish_reason "abort". Unknown or finished ids are ignored."""
        with self._lock:
            self._cancelled.add(request_id)
            self._lock.notify()

    def begin_shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Takes no new requests; accepted ones may finish within drain_timeout_s, then
        what is left ends with finish_reason "error" (SHUTDOWN_ERROR). Returns at once; an
        earlier deadline already set stays."""
        with self._lock:
            self._closing = True
            deadline = time.monotonic() + drain_timeout_s
            self._drain_deadline = min(self._drain_deadline, deadline)
            self._lock.notify()

    @property
    def closing(self) -> bool:
        """Shutting down (begin_shutdown or shutdown was called)."""
        return self._closing

    def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """`begin_shutdown`, then waits for the engine thread to stop."""
        self.begin_shutdown(drain_timeout_s)
        if self._thread is not None and self._error is None:
            self._thread.join(drain_timeout_s + 30)
        if self._compiler is not None:  # A compile cut off at exit aborts the process.
            self._compiler.join(120)

    def stats(self) -> dict:
        """A snapshot of the engine's load and caches."""
        with self._lock:
            running, waiting = self._stats["running"], self._stats["waiting"]
            waiting += len(self._incoming)
            used = self._stats["kv_used"]
        cache = self.prefix_cache
        return {
            "running": running,
            "waiting": waiting,
            "free_slots": self.config.num_slots - running,
            "kv_cache_usage": used / (self.config.num_slots * self.max_len),
            "prefix_cache_blocks": cache.used_blocks,
            "prefix_cache_capacity_blocks": cache.num_blocks,
            "prefix_cache_hit_rate": cache.hit_tokens / max(cache.queried_tokens, 1),
            "ready": self.ready,
            "decode_buckets_compiled": len(self.sampler.compiled_buckets()),
            "decode_buckets": len(self.sampler.buckets()),
            # The background compiles (smaller decode buckets, the echo prefill) still run.
            "compiling": self._compiler is not None and self._compiler.is_alive(),
        }

    # ---- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._warm_up()
            compiler = threading.Thread(
                target=self._compile_rest, name="cirrus-compile", daemon=True
            )
            compiler.start()
            self._compiler = compiler  # Started before ready: shutdown() may join it.
            self._ready.set()
            while self._loop():
                pass
        except Exception as error:  # noqa: BLE001 - reported to every request and /health.
            log.error("the engine failed:\n%s", traceback.format_exc())
            self._fail(f"the engine failed: {type(error).__name__}: {error}")

    def _fail(self, message: str) -> None:
        """Marks the engine failed and ends every request with an error (once)."""
        with self._lock:
            if self._error is not None:
                return
            self._error = message
            incoming, self._incoming = self._incoming, []
            self._lock.notify_all()
        self._ready.set()
        self._failed.set()
        for request in incoming:
            self.scheduler.emit(request, "error", error=message)
        self.scheduler.fail_all(message)

    def _watch(self) -> None:
        """Fails the engine when one step (a device call) runs past watchdog_s."""
        limit = self.config.watchdog_s
        while not self._failed.wait(min(1.0, limit / 4)):
            since = self._busy_since
            if since is not None and time.monotonic() - since > limit:
                message = (
                    f"the engine is stuck: a device call has run for more than {limit:g} s "
                    "(serve.watchdog_s)"
                )
                log.error("%s\n%s", message, _thread_stack("cirrus-engine"))
                self._fail(message)

    def _warm_up(self) -> None:
        """Compiles every call the loop makes on the request path (decode: the largest
        bucket, which serves anything), on slot 0, then clears the state."""
        sampler = self.sampler
        state = sampler.init_state()
        rows = self.scheduler.prefill_rows
        for bucket in length_buckets(self.scheduler.chunk):
            state, _ = sampler.extend(state, [(0, [0], 0)], bucket=bucket)
            if rows > 1:
                state, _ = sampler.extend(state, [(0, [0], 0)], num_rows=rows, bucket=bucket)
        request = SamplingParams(max_new_tokens=3, temperature=0)
        state, _ = sampler.activate(state, 0, [0], request)
        sampler.compile_bucket(sampler.row_buckets[-1], sampler.key_buckets[-1])
        state, _ = sampler.generate(state, num_rows=1, num_keys=1, num_steps=1)
        state = sampler.release(state, 0)
        state = state.replace(cache=self.prefix_cache.warm_up(state.cache))
        jax.block_until_ready(state)
        self.scheduler.state = sampler.init_state()

    def _compile_rest(self) -> None:
        """Compiles the smaller decode buckets in the background, smallest first (each is
        used as soon as it is ready), then the prefill that also scores every prompt
        position (echo with logprobs: until it is compiled, the first such request compiles
        it)."""
        try:
            for rows, keys in self.sampler.buckets():
                if self._error is not None or self._closing:
                    return
                self.sampler.compile_bucket(rows, keys)
            if self.config.num_top_logprobs:
                for bucket in length_buckets(self.scheduler.chunk):
                    if self._error is not None or self._closing:
                        return
                    self.sampler.compile_extend(bucket, self.config.num_top_logprobs)
        except Exception:  # noqa: BLE001 - the largest bucket still serves everything.
            log.exception("compiling in the background failed")

    def _loop(self) -> bool:
        """One scheduler step with the queues synced. False = stop."""
        scheduler = self.scheduler
        with self._lock:
            while not (self._incoming or self._cancelled or self._closing or scheduler.busy):
                self._lock.wait()
            if self._error is not None:
                return False
            scheduler.waiting.extend(self._incoming)
            self._incoming = []
            # Counted at once: until the step ends, submit must still see them waiting.
            self._stats["waiting"] = len(scheduler.waiting)
            self._waiting_by_owner = collections.Counter(r.owner for r in scheduler.waiting)
            cancelled, self._cancelled = self._cancelled, set()
            expired = set()
            if self._closing and time.monotonic() > self._drain_deadline:
                expired = {r.id for r in scheduler.waiting} | {r.id for r in scheduler.running()}
        self._busy_since = time.monotonic()
        try:
            if cancelled:
                scheduler.cancel(cancelled)
            if expired:  # An error, not "abort": the client must retry elsewhere.
                scheduler.cancel(expired, "error", error=SHUTDOWN_ERROR)
            scheduler.step()
        finally:
            self._busy_since = None
        with self._lock:
            if self._error is not None:
                return False
            running = scheduler.running()
            self._stats = {
                "running": len(running),
                "waiting": len(scheduler.waiting),
                "kv_used": sum(len(r.prompt_ids) + r.completion_tokens for r in running),
            }
            self._waiting_by_owner = collections.Counter(r.owner for r in scheduler.waiting)
            done = self._closing and not self._incoming and not scheduler.busy
        self.metrics.occupancy(
            self._stats["running"],
            self._stats["waiting"],
            self._stats["kv_used"] / (self.config.num_slots * self.max_len),
        )
        return not done


def _thread_stack(name: str) -> str:
    import sys

    for thread in threading.enumerate():
        if thread.name == name and thread.ident in sys._current_frames():
            return "".join(traceback.format_stack(sys._current_frames()[thread.ident]))
    return ""
