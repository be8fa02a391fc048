"""Dense kernels packed in column panels (research/serving/core/packed.py): the C++ matmul
equals NumPy on both ISA paths, a packed Dense equals the unpacked one, and a Sampler that
packs decodes the tokens the unpacked model's full forward chooses."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.model.dense import Dense
from research.model.embedding import Embedding
from research.serving import Sampler, SamplingParams, complete, generate_reference
from research.serving.core import packed
from tests.serving.helpers import FAMILIES, cpu_has, random_split, run_isa_check

_MATMUL_CHECK = """
import dataclasses
import numpy as np, jax, jax.numpy as jnp
from research.serving.core import packed
from tests.serving.helpers import LLAMA
rng = np.random.default_rng(0)
# Rows 1..17 (one and two 16-row slices, passes of 8 and less), K off the vector width.
for m, k, n in [(1, 5, 32), (3, 33, 96), (8, 576, 192), (9, 40, 64), (16, 70, 128), (17, 3, 32),
                (130, 64, 64)]:
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32)
    got = jax.jit(packed.dot)(jnp.asarray(x), packed.pack(jnp.asarray(w)))
    want = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-4)
# The portable loop is slower than XLA's dot with several rows: a Sampler packs only on AVX-512.
config = dataclasses.replace(LLAMA, dtype="float32")
assert packed.should_pack(config, None) == (packed.isa() == "avx512"), packed.isa()
print("isa", packed.isa())
"""


@pytest.mark.parametrize("portable", [False, True], ids=["cpu_default", "portable"])
def test_packed_matmul_equals_numpy(portable):
    """The loop this CPU gets (AVX-512 where it has avx512f) and the portable one, each in its
    own process (the choice is made once per process)."""
    assert packed.available(), f"{packed.LIBRARY}: run `make kernels`"
    wide = cpu_has("avx512f") and not portable
    run_isa_check(_MATMUL_CHECK, "CIRRUS_PACKED_ISA", portable, "avx512" if wide else "portable")


def test_pack_round_trip_and_reference():
    w = np.arange(6 * 64, dtype=np.float32).reshape(6, 64)
    packed_bkp = packed.pack(jnp.asarray(w))
    assert packed_bkp.shape == (2, 6, 32)
    np.testing.assert_array_equal(np.asarray(packed_bkp[1, 2]), w[2, 32:])
    np.testing.assert_array_equal(np.asarray(packed.unpack(packed_bkp)), w)
    x = np.random.default_rng(0).standard_normal((40, 6)).astype(np.float32)
    np.testing.assert_allclose(packed.reference(jnp.asarray(x), packed_bkp), x @ w, rtol=1e-5)
    np.testing.assert_allclose(packed.dot(jnp.asarray(x), packed_bkp), x @ w, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 4, 16, 33])  # Decode steps and a prefill chunk.
def test_a_packed_multi_axis_dense_equals_the_unpacked_one(rows):
    """[D] -> [N, H] (q projection) and [N, H] -> [D] (out projection), with a bias."""
    for in_features, out_features in [((48,), (4, 16)), ((4, 16), (64,))]:
        dense = Dense(
            in_features,
            out_features,
            in_axes=(None,) * len(in_features),
            out_axes=(None,) * len(out_features),
            use_bias=True,
            kernel_init=nnx.initializers.normal(1.0),
            rngs=nnx.Rngs(0),
        )
        dense.bias.value = jnp.arange(np.prod(out_features), dtype=jnp.float32).reshape(
            out_features
        )
        x = jax.random.normal(jax.random.key(1), (rows, 1, *in_features))
        want = dense(x)
        graphdef, params = nnx.split(dense, nnx.Param)
        graphdef, params = packed.pack_params(graphdef, params)
        packed_dense = nnx.merge(graphdef, params)
        assert packed.is_packed(packed_dense)
        np.testing.assert_allclose(packed_dense(x), want, rtol=1e-5, atol=1e-4)
        again = packed.pack_params(graphdef, params)[1]  # Already packed: left as it is.
        assert jax.tree.all(jax.tree.map(lambda a, b: a.shape == b.shape, again, params))


def test_a_packed_tied_head_looks_up_and_scores_as_the_table_does():
    """The tied head's [V, D] table packed as the kernel [D, V]: lookups (out-of-range ids
    clipped, as before) and logits equal the unpacked table's."""
    vocab, dim = 96, 40
    embedding = Embedding(vocab, dim, init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(0))
    table = np.asarray(embedding.embedding[...])
    tokens = jnp.asarray([[0, 31, 32, 95], [64, 5, -3, 200]])
    x = jax.random.normal(jax.random.key(1), (3, 5, dim))
    want_rows, want_logits = embedding(tokens), embedding.attend(x)
    embedding.embedding.value = packed.pack(jnp.asarray(table).T)
    assert embedding.embedding.shape == (vocab // packed.PANEL, dim, packed.PANEL)
    np.testing.assert_array_equal(embedding(tokens), want_rows)
    np.testing.assert_array_equal(embedding(tokens)[0, 2], table[32])
    np.testing.assert_allclose(embedding.attend(x), want_logits, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(embedding.attend(x), np.asarray(x) @ table.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_packing_sampler_decodes_the_unpacked_models_greedy_tokens(family):
    # Widths that are multiples of the panel (32), so that every projection is packed.
    widths = dict(d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=96)
    config = dataclasses.replace(FAMILIES[family], vocab_size=64, **widths)
    graphdef, params = random_split(config, seed=1)
    sampler = Sampler(config, graphdef, params, num_slots=4, steps_per_call=4)
    assert sampler.packed == (packed.available() and packed.isa() == "avx512")
    if sampler.packed:
        kernels = [x for p, x in nnx.to_flat_state(sampler.params) if p[-1] == "kernel"]
        assert any(x.ndim == 3 and x.shape[-1] == packed.PANEL for x in kernels)
        table = dict(nnx.to_flat_state(sampler.params))[("embedding", "embedding")]
        assert table.ndim == (3 if config.tie_embeddings else 2)  # GPT-2's head is tied.
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    results = complete(sampler, prompts, SamplingParams(max_new_tokens=8, temperature=0.0))
    for prompt, result in zip(prompts, results, strict=True):
        want = generate_reference(
            graphdef, params, prompt, max_new_tokens=8, max_seq_len=config.max_seq_len
        )
        assert result.token_ids == want
