"""A tiny servable model and `launch.serve` as a subprocess, for server, load-balancer and
benchmark tests.

    workdir = write_tiny_workdir(tmp_path / "run")        # random weights, a real tokenizer
    server = start_server(["--workdir", workdir])          # waits for GET /ready == 200
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    ...
    stop_server(server)                                   # SIGTERM by pid, then SIGKILL

The model is a 2-layer Llama (d_model 32) with N(0, 0.5^2) random weights over a byte-level
BPE tokenizer trained on the bundled Shakespeare; its text is gibberish, but every token is
a real token of a real tokenizer and every number is the model's own.
"""

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import openai
import uvicorn

from research.checkpoint.pretrained import Pretrained, save_as_run
from research.data import default_corpus_documents, train_tokenizer
from research.model import ModelConfig
from tests.serving.helpers import random_split

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Written to tokenizer_config.json: a plain-text template (the tiny tokenizer has no
# <|im_start|>), distinct from the server's ChatML default so tests can tell which is used.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "### {{ message['role'] }}:\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}### assistant:\n{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on the first 60 Shakespeare scenes (~1 s)."""
    return train_tokenizer(default_corpus_documents()[:60], vocab_size)


def tiny_model_config(vocab_size: int, max_seq_len: int = 128) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size,
        d_model=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        mlp_dim=64,
        max_seq_len=max_seq_len,
        positions="rope",
        rope_theta=1000.0,
        norm="rmsnorm",
        mlp_activation="swiglu",
    )


def tiny_pretrained(*, max_seq_len: int = 128, seed: int = 0, tokenizer=None) -> Pretrained:
    """The tiny model in memory: Pretrained(model_config, params, tokenizer, chat template)."""
    tokenizer = tokenizer or tiny_tokenizer()
    config = tiny_model_config(tokenizer.vocab_size, max_seq_len)
    _, params = random_split(config, seed=seed)
    return Pretrained(
        model_config=config,
        params=params,
        source={"format": "random", "path": "tests/serving/server_fixtures.py", "family": "llama"},
        tokenizer=tokenizer,
        tokenizer_extra={"chat_template": CHAT_TEMPLATE},
    )


def write_tiny_workdir(workdir, *, max_seq_len: int = 128, seed: int = 0) -> str:
    """Writes the tiny model as a Cirrus run (ckpt/ step 0, tokenizer/, config.gin) that
    `launch.serve --workdir` and `load_model` read; returns the path."""
    workdir = str(workdir)
    save_as_run(workdir, tiny_pretrained(max_seq_len=max_seq_len, seed=seed), log=lambda _: None)
    return workdir


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str, timeout_s: float = 5.0) -> int | None:
    """The status code of GET url, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (OSError, urllib.error.URLError):
        return None


@dataclasses.dataclass
class ServerProcess:
    process: subprocess.Popen
    port: int
    log_path: str

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


def start_server(
    flags,
    *,
    port: int | None = None,
    env: dict | None = None,
    timeout_s: float = 240.0,
    module: str = "launch.serve",
) -> ServerProcess:
    """Starts `python -m launch.serve FLAGS --port=PORT` on 127.0.0.1 (stdout and stderr to a
    log file) and waits until GET /ready answers 200.

    Args:
      flags: launch.serve flags, e.g. ["--workdir", DIR, "--gin_bindings", "serve.num_slots=2"].
      port: default a free one.
      env: extra environment variables (e.g. CIRRUS_API_KEYS); the rest is inherited (under
        pytest, tests/conftest.py's JAX_PLATFORMS=cpu and 8 forced CPU devices).
      module: the module to run (tests/serving/fault_serve.py injects faults).
    Raises RuntimeError with the log when the server exits or is not ready in time.
    """
    port = port or free_port()
    descriptor, log_path = tempfile.mkstemp(prefix="serve-", suffix=".log")
    command = [sys.executable, "-m", module, "--host=127.0.0.1", f"--port={port}"]
    with os.fdopen(descriptor, "wb") as log_file:  # The child keeps its own copy.
        process = subprocess.Popen(
            [*command, *[str(f) for f in flags]],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    server = ServerProcess(process, port, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"launch.serve exited with {process.returncode}:\n{server.log()}")
        if http_status(f"{server.url}/ready") == 200:
            return server
        time.sleep(0.2)
    stop_server(server)
    raise RuntimeError(f"launch.serve was not ready within {timeout_s} s:\n{server.log()}")


def stop_server(server: ServerProcess, timeout_s: float = 30.0) -> int:
    """SIGTERM (graceful: in-flight requests finish), SIGKILL after timeout_s; the exit code."""
    if server.process.poll() is None:
        os.kill(server.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(server.pid, signal.SIGKILL)
            server.process.wait()
    return server.process.returncode


@contextlib.contextmanager
def serving(app):
    """Runs `app` with uvicorn on a thread on a free 127.0.0.1 port; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def make_client(url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=120)
