"""Plain NumPy (float64) versions of every layer, written from the papers / HF formulas.

They share no code with research/model: each test feeds them the module's own parameters.
"""

import numpy as np


def rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def layer_norm(x, scale, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def rope(x, positions, theta):
    """HF Llama: x * cos + rotate_half(x) * sin with emb = cat(freqs, freqs). x [B,T,N,H]."""
    h = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, h, 2) / h)
    freqs = positions[..., None].astype(np.float64) * inv_freq  # [B, T, H/2]
    emb = np.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    rotate_half = np.concatenate([-x[..., h // 2 :], x[..., : h // 2]], axis=-1)
    return x * np.cos(emb) + rotate_half * np.sin(emb)


def silu(x):
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def dense(x, p, contract=1):
    """Contracts the last `contract` axes of x with the first of p['kernel']."""
    y = np.tensordot(x, p["kernel"], axes=contract)
    return y + p["bias"] if "bias" in p else y


def swiglu(x, p):
    return dense(silu(dense(x, p["gate_proj"])) * dense(x, p["up_proj"]), p["down_proj"])


def gelu_mlp(x, p):
    return dense(gelu_tanh(dense(x, p["fc"])), p["proj"])


def mask(segment_ids):
    """[B, T, T]: causal, same nonzero segment, plus the diagonal (padding sees itself)."""
    b, t = segment_ids.shape
    out = np.zeros((b, t, t), bool)
    for i in range(b):
        for q in range(t):
            for k in range(q + 1):
                same = segment_ids[i, q] == segment_ids[i, k] and segment_ids[i, q] != 0
                out[i, q, k] = same or q == k
    return out


def attention(x, p, positions, mask_bts, rope_theta, weights=None):
    """Grouped-query attention with one loop over query heads; head n uses kv head n // G.

    weights: a list that gets this layer's softmax weights [B, N, T, S] appended, or None."""
    q, k, v = dense(x, p["q_proj"]), dense(x, p["k_proj"]), dense(x, p["v_proj"])
    if rope_theta is not None:
        q, k = rope(q, positions, rope_theta), rope(k, positions, rope_theta)
    n, kv_heads, h = q.shape[2], k.shape[2], q.shape[3]
    out = np.zeros_like(q)
    all_probs = np.zeros((q.shape[0], n, q.shape[1], k.shape[1]))
    for head in range(n):
        kv = head // (n // kv_heads)
        logits = np.einsum("bth,bsh->bts", q[:, :, head], k[:, :, kv]) / np.sqrt(h)
        logits = np.where(mask_bts, logits, -np.inf)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        all_probs[:, head] = probs
        out[:, :, head] = np.einsum("bts,bsh->bth", probs, v[:, :, kv])
    if weights is not None:
        weights.append(all_probs)
    return dense(out, p["o_proj"], contract=2)


def decoder(params, config, tokens, positions, segment_ids, weights=None):
    """Full forward from a nested dict of the Decoder's parameters. Returns [B, T, V] logits.

    weights: a list that gets each layer's attention weights [B, N, T, T] appended, or None."""

    def norm(x, p):
        if config.norm == "rmsnorm":
            return rms_norm(x, p["scale"], config.norm_eps)
        return layer_norm(x, p["scale"], p["bias"], config.norm_eps)

    table = params["embedding"]["embedding"]
    x = table[tokens]
    if config.positions == "learned":
        x = x + params["position_embedding"]["embedding"][positions]
    rope_theta = config.rope_theta if config.positions == "rope" else None
    mask_bts = mask(segment_ids)
    for i in range(config.num_layers):
        p = params["layers"][i]
        x = x + attention(
            norm(x, p["attention_norm"]), p["attention"], positions, mask_bts, rope_theta, weights
        )
        mlp = swiglu if config.mlp_activation == "swiglu" else gelu_mlp
        x = x + mlp(norm(x, p["mlp_norm"]), p["mlp"])
    x = norm(x, params["final_norm"])
    if config.tie_embeddings:
        return x @ table.T
    return x @ params["lm_head"]["kernel"]
