"""Requests over slots: one scheduler, driven on a thread (the server) or in the caller's
thread (`complete`).

scheduler.py     Scheduler: admission, prefix reuse, chunked / batched prefill, bucketed
                 decode, detokenization, per-request failure isolation; Output events
engine.py        Engine (EngineConfig `serve.*`): the scheduler on a thread, queues, owner
                 shares, watchdog, drain
complete.py      complete(): many requests to their end in the caller's thread; Completion
prefix_cache.py  PrefixCache: prompt blocks reused across requests of one owner
metrics.py       ServingMetrics: Prometheus, vLLM names
"""

from research.serving.engine.complete import Completion, complete
from research.serving.engine.engine import Engine, EngineClosed, EngineConfig, QueueFull
from research.serving.engine.metrics import ServingMetrics
from research.serving.engine.prefix_cache import PrefixCache
from research.serving.engine.scheduler import Output, Request, Scheduler

__all__ = [
    "Completion",
    "Engine",
    "EngineClosed",
    "EngineConfig",
    "Output",
    "PrefixCache",
    "QueueFull",
    "Request",
    "Scheduler",
    "ServingMetrics",
    "complete",
]
