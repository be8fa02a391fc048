"""Inspecting a model on one prompt: logit lens, attention, attributions, model diff, and
the one HTML page that shows them (`python -m launch.inspect`).

probe.py: `inspect_prompt` -> Inspection (NumPy arrays captured from the real Decoder with
NNX's sow / perturb); compare.py: `compare` two models of one vocabulary -> Comparison (KL
per position, top-1 changes); document.py: both as one JSON document; page.py (+ page_assets.py,
its CSS and script): the document as a self-contained HTML page.
"""

from research.inspect.compare import (
    Comparison,
    check_same_vocabulary,
    compare,
    compare_logprobs,
    next_token_logprobs,
)
from research.inspect.document import describe, document, token_text
from research.inspect.page import render, write
from research.inspect.probe import MAX_ATTENTION_TOKENS, Inspection, inspect_prompt

__all__ = [
    "MAX_ATTENTION_TOKENS",
    "Comparison",
    "Inspection",
    "check_same_vocabulary",
    "compare",
    "compare_logprobs",
    "describe",
    "document",
    "inspect_prompt",
    "next_token_logprobs",
    "render",
    "token_text",
    "write",
]
