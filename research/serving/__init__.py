"""Token generation: the jitted KV-cache sampler, its sampling settings and detokenization.

sampler.py     Sampler (prefill -> insert -> generate over fixed slots; extend, activate)
complete.py    complete(): many requests run to their end on a Sampler, Completion
sampling.py    SamplingParams (one request), per-slot arrays, choose_tokens
kv_cache.py    KVCache per layer and the Decoder's forward through it
detokenize.py  incremental detokenization and stop strings
reference.py   full-forward decoding, the oracle the sampler is tested against
"""

from research.serving.complete import Completion, encode_prompt
from research.serving.detokenize import IncrementalDetokenizer, StopStrings, TextStream
from research.serving.kv_cache import KVCache
from research.serving.reference import generate_reference
from research.serving.sampler import (
    DecodeState,
    Prefix,
    Sampler,
    Tokens,
    length_buckets,
    shard_params,
)
from research.serving.sampling import SamplingParams, SlotParams, choose_tokens, slot_params

__all__ = [
    "Completion",
    "DecodeState",
    "IncrementalDetokenizer",
    "KVCache",
    "Prefix",
    "Sampler",
    "SamplingParams",
    "SlotParams",
    "StopStrings",
    "TextStream",
    "Tokens",
    "choose_tokens",
    "encode_prompt",
    "generate_reference",
    "length_buckets",
    "shard_params",
    "slot_params",
]
