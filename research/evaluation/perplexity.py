"""Loss, perplexity, bits per byte and next-token accuracy of whole documents.

Each document is scored as in training: bos (where the tokenizer puts bos first), its tokens,
then eos (unless append_eos=False), every token after the first a target exactly once.
Documents longer than the window are scored with a sliding window (Hugging Face's
"perplexity of fixed-length models"): windows of `seq_len` inputs start every `stride`
tokens, and each scores only the targets the previous window did not, so every target sees
at least seq_len - stride tokens of context (all before it, near the start). stride =
seq_len gives disjoint windows.

Bits per byte = total negative log-likelihood / ln 2 / UTF-8 bytes of the text: unlike
per-token loss, comparable across tokenizers.
"""

import math

import numpy as np

from research.errors import UserError
from research.evaluation.scoring import Span, score_spans


def windows(tokens, seq_len: int, stride: int) -> list[Span]:
    """Spans covering every target of `tokens` ([n + 1] ids) once; see the module docstring."""
    if not 1 <= stride <= seq_len:
        raise UserError(f"eval.stride={stride} must be in [1, eval.seq_len={seq_len}].")
    tokens = np.asarray(tokens, np.int32)
    n = len(tokens) - 1
    spans, previous_end, begin = [], 0, 0
    while previous_end < n:
        end = min(begin + seq_len, n)
        spans.append(Span(tokens[begin : end + 1], score_from=previous_end - begin))
        previous_end = end
        begin += stride
    return spans


def document_tokens(tokenizer, text: str, *, append_eos: bool = True) -> list[int]:
    """bos (where the tokenizer puts it first), the text, eos: `Tokenizer.document`."""
    return tokenizer.document(text, append_eos=append_eos)


def evaluate_documents(
    graphdef,
    params,
    documents: list,
    *,
    num_bytes: int,
    seq_len: int,
    stride: int = 0,
    batch_size: int = 8,
    mesh=None,
) -> dict:
    """Metrics over token documents (each [bos, ..., eos]) whose text has num_bytes bytes.

    Returns:
      {"loss", "perplexity", "bits_per_byte", "accuracy", "tokens", "bytes", "documents"}.
    """
    spans = [
        s for doc in documents if len(doc) > 1 for s in windows(doc, seq_len, stride or seq_len)
    ]
    if not spans:
        raise UserError("nothing to evaluate: every document is empty.")
    scores = score_spans(graphdef, params, spans, seq_len=seq_len, batch_size=batch_size, mesh=mesh)
    nll = -sum(float(s.logprobs.sum()) for s in scores)
    tokens = sum(len(s.logprobs) for s in scores)
    correct = sum(int(s.correct.sum()) for s in scores)
    loss = nll / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": nll / math.log(2) / max(num_bytes, 1),
        "accuracy": correct / tokens,
        "tokens": tokens,
        "bytes": num_bytes,
        "documents": len(documents),
    }


def evaluate_texts(
    graphdef, params, tokenizer, texts: list[str], *, append_eos: bool = True, **kwargs
) -> dict:
    """`evaluate_documents` of raw texts (tokenized here, bos + text + eos)."""
    documents = [document_tokens(tokenizer, text, append_eos=append_eos) for text in texts]
    num_bytes = sum(len(text.encode("utf-8")) for text in texts)
    return evaluate_documents(graphdef, params, documents, num_bytes=num_bytes, **kwargs)
