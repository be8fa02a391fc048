"""Token generation. reference.py: full-forward decoding (the oracle for the KV-cache sampler)."""

from research.serving.reference import generate_reference

__all__ = ["generate_reference"]
