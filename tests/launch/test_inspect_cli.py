"""launch.inspect end to end on a tiny saved run and its int8 variant: the page and its JSON,
user errors named by flag, and the page rendered by headless Chromium with nothing fetched."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

import numpy as np
import pytest
from flax import nnx

from launch import inspect as inspect_cli
from research.checkpoint.pretrained import Pretrained, save_as_run
from research.compression import quantize
from research.data import default_corpus_documents, train_tokenizer
from research.errors import UserError
from research.inspect import MAX_ATTENTION_TOKENS
from research.inspect.document import decode_attention
from research.model import Decoder, ModelConfig
from tests.inspect.test_page import prompt_text
from tests.launch.test_sample_eval import run_module
from tests.model.helpers import random_model

CONFIG = ModelConfig(
    vocab_size=320, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, mlp_dim=64,
    max_seq_len=256, tie_embeddings=True,
)  # fmt: skip
PROMPT = 'Once more unto the breach, dear friends: <b>"&</b>'


def _save(directory, config, params, tokenizer):
    source = {"format": "random", "path": "test"}
    save_as_run(str(directory), Pretrained(config, params, source, tokenizer), log=lambda _: None)
    return str(directory)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny random run, its int8 variant, and a run with another tokenizer."""
    root = tmp_path_factory.mktemp("inspect")
    tokenizer = train_tokenizer(default_corpus_documents()[:30], CONFIG.vocab_size)
    model = random_model(lambda: Decoder(CONFIG, rngs=nnx.Rngs(0)), scale=0.3)
    params = nnx.state(model, nnx.Param)
    qconfig, qparams = quantize.quantize_params(CONFIG, params, "int8", 0)
    other_tokenizer = train_tokenizer(default_corpus_documents()[60:90], CONFIG.vocab_size)
    return {
        "base": _save(root / "base", CONFIG, params, tokenizer),
        "int8": _save(root / "int8", qconfig, qparams, tokenizer),
        "other_vocab": _save(root / "other_vocab", CONFIG, params, other_tokenizer),
    }


@pytest.fixture(scope="module")
def page(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("page") / "page.html"
    result = run_module(
        "launch.inspect",
        [f"--workdir={runs['base']}", f"--compare={runs['int8']}", f"--prompt={PROMPT}"]
        + ["--target=4", "--top_k=3", f"--out={out}"],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote" in result.stdout and "KL(base || other)" in result.stdout
    return out


def test_cli_writes_the_page_and_its_json(page, runs):
    document = json.loads(page.with_suffix(".json").read_text())
    ids = document["token_ids"]
    t, layers, heads = len(ids), CONFIG.num_layers, CONFIG.num_heads
    assert document["prompt"] == PROMPT and ids[0] == 1  # Cirrus tokenizers put bos first.
    assert len(document["next"]["logprob"]) == t and document["next"]["logprob"][0] is None
    assert np.asarray(document["next"]["top_ids"]).shape == (t, 3)
    assert np.asarray(document["lens"]["top_ids"]).shape == (layers + 1, t, 3)
    assert np.asarray(document["lens"]["next_logprob"]).shape == (layers + 1, t - 1)
    attention = document["attention"]
    assert (attention["layers"], attention["heads"]) == (layers, heads)
    weights = decode_attention(attention["data"][1][2], t)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=t / 255)
    attribution = document["attribution"]
    assert (attribution["position"], attribution["token"]) == (4, ids[4])
    assert all(v == 0 for v in attribution["grad_x_input"][4:])
    compared = document["compare"]
    assert compared["other"]["quant"] == "int8" and compared["other"]["source"] == runs["int8"]
    kl = np.asarray(compared["kl"])
    assert kl.shape == (t,) and np.all(kl >= 0) and kl.max() > 0
    assert kl[compared["order"][0]] == kl.max()
    assert all(str(i) in document["vocab"] for i in ids + compared["other_top1"])
    text = page.read_text()
    assert PROMPT not in text and prompt_text(text) == "<|bos|>" + PROMPT  # Escaped.
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*https?://""", text, re.IGNORECASE)


def test_user_errors_name_the_flag(runs, tmp_path):
    out = str(tmp_path / "page.html")
    quiet = dict(log=lambda _: None)
    base, short, long = runs["base"], "Once more", "a " * (MAX_ATTENTION_TOKENS + 2)
    cases = [
        ((str(tmp_path / "missing"), "x", out), {}, "--workdir=", "does not exist"),
        ((base, "", out), {}, "--prompt is empty", ""),
        ((base, "x", ""), {}, "--out is required", ""),
        ((base, short, out), {"target": "99"}, "--target position 99", "the prompt has"),
        ((base, short, out), {"target": "2:x y z"}, "--target token", "tokens"),
        ((base, short, out), {"target": "a"}, "--target='a' must be", ""),
        ((base, "x", out), {"other_source": runs["other_vocab"]}, "--compare=", "tokenizer"),
        ((base, long, out), {}, "--prompt has", "--noattention"),
    ]  # fmt: skip
    for args, kwargs, first, second in cases:
        with pytest.raises(UserError) as error:
            inspect_cli.run(*args, **kwargs, **quiet)
        assert first in str(error.value) and second in str(error.value), str(error.value)
    assert not os.path.exists(out)
    missing = ["--workdir=/nonexistent/run", "--prompt=x", f"--out={out}"]
    result = run_module("launch.inspect", missing, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "--workdir=/nonexistent/run does not exist" in result.stderr
    assert "Traceback" not in result.stderr


class _Listener:
    """A TCP listener on 127.0.0.1 that records every connection (the browser's proxy: any
    request the page made would arrive here); `requests` holds their first lines."""

    def __init__(self):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.socket.settimeout(0.2)
        self.port = self.socket.getsockname()[1]
        self.requests = []
        self.running = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while self.running:
            try:
                connection, _ = self.socket.accept()
            except TimeoutError:
                continue
            connection.settimeout(2)
            try:
                self.requests.append(connection.recv(200).split(b"\r\n")[0])
            except OSError as error:
                self.requests.append(repr(error).encode())
            connection.close()

    def close(self):
        self.running = False
        self.thread.join()
        self.socket.close()


# Chromium's own services (component updater, accounts, network time) call these hosts from
# any page, even a blank one; they skip the proxy and resolve to nothing, so nothing leaves
# and the listener sees only what a page asks for (the control page below proves it does).
_BROWSER_HOSTS = (
    "update.googleapis.com",
    "accounts.google.com",
    "clients2.google.com",
    "www.google.com",  # Its own connectivity probe, seen on some runs.
)
_BROWSER_HOSTS += ("redirector.gvt1.com",)


def _chromium(profile, port, args, timeout_s=60):
    """Runs headless Chromium (its own process group, killed by the pid we started if it
    hangs) with every request through the proxy on 127.0.0.1:port. Returns (code, stdout)."""
    command = [
        shutil.which("chromium"),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--proxy-server=127.0.0.1:{port}",
        # <-loopback>: loopback requests go through the proxy too.
        "--proxy-bypass-list=" + ";".join(["<-loopback>", *_BROWSER_HOSTS]),
        "--host-resolver-rules=" + ", ".join(f"MAP {host} ~NOTFOUND" for host in _BROWSER_HOSTS),
        "--window-size=1200,900",
        *args,
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return process.returncode, stdout


@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="needs Debian's chromium (make test installs it with apt-get where apt-get can run)",
)
def test_page_renders_in_chromium_without_fetching_anything(page, tmp_path):
    from PIL import Image

    listener = _Listener()
    shot, profile = tmp_path / "page.png", tmp_path / "profile"
    control = tmp_path / "control.html"
    control.write_text("<p>control</p><img src='http://example.invalid/x.png'>")
    start = time.perf_counter()
    try:
        code, _ = _chromium(profile, listener.port, [f"--screenshot={shot}", f"file://{page}"])
        # The DOM after the scripts ran: the attention thumbnails exist only if they did.
        code_dom, dom = _chromium(profile, listener.port, ["--dump-dom", f"file://{page}"])
        page_requests = list(listener.requests)
        _chromium(profile, listener.port, ["--dump-dom", f"file://{control}"])
    finally:
        listener.close()
    elapsed = time.perf_counter() - start
    assert code == 0 and code_dom == 0
    assert page_requests == [], f"the page made requests: {page_requests}"
    assert any(b"example.invalid" in r for r in listener.requests), listener.requests
    pixels = np.asarray(Image.open(shot).convert("RGB"), np.float32)
    assert pixels.shape == (900, 1200, 3)
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    assert dom.count('title="head ') == CONFIG.num_heads  # Drawn by the page's script.
    print(f"chromium: three launches in {elapsed:.1f} s")
