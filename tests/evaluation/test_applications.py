"""Applications (research/evaluation/applications.py): the metrics against hand-computed
values, the shipped sets, and the two backends on a tiny served run: `launch.serve` through
the `openai` client and the same model in this process give the same replies and scores."""

import concurrent.futures
import dataclasses
import json
import math
import subprocess
import sys

import pytest
import sacrebleu

from research.checkpoint import load
from research.evaluation import APPS, AppConfig, InProcessBackend, OpenAIBackend, metrics, run_app
from research.evaluation import applications as apps
from tests.serving import server_fixtures


def test_exact_match_and_f1_by_hand():
    assert metrics.exact_match("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert metrics.exact_match("in Paris", ["Paris"]) == 0.0
    # "in paris france" vs "paris": precision 1/3, recall 1 -> F1 = 2 * (1/3) / (4/3) = 0.5.
    assert metrics.f1("In Paris, France", ["Paris"]) == pytest.approx(0.5)
    # Best of the answers: "paris" alone matches exactly.
    assert metrics.f1("Paris", ["London", "Paris"]) == 1.0
    assert metrics.f1("a", ["the"]) == 1.0  # Both normalize to nothing.


def test_chrf_is_sacrebleus_corpus_chrf():
    hypotheses, references = ["Le chat dort.", "Bonjour"], ["Le chat dort sur le lit.", "Bonjour."]
    expected = sacrebleu.corpus_chrf(hypotheses, [references]).score
    assert apps.chrf(hypotheses, references) == expected
    assert apps.chrf(["Merci beaucoup."], ["Merci beaucoup."]) == 100.0
    assert 0 < expected < 100


def test_first_label_and_keyword():
    assert apps.first_label("Unsafe. This message threatens") == "unsafe"
    assert apps.first_label("I think it is safe, not unsafe") == "safe"
    assert apps.first_label("No idea") == ""
    assert apps.keyword_hit("Your dog is called REX.", ["rex"]) == 1.0
    assert apps.keyword_hit("I don't know", ["rex"]) == 0.0


def test_shipped_sets():
    for name in ("chat", "qa", "translation", "moderation"):
        items = apps.read_items(name)
        assert 16 <= len(items) <= 40, name
    assert all(i["answers"] for i in apps.read_items("qa"))
    assert {i["label"] for i in apps.read_items("moderation")} == set(apps.MODERATION_LABELS)
    assert all(i["messages"][-1]["role"] == "user" for i in apps.read_items("chat"))
    texts = apps.heldout_paragraphs(4, 300)
    assert len(texts) == 4 and all(200 <= len(t) <= 300 for t in texts)


class _Oracle:
    """Replies with each item's reference: every app's metric at its best."""

    def chat(self, conversations, max_tokens):
        answers = {}
        for name, key in (("qa", "answers"), ("translation", "reference"), ("moderation", "label")):
            for item in apps.read_items(name):
                messages = apps._MESSAGES[name](item)
                value = item[key]
                answers[messages[-1]["content"]] = value[0] if isinstance(value, list) else value
        for item in apps.read_items("chat"):
            answers[item["messages"][-1]["content"]] = f"It is {item['keywords'][0]}."
        return [answers[c[-1]["content"]] for c in conversations]

    def token_logprobs(self, texts):
        return [[math.log(0.5)] * 3 for _ in texts]


def test_scores_of_perfect_replies():
    oracle = _Oracle()
    assert run_app("qa", oracle)["metrics"]["exact_match"] == 1.0
    assert run_app("qa", oracle)["metrics"]["f1"] == 1.0
    assert run_app("translation", oracle)["metrics"]["chrf"] == 100.0
    assert run_app("moderation", oracle)["metrics"]["accuracy"] == 1.0
    assert run_app("chat", oracle)["metrics"]["keyword_accuracy"] == 1.0
    assert run_app("text", oracle)["metrics"]["perplexity"] == pytest.approx(2.0)


# Short replies and texts: the tiny model's context is 512 tokens.
TINY = AppConfig(max_tokens=8, text_paragraphs=3, text_max_chars=240, num_slots=4)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return server_fixtures.write_tiny_workdir(tmp_path_factory.mktemp("apps"), max_seq_len=512)


@pytest.fixture(scope="module")
def both_backends(workdir):
    """Every app's result from a live `launch.serve` (openai client) and from the same model
    in this process. The server compiles while this process runs the apps."""
    flags = ["--workdir", workdir, "--model_name=tiny", "--gin_bindings=serve.num_slots=4"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        starting = pool.submit(server_fixtures.start_server, flags)
        try:
            local = InProcessBackend(load(workdir, log=lambda _: None), num_slots=TINY.num_slots)
            here = {name: run_app(name, local, TINY) for name in APPS}
            # Replies long enough that the longer half of the prompts no longer fit.
            lengths = sorted(
                len(local.template.encode(apps._MESSAGES["moderation"](item)))
                for item in apps.read_items("moderation")
            )
            long = dataclasses.replace(TINY, max_tokens=512 - lengths[len(lengths) // 2])
            here["too_long"] = run_app("moderation", local, long)
        finally:
            server = starting.result()
    try:
        remote = OpenAIBackend(f"{server.url}/v1", concurrency=4)
        assert remote.model == "tiny"
        served = {name: run_app(name, remote, TINY) for name in APPS}
        served["too_long"] = run_app("moderation", remote, long)
    finally:
        assert server_fixtures.stop_server(server) == 0, server.log()[-3000:]
    return here, served


@pytest.mark.parametrize("name", ["chat", "qa", "translation", "moderation"])
def test_served_equals_in_process(both_backends, name):
    here, served = both_backends
    assert served[name]["items"] == here[name]["items"]  # Every reply and its score.
    assert served[name]["metrics"] == here[name]["metrics"]
    assert any(row["reply"] for row in here[name]["items"])


def test_items_past_the_context_are_skipped_alike_served_and_in_process(both_backends):
    here, served = both_backends
    skipped = here["too_long"]["metrics"]["skipped"]
    assert 0 < skipped < 24 and served["too_long"]["metrics"] == here["too_long"]["metrics"]
    assert served["too_long"]["items"] == here["too_long"]["items"]
    assert here["too_long"]["metrics"]["items"] == 24 - skipped


def test_served_perplexity_equals_in_process(both_backends):
    here, served = both_backends
    assert served["text"]["metrics"]["tokens"] == here["text"]["metrics"]["tokens"] > 100
    assert served["text"]["metrics"]["perplexity"] == pytest.approx(
        here["text"]["metrics"]["perplexity"], rel=1e-5
    )
    # Random weights: about as perplexed as a uniform guess over the 512 tokens.
    assert 100 < here["text"]["metrics"]["perplexity"] < 2000


def test_launch_apps_writes_the_report(both_backends, workdir, tmp_path):
    """The entry point in process: its JSON holds the library's numbers."""
    here, _ = both_backends
    report = tmp_path / "apps.json"
    command = [sys.executable, "-m", "launch.apps", f"--workdir={workdir}", "--apps=qa,text"]
    bindings = [f"--gin_bindings=apps.{k}={v}" for k, v in vars(TINY).items() if k != "data_dir"]
    done = subprocess.run(
        [*command, *bindings, f"--report={report}"],
        cwd=server_fixtures.ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| qa | f1 |" in done.stdout
    written = json.loads(report.read_text())["apps"]
    assert written["qa"]["items"] == here["qa"]["items"]
    assert written["text"]["metrics"]["perplexity"] == pytest.approx(
        here["text"]["metrics"]["perplexity"], rel=1e-6
    )
