"""Parameters are born sharded on the specs RULES implies; activations keep batch sharding."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from research.model import Decoder, ModelConfig
from research.sharding import AUTO3, MESH_AXES, RULES, logical_to_spec

# Every dim divisible by the mesh axes it is sharded over (2 each).
LLAMA = ModelConfig(
    vocab_size=64,
    d_model=16,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=32,
    max_seq_len=8,
    tie_embeddings=False,
)
GPT2 = LLAMA.replace(
    num_kv_heads=4,
    positions="learned",
    norm="layernorm",
    mlp_activation="gelu",
    use_bias=True,
    tie_embeddings=True,
)

# The logical axes each parameter must carry, by the last two parts of its path.
EXPECTED_AXES = {
    ("embedding", "embedding"): ("vocab", "embed"),
    ("position_embedding", "embedding"): (None, "embed"),
    ("q_proj", "kernel"): ("embed", "heads", "head_dim"),
    ("k_proj", "kernel"): ("embed", "kv_heads", "head_dim"),
    ("v_proj", "kernel"): ("embed", "kv_heads", "head_dim"),
    ("o_proj", "kernel"): ("heads", "head_dim", "embed"),
    ("q_proj", "bias"): ("heads", "head_dim"),
    ("k_proj", "bias"): ("kv_heads", "head_dim"),
    ("v_proj", "bias"): ("kv_heads", "head_dim"),
    ("o_proj", "bias"): ("embed",),
    ("gate_proj", "kernel"): ("embed", "mlp"),
    ("up_proj", "kernel"): ("embed", "mlp"),
    ("down_proj", "kernel"): ("mlp", "embed"),
    ("fc", "kernel"): ("embed", "mlp"),
    ("fc", "bias"): ("mlp",),
    ("proj", "kernel"): ("mlp", "embed"),
    ("proj", "bias"): ("embed",),
    ("attention_norm", "scale"): ("embed",),
    ("attention_norm", "bias"): ("embed",),
    ("mlp_norm", "scale"): ("embed",),
    ("mlp_norm", "bias"): ("embed",),
    ("final_norm", "scale"): ("embed",),
    ("final_norm", "bias"): ("embed",),
    ("lm_head", "kernel"): ("embed", "vocab"),
}


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 2, 2), MESH_AXES, axis_types=AUTO3)


def test_act_embed_is_replicated():
    assert dict(RULES)["act_embed"] is None
    assert logical_to_spec(("batch", "seq", "act_embed")) == logical_to_spec(("batch", None, None))


@pytest.fixture(scope="module", params=[LLAMA, GPT2], ids=["llama", "gpt2"])
def sharded_model(request, mesh):
    """(config, model) created under the mesh and the logical rules: born sharded."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
        return request.param, Decoder(request.param, rngs=nnx.Rngs(0))


def test_parameters_are_born_sharded(mesh, sharded_model):
    _, model = sharded_model
    seen = set()
    for path, variable in nnx.state(model, nnx.Param).flat_state():
        key = tuple(str(part) for part in path[-2:])
        axes = EXPECTED_AXES[key]
        seen.add(key)
        assert variable.get_metadata()["out_sharding"] == axes, path
        array = variable[...]
        want = NamedSharding(mesh, logical_to_spec(axes))
        assert array.sharding.is_equivalent_to(want, array.ndim), (path, array.sharding.spec)
    assert ("embedding", "embedding") in seen and ("attention_norm", "scale") in seen


def test_sharded_forward_matches_single_device(mesh, sharded_model):
    config, model = sharded_model
    tokens = jax.random.randint(jax.random.key(0), (4, 8), 0, config.vocab_size)
    graphdef, state = nnx.split(model)

    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
        logits = jax.jit(forward)(state, tokens)
    batch_vocab = NamedSharding(mesh, logical_to_spec(("batch", "seq", "vocab")))
    assert logits.sharding.is_equivalent_to(batch_vocab, 3)
    single_device = jax.jit(forward)(jax.device_get(state), tokens)
    assert jnp.allclose(logits, single_device, atol=1e-5)
