"""Serving, in three layers (each imports only the ones above it):

core/    tokens in, tokens out: Sampler, KV cache, sampling, detokenization
engine/  requests over slots: one Scheduler (threaded Engine, synchronous complete()),
         prefix cache, metrics
http/    the OpenAI API: FastAPI server, endpoints, request validation, chat templates

The names most callers need are here; the HTTP layer is imported from research.serving.http
(it pulls in FastAPI).
"""

from research.serving.core import (
    DecodeState,
    IncrementalDetokenizer,
    KVCache,
    Sampler,
    SamplingParams,
    SlotParams,
    StopStrings,
    TextStream,
    Tokens,
    choose_tokens,
    generate_reference,
    key_buckets,
    length_buckets,
    row_buckets,
    shard_params,
    slot_params,
)
from research.serving.engine import Completion, Engine, EngineConfig, complete

__all__ = [
    "Completion",
    "DecodeState",
    "Engine",
    "EngineConfig",
    "IncrementalDetokenizer",
    "KVCache",
    "Sampler",
    "SamplingParams",
    "SlotParams",
    "StopStrings",
    "TextStream",
    "Tokens",
    "choose_tokens",
    "complete",
    "generate_reference",
    "key_buckets",
    "length_buckets",
    "row_buckets",
    "shard_params",
    "slot_params",
]
