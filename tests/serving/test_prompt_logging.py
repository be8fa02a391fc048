"""`launch.serve --log_prompts` against a live server: the prompt and completion reach the
console at the default verbosity and the log file, redacted (the server's API key,
API-key-like tokens and e-mail addresses become placeholders); without the flag no prompt
text is logged at all."""

import os
import re

import pytest

from tests.serving import server_fixtures

SERVER_KEY = "tenant-key-42"
OPENAI_KEY = "sk-proj-abc123DEF456ghi789JKL012"
PROMPT = f"Mail jane.doe@example.com; my keys are {SERVER_KEY} and {OPENAI_KEY}. ROMEO:"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return server_fixtures.write_tiny_workdir(tmp_path_factory.mktemp("prompt_log") / "run")


def _serve_one_request(workdir, *flags) -> str:
    """Starts launch.serve, sends PROMPT once, stops it; the server's console output and
    its log file (WORKDIR/logs/serve.log), then emptied for the next start."""
    server = server_fixtures.start_server(
        [f"--workdir={workdir}", "--gin_bindings=serve.num_slots=1",
         "--gin_bindings=serve.max_len=128", *flags],
        env={"CIRRUS_API_KEYS": SERVER_KEY},
    )  # fmt: skip
    try:
        client = server_fixtures.make_client(server.url, SERVER_KEY)
        reply = client.completions.create(model="run", prompt=PROMPT, max_tokens=4, temperature=0)
        assert reply.usage.completion_tokens == 4
    finally:
        assert server_fixtures.stop_server(server) == 0
    log_file = os.path.join(workdir, "logs", "serve.log")
    with open(log_file, encoding="utf-8") as f:
        logged = f.read()
    os.remove(log_file)
    return server.log() + logged


def test_log_prompts_logs_redacted_text_and_nothing_without_it(workdir):
    logged = _serve_one_request(workdir, "--log_prompts")
    lines = [line for line in logged.splitlines() if "cirrus.serve.prompts" in line]
    assert len(lines) == 2  # The console's line and the log file's.
    for line in lines:
        assert "prompt ['Mail <EMAIL>; my keys are <SECRET> and <SECRET>. ROMEO:'] -> [" in line
    for secret in ("jane.doe", "example.com", SERVER_KEY, OPENAI_KEY):
        assert secret not in logged
    quiet = _serve_one_request(workdir)
    assert re.search(r"completion: \d+ prompt tokens \(0 cached\), 4 completion tokens", quiet)
    assert "cirrus.serve.prompts" not in quiet and "ROMEO" not in quiet
    assert "Mail" not in quiet and "jane.doe" not in quiet
