"""Compression: quantization (quantize.py, kernel.py), evaluation against the original
(evaluate.py); pruning and distillation follow (ARCHITECTURE.md)."""
