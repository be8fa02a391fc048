"""launch.compress end to end on a tiny model: stages, report, and a run that serves."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from research.checkpoint import load, save_as_run
from research.checkpoint.load import from_pretrained
from research.checkpoint.pretrained import Pretrained
from research.compression import quantize
from research.data import default_corpus_documents, train_tokenizer
from research.model import Decoder, ModelConfig
from research.serving import Sampler, SamplingParams
from tests.launch.test_sample_eval import run_module
from tests.model.helpers import random_model

CONFIG = ModelConfig(
    vocab_size=320, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, mlp_dim=64,
    max_seq_len=128, tie_embeddings=True,
)  # fmt: skip
QUICK = [
    "compress.eval_tokens = 1024",
    "compress.eval_window = 64",
    "compress.speed_tokens = 8",
    "compress.speed_reps = 1",
    "compress.calibration_sequences = 4",
    "compress.calibration_len = 32",
]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny random Cirrus run with a real (small) tokenizer."""
    directory = tmp_path_factory.mktemp("compress") / "source"
    tokenizer = train_tokenizer(default_corpus_documents()[:30], CONFIG.vocab_size)
    model = random_model(lambda: Decoder(CONFIG, rngs=nnx.Rngs(0)), scale=0.3)
    params = nnx.state(model, nnx.Param)
    pretrained = Pretrained(CONFIG, params, {"format": "random", "path": "test"}, tokenizer)
    save_as_run(str(directory), pretrained, log=lambda _: None)
    return directory, params


def _greedy(model, prompt, new=8):
    sampler = Sampler(model.model_config, model.graphdef, model.params, num_slots=1, max_len=64)
    state = sampler.init_state()
    state, _ = sampler.extend(state, [(0, prompt, 0)])
    request = SamplingParams(max_new_tokens=new, temperature=0.0)
    state, first = sampler.activate(state, 0, prompt, request)
    state, out = sampler.generate(state, num_rows=1, num_keys=64, num_steps=new - 1)
    rest = [t for t in np.asarray(out.tokens)[0].tolist() if t >= 0]
    return [int(np.asarray(first.tokens)[0, 0]), *rest]


def _compress(source_dir, workdir, bindings):
    return run_module(
        "launch.compress",
        [f"--from={source_dir}", f"--workdir={workdir}"]
        + [f"--gin_bindings={b}" for b in QUICK + bindings],
    )


@pytest.mark.slow
def test_int8_run_saved_restored_and_sampled_gives_the_same_greedy_text(source, tmp_path):
    source_dir, params = source
    result = _compress(source_dir, tmp_path / "int8", ["compress.baselines = ['q8_0']"])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "int8" / "compress_report.json").read_text())
    rows = report["models"]
    assert set(rows) == {"original (fp32)", "int8 g32 rtn", "llama.cpp Q8_0"}
    int8 = rows["int8 g32 rtn"]
    assert 0 < int8["kl"] < 0.01 and int8["top1"] > 0.9 and int8["weight_ratio"] < 0.3
    assert rows["original (fp32)"]["decode_tokens_per_s"] > 0 and int8["speedup"] > 0
    assert (tmp_path / "int8" / "compress_report.md").read_text().count("|") > 20
    assert (tmp_path / "int8" / "compress_report.png").stat().st_size > 5000

    restored = load(str(tmp_path / "int8"), log=lambda _: None)
    assert restored.model_config.quant == "int8"
    qconfig, qparams = quantize.quantize_params(CONFIG, params, "int8")
    for path, leaf in jax.tree_util.tree_leaves_with_path(restored.params.to_pure_dict()):
        expected = qparams
        for key in path:
            expected = expected[key.key]
        np.testing.assert_array_equal(np.asarray(leaf), expected)
    prompt = restored.tokenizer.encode("Once more unto the breach")
    in_memory = from_pretrained(Pretrained(qconfig, qparams, {}, restored.tokenizer))
    greedy = _greedy(restored, prompt)
    assert len(greedy) >= 7 and greedy == _greedy(in_memory, prompt)

    sample = run_module(
        "launch.sample",
        [f"--workdir={tmp_path / 'int8'}", "--prompt=Once more", "--max_new_tokens=6"]
        + ["--temperature=0"],
    )
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert "Once more" in sample.stdout


@pytest.mark.slow
def test_prune_then_gptq_int4_chain(source, tmp_path):
    source_dir, _ = source
    bindings = [
        "compress.stages = ['prune', 'distill', 'quantize']",
        "compress.prune_layers = 1",
        "compress.distill_steps = 4",
        "compress.distill_seq_len = 16",
        "compress.quant = 'int4'",
        "compress.method = 'gptq'",
        "compress.baselines = []",
    ]
    result = _compress(source_dir, tmp_path / "chain", bindings)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "chain" / "compress_report.json").read_text())["models"]
    assert list(rows) == [
        "original (fp32)", "pruned -1 layers", "distilled 4 steps", "int4 g32 gptq"
    ]  # fmt: skip
    assert rows["int4 g32 gptq"]["weight_ratio"] < rows["pruned -1 layers"]["weight_ratio"] < 1
    assert rows["distilled 4 steps"]["ppl"] != rows["pruned -1 layers"]["ppl"]
    assert (tmp_path / "chain" / "distill_loss.png").stat().st_size > 5000
    restored = load(str(tmp_path / "chain"), log=lambda _: None)
    assert restored.model_config.num_layers == 2 and restored.model_config.quant == "int4"
    assert "dropping layers [1]" in result.stdout


def _zero_fraction(params, paths):
    leaves = [np.asarray(_at(params, path)) for path in paths]
    return sum(int((x == 0).sum()) for x in leaves) / sum(x.size for x in leaves)


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


@pytest.mark.slow
def test_wanda_two_of_four_stays_sparse_through_distillation(source, tmp_path):
    source_dir, _ = source
    bindings = [
        "compress.stages = ['prune', 'distill']",
        "compress.prune_method = 'wanda'",
        "compress.sparsity_pattern = '2:4'",
        "compress.distill_steps = 3",
        "compress.distill_seq_len = 16",
        "compress.baselines = []",
    ]
    result = _compress(source_dir, tmp_path / "sparse", bindings)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "sparse" / "compress_report.json").read_text())["models"]
    assert list(rows) == ["original (fp32)", "wanda 2:4 sparse", "distilled 3 steps"]
    restored = load(str(tmp_path / "sparse"), log=lambda _: None).params.to_pure_dict()
    paths = [("layers", i, "mlp", "up_proj", "kernel") for i in range(3)]
    paths += [("layers", i, "attention", "q_proj", "kernel") for i in range(3)]
    assert _zero_fraction(restored, paths) == 0.5  # Distillation kept every pruned zero.
    block = np.asarray(_at(restored, paths[0])).reshape(8, 4, -1)
    np.testing.assert_array_equal((block != 0).sum(1), 2)
    assert rows["distilled 3 steps"]["ppl"] != rows["wanda 2:4 sparse"]["ppl"]


def test_width_pruning_gives_a_smaller_model_that_loads_and_samples(source, tmp_path):
    source_dir, _ = source
    bindings = [
        "compress.stages = ['prune']",
        "compress.prune_method = 'width'",
        "compress.prune_mlp_dim = 40",
        "compress.prune_kv_heads = 1",
        "compress.baselines = []",
    ]
    result = _compress(source_dir, tmp_path / "narrow", bindings)
    assert result.returncode == 0, result.stderr[-3000:]
    restored = load(str(tmp_path / "narrow"), log=lambda _: None)
    cfg = restored.model_config
    assert (cfg.mlp_dim, cfg.num_kv_heads, cfg.num_heads, cfg.head_dim) == (40, 1, 2, 8)
    # The cached decode of the smaller model agrees with its own full forward, greedily.
    prompt = [5, 6, 7]
    tokens = _greedy(restored, prompt, new=6)
    logits = nnx.merge(restored.graphdef, restored.params)(np.asarray([prompt + tokens]))
    expected = np.argmax(np.asarray(logits)[0, len(prompt) - 1 : -1], axis=-1).tolist()
    assert tokens == expected[: len(tokens)] and len(tokens) >= 5


@pytest.mark.slow
def test_int4_asym_gptq_run_against_the_q4_1_baseline(source, tmp_path):
    source_dir, _ = source
    bindings = [
        "compress.quant = 'int4_asym'",
        "compress.method = 'gptq'",
        "compress.baselines = ['q4_0', 'q4_1']",
    ]
    result = _compress(source_dir, tmp_path / "asym", bindings)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "asym" / "compress_report.json").read_text())["models"]
    assert list(rows) == [
        "original (fp32)", "int4_asym g32 gptq", "llama.cpp Q4_0", "llama.cpp Q4_1"
    ]  # fmt: skip
    asym, q4_1 = rows["int4_asym g32 gptq"], rows["llama.cpp Q4_1"]
    # The same 5 bits per matrix weight (4 + fp16 scale and min per 32); norms stay float32.
    assert asym["bits_per_weight"] == pytest.approx(q4_1["bits_per_weight"], rel=1e-3)
    assert 0 < asym["kl"] < 0.5 and asym["speedup"] > 0
    restored = load(str(tmp_path / "asym"), log=lambda _: None)
    assert restored.model_config.quant == "int4_asym"
    assert restored.params["embedding"]["min"].dtype == np.float16


@pytest.mark.parametrize(
    ("bindings", "fragment"),
    [
        (["compress.stages = ['shrink']"], "compress.stages has 'shrink'"),
        (["compress.quant = 'int3'"], "compress.quant='int3'"),
        (["compress.stages = ['prune']"], "compress.prune_layers=0"),
        (["compress.quant = 'int4'", "compress.quant_group = 48"], "compress.quant_group=48"),
        (["compress.quant = 'int4_asym'", "compress.quant_group = 48"], "compress.quant_group=48"),
        (["compress.baselines = ['q5_0']"], "compress.baselines has 'q5_0'"),
        (["compress.stages = ['quantize', 'distill']"], "distill before quantize"),
        (["compress.distill_alpha = 1.5"], "compress.distill_alpha=1.5"),
        (["compress.prune_method = 'heads'"], "compress.prune_method='heads'"),
        (["compress.sparsity = 1.0"], "compress.sparsity=1.0"),
        (["compress.distill_teacher_topk = -1"], "compress.distill_teacher_topk=-1"),
        (
            ["compress.stages = ['prune']", "compress.prune_method = 'width'"],
            "compress.prune_mlp_dim",
        ),
        (
            [
                "compress.stages = ['prune']",
                "compress.prune_method = 'width'",
                "compress.prune_mlp_dim = 4096",
            ],
            "compress.prune_mlp_dim=4096",
        ),
    ],
)
def test_bad_settings_exit_1_naming_the_field(source, tmp_path, bindings, fragment):
    result = _compress(source[0], tmp_path / "bad", bindings)
    assert result.returncode == 1 and fragment in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_a_missing_source_is_a_user_error(tmp_path):
    result = run_module("launch.compress", [f"--from={tmp_path}/nope", f"--workdir={tmp_path}/o"])
    assert result.returncode == 1 and "neither a .gguf" in result.stderr, result.stderr[-2000:]
