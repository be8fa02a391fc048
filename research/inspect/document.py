"""An Inspection (and a Comparison) as one JSON document: what `launch.inspect` writes as
page.json and what the HTML page is rendered from.

Arrays become lists (log-probabilities rounded to 4 decimals); token ids index `vocab`, the
text of every token the document names. Attention weights are stored compactly: per layer
and head, the lower triangle (query q, keys 0..q, row after row) as bytes round(255 w),
base64 (`attention.encoding`).
"""

import base64
import functools

import numpy as np

from research.inspect.probe import MAX_ATTENTION_TOKENS

FORMAT = "cirrus-inspect/1"
ATTENTION_ENCODING = "base64 of uint8 round(255 * w), lower triangle (q, k <= q) row by row"
_LOGPROB_FLOOR = -1000.0  # JSON has no -Infinity.


def token_text(tokenizer, token_id: int) -> str:
    """The text of one token as the page shows it: its decoded text, or, for a piece of a
    multi-byte character, its bytes as `\\xe2\\x80` escapes (byte-level BPE) or the
    tokenizer's own name for it (`<0xE2>`)."""
    if tokenizer is None:
        return f"<{token_id}>"
    text = tokenizer.decode([int(token_id)], skip_special_tokens=False)
    if text and "\ufffd" not in text:
        return text
    piece = tokenizer.hf_tokenizer.id_to_token(int(token_id))
    if piece is None:
        return f"<{token_id}>"
    alphabet = _byte_level_alphabet()
    if all(char in alphabet for char in piece):
        return bytes(alphabet[char] for char in piece).decode("utf-8", "backslashreplace")
    return piece


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (bytes_to_unicode), inverted: char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in chars:
            chars[byte] = chr(256 + extra)
            extra += 1
    return {char: byte for byte, char in chars.items()}


def _rounded(array) -> list:
    return np.round(np.maximum(np.asarray(array, np.float64), _LOGPROB_FLOOR), 4).tolist()


def encode_attention(weights_tt: np.ndarray) -> str:
    """[T, T] weights of one head -> the document's base64 string (ATTENTION_ENCODING)."""
    rows = np.tril_indices(weights_tt.shape[0])
    quantized = np.round(np.clip(weights_tt[rows], 0.0, 1.0) * 255).astype(np.uint8)
    return base64.b64encode(quantized.tobytes()).decode("ascii")


def decode_attention(encoded: str, length: int) -> np.ndarray:
    """The inverse of encode_attention: a [T, T] float32 array (zeros above the diagonal)."""
    weights_tt = np.zeros((length, length), np.float32)
    weights_tt[np.tril_indices(length)] = np.frombuffer(base64.b64decode(encoded), np.uint8) / 255
    return weights_tt


def document(
    inspection, *, tokenizer, prompt: str, model: dict, comparison=None, other: dict | None = None
) -> dict:
    """The JSON document (plain dicts, lists, numbers and strings).

    Args:
      inspection: an Inspection of the prompt.
      tokenizer: the model's Tokenizer (for token texts), or None (texts become "<id>").
      prompt: the prompt's text.
      model, other: descriptions of the inspected model and of the compared one (e.g.
        `describe(loaded)`).
      comparison: a Comparison against `other`, or None.
    """
    found = inspection
    ids = found.token_ids
    used = {int(i) for i in ids} | {found.target_token}
    used |= {int(i) for i in np.concatenate([found.top_ids.ravel(), found.lens_top_ids.ravel()])}
    if comparison is not None:
        used |= {int(i) for i in np.concatenate([comparison.base_top1, comparison.other_top1])}
    num_layers = found.lens_top_ids.shape[0] - 1
    out = {
        "format": FORMAT,
        "model": model,
        "prompt": prompt,
        "token_ids": ids.tolist(),
        "vocab": {str(i): token_text(tokenizer, i) for i in sorted(used)},
        # logprob[t]: log p(token t | tokens before it); None for the first token.
        # top_*[t]: the model's top next tokens after reading tokens 0..t.
        "next": {
            "logprob": [None, *_rounded(found.next_logprob)],
            "top_ids": found.top_ids.tolist(),
            "top_logprobs": _rounded(found.top_logprobs),
        },
        # Row 0 the embeddings, row l block l's output, each through final norm and head;
        # next_logprob[l][t]: log p(token t + 1) read at row l after tokens 0..t.
        "lens": {
            "rows": ["embeddings", *(f"block {layer}" for layer in range(1, num_layers + 1))],
            "top_ids": found.lens_top_ids.tolist(),
            "top_logprobs": _rounded(found.lens_top_logprobs),
            "next_logprob": _rounded(found.lens_next_logprob),
        },
        "attention": None,
        "attribution": {
            "position": found.target_position,
            "token": found.target_token,
            "logprob": round(float(found.target_logprob), 4),
            "method": "gradient x input: d log p(target) / d embedding, times the embedding",
            "grad_x_input": _rounded(found.attribution),
            "norm": _rounded(found.attribution_norm),
        },
        "compare": None,
    }
    if found.attention is not None:
        out["attention"] = {
            "max_tokens": MAX_ATTENTION_TOKENS,
            "layers": found.attention.shape[0],
            "heads": found.attention.shape[1],
            "encoding": ATTENTION_ENCODING,
            "data": [[encode_attention(head) for head in layer] for layer in found.attention],
        }
    if comparison is not None:
        out["compare"] = {
            "other": other,
            # Position t: the two models' predictions of token t + 1.
            "kl": np.round(comparison.kl, 6).tolist(),
            "base_top1": comparison.base_top1.tolist(),
            "other_top1": comparison.other_top1.tolist(),
            "changed": comparison.changed.tolist(),
            "order": comparison.order.tolist(),
        }
    return out


def describe(loaded, source: str) -> dict:
    """The page's description of a LoadedModel read from `source`."""
    config = loaded.model_config
    return {
        "source": source,
        "format": loaded.source.get("format") if loaded.source else None,
        "layers": config.num_layers,
        "heads": config.num_heads,
        "kv_heads": config.num_kv_heads,
        "d_model": config.d_model,
        "vocab_size": config.vocab_size,
        "quant": config.quant,
    }
