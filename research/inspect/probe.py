"""What a model computes on one prompt, read from the real Decoder: next-token
log-probabilities with top-k alternatives, the logit lens, attention weights and gradient x
input attribution, as NumPy arrays.

    loaded = load("runs/smollm2")                       # research.checkpoint.load: any source
    ids = loaded.tokenizer.encode_prompt("The capital of France is")
    found = inspect_prompt(loaded, ids, top_k=5)        # an Inspection

Capture: `Decoder.capture_residual` and `Attention.capture_weights` are off in every model
(it computes as always and stores nothing). Here they are switched on in a copy merged inside
one jitted call, run under `nnx.capture(..., nnx.Intermediate)`: `Decoder.features` sows the
residual stream (the embeddings, then each block's output) and perturbs the embeddings
(`Module.perturb`), and each Attention sows the softmax weights of its unfused path
(`attention_with_weights`). One forward and one backward pass (the target's log-probability
differentiated with respect to that perturbation) give every array. Float, quantized and
LoRA models all run through the same Decoder.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.errors import UserError

# Attention weights are [L, N, T, T]: prompts for them are capped at this many tokens (the
# page and its JSON stay a few MB on a 30-layer, 9-head model). The other arrays take any
# prompt up to the model's context.
MAX_ATTENTION_TOKENS = 128
# The prompt is padded to a multiple of this (at least this) before the jitted call: the
# quantized matmul's C++ kernel, used for up to 8 rows, has no gradient, and the causal mask
# keeps the padding from changing anything before it. It also buckets the compiled shapes.
_PAD_TO = 16


@dataclasses.dataclass(frozen=True)
class Inspection:
    """One prompt through one model; T prompt tokens, L layers, N heads, k alternatives.

    Position t holds what the model predicts after reading tokens 0..t (the prediction of
    token t + 1). Logit-lens row 0 is the embeddings, row l the output of block l, each
    through the final norm and the LM head; row L is the model's own output.
    """

    token_ids: np.ndarray  # [T] int32: the prompt.
    logprobs: np.ndarray  # [T, V] float32: log p(next token | tokens 0..t).
    next_logprob: np.ndarray  # [T - 1] float32: log p(token t + 1 | tokens 0..t).
    top_ids: np.ndarray  # [T, k] int32: the k most likely next tokens, most likely first.
    top_logprobs: np.ndarray  # [T, k] float32.
    lens_top_ids: np.ndarray  # [L + 1, T, k] int32.
    lens_top_logprobs: np.ndarray  # [L + 1, T, k] float32.
    lens_next_logprob: np.ndarray  # [L + 1, T - 1] float32: of the actual next token.
    attention: np.ndarray | None  # [L, N, T, T] float32 (query, key) softmax weights or None.
    target_position: int  # The attributed token's index in 1..T (T: the token after the prompt).
    target_token: int
    target_logprob: float  # log p(target_token | tokens before target_position).
    attribution: np.ndarray  # [T] float32: sum over D of gradient x embedding.
    attribution_norm: np.ndarray  # [T] float32: L2 norm over D of gradient x embedding.


def inspect_prompt(
    loaded,
    token_ids,
    *,
    top_k: int = 5,
    attention: bool = True,
    target: tuple[int, int | None] | None = None,
) -> Inspection:
    """Everything in `Inspection` for one prompt.

    Args:
      loaded: a LoadedModel (research.checkpoint.load), or anything with `model_config`,
        `graphdef` and `params`.
      token_ids: [T] int prompt ids, tokenized as the model expects (`encode_prompt`).
      top_k: alternatives kept per position and logit-lens cell.
      attention: capture the attention weights (T <= MAX_ATTENTION_TOKENS).
      target: (position, token) to attribute: position in 1..T (T = the token after the
        prompt); token None = the prompt's token there, or at T the model's top choice.
        Default (T, None).
    """
    config = loaded.model_config
    ids = np.asarray(token_ids, np.int64).reshape(-1)
    t = len(ids)
    if t == 0:
        raise UserError("token_ids is empty; give at least one prompt token.")
    if t > config.max_seq_len:
        raise UserError(
            f"the prompt has {t} tokens but the model's context is {config.max_seq_len}; "
            "shorten it."
        )
    if attention and t > MAX_ATTENTION_TOKENS:
        raise UserError(
            f"the prompt has {t} tokens; attention weights are captured for at most "
            f"{MAX_ATTENTION_TOKENS}. Shorten it or leave the attention out."
        )
    if ids.min() < 0 or ids.max() >= config.vocab_size:
        raise UserError(
            f"token ids must be in [0, {config.vocab_size}); got {ids.min()}..{ids.max()}."
        )
    if not 1 <= top_k <= config.vocab_size:
        raise UserError(f"top_k={top_k} must be in [1, {config.vocab_size}].")
    position, token = target if target is not None else (t, None)
    if not 1 <= position <= t:
        raise UserError(
            f"target position {position} must be in [1, {t}]: a prompt token after the first, "
            f"or {t}, the token after the prompt."
        )
    if token is None:
        token = int(ids[position]) if position < t else -1  # -1: the model's top choice.
    elif not 0 <= token < config.vocab_size:
        raise UserError(f"target token {token} must be an id in [0, {config.vocab_size}).")

    padded = max(_PAD_TO, -(-t // _PAD_TO) * _PAD_TO)
    padded = max(t, min(padded, config.max_seq_len))
    tokens_1t = np.zeros((1, padded), np.int32)
    tokens_1t[0, :t] = ids
    out = jax.device_get(
        _probe(loaded.graphdef, loaded.params, tokens_1t, position, token, top_k, attention)
    )
    f32 = functools.partial(np.asarray, dtype=np.float32)
    nexts = ids[1:, None]
    logprobs = f32(out["logprobs"][:t])
    return Inspection(
        token_ids=ids.astype(np.int32),
        logprobs=logprobs,
        next_logprob=np.take_along_axis(logprobs[: t - 1], nexts, axis=1)[:, 0],
        top_ids=np.asarray(out["top_ids"][:t], np.int32),
        top_logprobs=f32(out["top_logprobs"][:t]),
        lens_top_ids=np.asarray(out["lens_top_ids"][:, :t], np.int32),
        lens_top_logprobs=f32(out["lens_top_logprobs"][:, :t]),
        lens_next_logprob=f32(out["lens_next_logprob"][:, : t - 1]),
        attention=f32(out["attention"][:, :, :t, :t]) if attention else None,
        target_position=position,
        target_token=int(out["target_token"]),
        target_logprob=float(out["target_logprob"]),
        attribution=f32(out["attribution"][:t]),
        attribution_norm=f32(out["attribution_norm"][:t]),
    )


def _captured(graphdef, params, attention: bool):
    """The model merged with its capture switches on (a fresh copy: the caller's model is
    never changed)."""
    model = nnx.merge(graphdef, params)
    model.capture_residual = True
    for block in model.layers:
        block.attention.capture_weights = attention
    return model


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _probe(graphdef, params, tokens_1t, position, token, top_k: int, attention: bool):
    """One forward and backward pass; a dict of arrays over the padded length (see
    inspect_prompt). position: the target's index; token: its id, or -1 for the top choice."""

    def target_logprob(perturbation):
        model = _captured(graphdef, params, attention)
        logits_1tv, sown = nnx.capture(model, nnx.Intermediate, init=perturbation)(tokens_1t)
        logprobs_tv = jax.nn.log_softmax(logits_1tv[0].astype(jnp.float32), axis=-1)
        row_v = logprobs_tv[position - 1]
        chosen = jnp.where(token < 0, jnp.argmax(jax.lax.stop_gradient(row_v)), token)
        return row_v[chosen], (logprobs_tv, chosen, sown)

    model = nnx.merge(graphdef, params)  # Plain: the logit lens's final norm and head.
    config = model.config
    zeros = jnp.zeros((*tokens_1t.shape, config.d_model), jnp.dtype(config.dtype))
    perturbation = nnx.State({"embeddings": nnx.Perturbation(zeros)})
    grad = jax.value_and_grad(target_logprob, has_aux=True)
    (value, (logprobs_tv, chosen, sown)), grads = grad(perturbation)

    residual_l1td = jnp.stack(sown["residual"].get_value())  # [L + 1, 1, T, D]
    embeddings_td = residual_l1td[0, 0].astype(jnp.float32)
    product_td = grads["embeddings"].get_value()[0].astype(jnp.float32) * embeddings_td
    next_t1 = tokens_1t[0, 1:, None]

    def lens(x_1td):
        logprobs = jax.nn.log_softmax(model.unembed(x_1td)[0].astype(jnp.float32), axis=-1)
        top_logprobs, top_ids = jax.lax.top_k(logprobs, top_k)
        next_logprob = jnp.take_along_axis(logprobs[:-1], next_t1, axis=1)[:, 0]
        return top_ids, top_logprobs, next_logprob

    lens_top_ids, lens_top_logprobs, lens_next_logprob = jax.lax.map(lens, residual_l1td)
    top_logprobs, top_ids = jax.lax.top_k(logprobs_tv, top_k)
    out = {
        "logprobs": logprobs_tv,
        "top_ids": top_ids,
        "top_logprobs": top_logprobs,
        "lens_top_ids": lens_top_ids,
        "lens_top_logprobs": lens_top_logprobs,
        "lens_next_logprob": lens_next_logprob,
        "target_token": chosen,
        "target_logprob": value,
        "attribution": product_td.sum(-1),
        "attribution_norm": jnp.sqrt(jnp.sum(product_td**2, axis=-1)),
    }
    if attention:
        layers = sown["layers"]
        out["attention"] = jnp.stack(
            [layers[i]["attention"]["weights"].get_value()[0][0] for i in range(len(layers))]
        )  # [L, N, T, T]
    return out
