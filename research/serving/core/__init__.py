"""The serving core: tokens in, tokens out.

sampler.py     Sampler: fixed slots; extend (prompts into slots) -> activate -> generate
               (bucketed decode calls) -> release
kv_cache.py    KVCache per layer and the Decoder's forward through it
kv_quant.py    the int8 cache: quantize on write, the attention products that read it
sampling.py    SamplingParams (one request), per-slot arrays, choose_tokens
detokenize.py  incremental detokenization and stop strings
reference.py   full-forward decoding, the oracle the sampler is tested against
"""

from research.serving.core.detokenize import IncrementalDetokenizer, StopStrings, TextStream
from research.serving.core.kv_cache import KVCache, key_buckets
from research.serving.core.reference import generate_reference
from research.serving.core.sampler import (
    DecodeState,
    Sampler,
    Tokens,
    length_buckets,
    row_buckets,
    shard_params,
)
from research.serving.core.sampling import SamplingParams, SlotParams, choose_tokens, slot_params

__all__ = [
    "DecodeState",
    "IncrementalDetokenizer",
    "KVCache",
    "Sampler",
    "SamplingParams",
    "SlotParams",
    "StopStrings",
    "TextStream",
    "Tokens",
    "choose_tokens",
    "generate_reference",
    "key_buckets",
    "length_buckets",
    "row_buckets",
    "shard_params",
    "slot_params",
]
