"""lm-evaluation-harness against `launch.serve`: lm_eval's `local-completions` model, through
its Python API, on a live server of a tiny run.

Multiple choice (loglikelihood requests: echo + logprobs over token-id prompts): its `acc`
and `acc_norm` equal Cirrus's own evaluator (research/evaluation/multiple_choice.py) on the
same JSONL items, and every choice's log-likelihood and is_greedy equal the model's own
scores computed in this process (within 1e-4), both with transformers' tokenizer of the
run (tokenizer_backend=huggingface, add_bos_token=True: Cirrus's tokens, bos first) and
with the server's tokenizer endpoints (the default, tokenizer_backend=auto -> remote: no bos).
generate_until: its answers equal the Sampler's greedy completions (`complete`, the
scheduler of launch.sample and Cirrus's generation tasks).

The tasks are a YAML config + JSONL data written to tmp_path (`dataset_path: json`); nothing
comes from a hub. One server serves the module.
"""

import concurrent.futures
import json
import os

import numpy as np
import pytest

from research.checkpoint import load
from research.evaluation import (
    Span,
    choice_spans,
    evaluate_choices,
    read_choice_task,
    score_spans,
)
from research.serving import Sampler, SamplingParams, complete
from tests.serving import server_fixtures

MODEL = "tiny"
SEQ_LEN = 64
# Choices carry their leading space (Cirrus's task format); lm-eval adds no delimiter.
CHOICE_ITEMS = [
    {"context": "The king is", "choices": [" dead", " here", " mad"], "answer": 0},
    {"context": "Thou art a", "choices": [" villain", " king"], "answer": 1},
    {"context": "O Romeo, Romeo! wherefore art thou", "choices": [" Romeo", " gone"], "answer": 0},
    {"context": "Good night, good night! Parting is such sweet", "choices": [" sorrow", " joy"],
     "answer": 0},
    {"context": "A horse! a horse! my kingdom for a", "choices": [" horse", " crown", " fool"],
     "answer": 0},
    {"context": "Now is the winter of our", "choices": [" discontent", " summer"], "answer": 0},
]  # fmt: skip
GENERATION_PROMPTS = ["ROMEO:", "To be, or not to be", "Friends, Romans, countrymen"]
MAX_GEN_TOKENS = 12


def write_tasks(directory) -> str:
    """cirrus_mc (multiple choice) and cirrus_gen (generate_until) as lm-eval task YAMLs."""
    directory.mkdir()
    cache = directory / "hf_cache"  # The datasets library's cache, kept out of $HOME.
    mc_data, gen_data = directory / "mc.jsonl", directory / "gen.jsonl"
    mc_data.write_text("".join(json.dumps(item) + "\n" for item in CHOICE_ITEMS))
    gen_data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in GENERATION_PROMPTS))
    (directory / "cirrus_mc.yaml").write_text(f"""\
task: cirrus_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{mc_data}"}}, cache_dir: "{cache}"}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
""")
    (directory / "cirrus_gen.yaml").write_text(f"""\
task: cirrus_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{gen_data}"}}, cache_dir: "{cache}"}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: ""
generation_kwargs: {{until: ["\\n"], max_gen_toks: {MAX_GEN_TOKENS}, do_sample: false}}
metric_list: [{{metric: exact_match}}]
""")
    return str(directory)


def in_process(loaded, tasks_dir) -> dict:
    """What lm-eval's answers must equal, from the model in this process: Cirrus's
    multiple-choice metrics, each choice's scores with Cirrus's tokens (bos first) and
    without bos (the server tokenizer's way), and the Sampler's greedy answers."""
    tokenizer = loaded.tokenizer
    items = read_choice_task(os.path.join(tasks_dir, "mc.jsonl"))
    metrics = evaluate_choices(loaded.graphdef, loaded.params, tokenizer, items, seq_len=SEQ_LEN)
    no_bos = []
    for item in items:
        context = tokenizer.encode(item.context)
        for choice in item.choices:
            no_bos.append(Span(np.asarray(context + tokenizer.encode(choice)), len(context) - 1))

    def scores(spans):
        return score_spans(loaded.graphdef, loaded.params, spans, seq_len=SEQ_LEN, batch_size=8)

    sampler = Sampler(
        loaded.model_config, loaded.graphdef, loaded.params, num_slots=4, max_len=SEQ_LEN
    )
    request = SamplingParams(
        max_new_tokens=MAX_GEN_TOKENS,
        temperature=0.0,
        stop_token_ids=(tokenizer.eos_id,),
        stop_strings=("\n",),  # The task's `until`.
    )
    prompts = [tokenizer.encode_prompt(p) for p in GENERATION_PROMPTS]
    return {
        "metrics": metrics,
        "scores": scores(choice_spans(tokenizer, items, SEQ_LEN)),
        "scores_no_bos": scores(no_bos),
        "greedy": [c.text for c in complete(sampler, prompts, request, tokenizer=tokenizer)],
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(workdir, server, task directory, in-process values); offline Hugging Face libraries.
    The server compiles while this process computes its own values."""
    root = tmp_path_factory.mktemp("lm_eval")
    workdir = server_fixtures.write_tiny_workdir(root / "run")
    tasks_dir = write_tasks(root / "tasks")
    flags = ["--workdir", workdir, f"--model_name={MODEL}", "--gin_bindings=serve.num_slots=4"]
    with (
        pytest.MonkeyPatch.context() as patch,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        starting = pool.submit(server_fixtures.start_server, flags)
        try:
            expected = in_process(load(workdir, log=lambda _: None), tasks_dir)
        finally:
            server = starting.result()
        try:
            yield workdir, server, tasks_dir, expected
        finally:
            assert server_fixtures.stop_server(server) == 0, server.log()[-3000:]


def run_lm_eval(server, tasks_dir, task: str, **model_args) -> dict:
    """lm_eval.simple_evaluate of local-completions on the server: {"results", "samples"}."""
    import lm_eval  # Imports `datasets`, which reads HF_DATASETS_OFFLINE when imported.
    from lm_eval.tasks import TaskManager

    args = {"base_url": f"{server.url}/v1/completions", "model": MODEL, "max_length": 128}
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={**args, **model_args},
        tasks=[task],
        task_manager=TaskManager(include_path=tasks_dir, include_defaults=False),
        batch_size=4,
        bootstrap_iters=0,
        log_samples=True,
        verbosity="WARNING",
    )
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return {"results": out["results"][task], "samples": samples}


def hf_tokenizer_args(workdir) -> dict:
    """The run's tokenizer through transformers, bos first as Cirrus's own tokens."""
    tokenizer = os.path.join(workdir, "tokenizer")
    return {"tokenizer_backend": "huggingface", "tokenizer": tokenizer, "add_bos_token": True}


def check_choice_scores(samples, expected):
    """Each choice's (log-likelihood, is_greedy) from lm-eval equals the in-process
    SpanScores `expected` (one per choice, in item order)."""
    got = [resp[0] for sample in samples for resp in sample["resps"]]
    assert len(got) == len(expected) == sum(len(item["choices"]) for item in CHOICE_ITEMS)
    for (loglikelihood, is_greedy), scores in zip(got, expected, strict=True):
        np.testing.assert_allclose(float(loglikelihood), scores.logprobs.sum(), atol=1e-4)
        assert str(is_greedy) == str(bool(scores.correct.all()))


def test_multiple_choice_equals_cirrus_evaluator(setup):
    workdir, server, tasks_dir, expected = setup
    out = run_lm_eval(server, tasks_dir, "cirrus_mc", **hf_tokenizer_args(workdir))
    ours = expected["metrics"]
    assert 0 < ours["accuracy"] < 1  # The items tell choices apart (random weights, seed 0).
    assert out["results"]["acc,none"] == pytest.approx(ours["accuracy"])
    assert out["results"]["acc_norm,none"] == pytest.approx(ours["accuracy_norm"])
    check_choice_scores(out["samples"], expected["scores"])


def test_multiple_choice_through_the_server_tokenizer(setup):
    """No tokenizer arguments: lm-eval finds /tokenizer_info and /tokenize and tokenizes
    through the server (transformers' convention: special tokens added only when asked,
    which lm-eval never does), so contexts start without bos."""
    _, server, tasks_dir, expected = setup
    out = run_lm_eval(server, tasks_dir, "cirrus_mc")
    check_choice_scores(out["samples"], expected["scores_no_bos"])


def test_generate_until_equals_sampler_greedy(setup):
    workdir, server, tasks_dir, expected = setup
    out = run_lm_eval(server, tasks_dir, "cirrus_gen", **hf_tokenizer_args(workdir))
    answers = [sample["resps"][0][0] for sample in out["samples"]]
    assert answers == expected["greedy"]
    assert any(answers)
