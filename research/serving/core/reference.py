"""Full-forward decoding: every new token re-runs the whole prefix, no KV cache.

Quadratic in length, but obviously correct: the oracle that a KV-cache sampler is tested
against, and enough for a demo's sample text. One jitted while-loop, no Python per token.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _generate(graphdef, params, tokens_l, prompt_len, num_new, temperature, key):
    model = nnx.merge(graphdef, params)

    def body(carry):
        index, tokens_l, key = carry
        logits_v = model(tokens_l[None])[0, index - 1]
        key, sample_key = jax.random.split(key)
        greedy = jnp.argmax(logits_v)
        sampled = jax.random.categorical(sample_key, logits_v / jnp.maximum(temperature, 1e-6))
        token = jnp.where(temperature > 0, sampled, greedy).astype(tokens_l.dtype)
        return index + 1, tokens_l.at[index].set(token), key

    def cond(carry):
        return carry[0] < prompt_len + num_new

    _, tokens_l, _ = jax.lax.while_loop(cond, body, (prompt_len, tokens_l, key))
    return tokens_l


def generate_reference(
    graphdef,
    params,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    max_seq_len: int,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[int]:
    """Returns the new token ids (greedy when temperature == 0).

    The buffer length is the model's context, so one compilation serves every prompt.
    """
    if not prompt_ids:
        raise ValueError("prompt_ids is empty; give at least one token (e.g. the BOS id).")
    num_new = max(0, min(max_new_tokens, max_seq_len - len(prompt_ids)))
    tokens_l = (
        jnp.zeros((max_seq_len,), jnp.int32)
        .at[: len(prompt_ids)]
        .set(jnp.asarray(prompt_ids, jnp.int32))
    )
    out = _generate(
        graphdef,
        params,
        tokens_l,
        len(prompt_ids),
        num_new,
        jnp.float32(temperature),
        jax.random.key(seed),
    )
    return [int(t) for t in out[len(prompt_ids) : len(prompt_ids) + num_new]]
