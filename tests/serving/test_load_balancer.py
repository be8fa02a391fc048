"""Two `launch.serve` replicas behind nginx (deploy/nginx/cirrus.conf) on 127.0.0.1: concurrent
streaming chat completions through nginx reach both replicas, and after one replica is
killed (SIGKILL) no new request fails (nginx skips the dead one: proxy_next_upstream).

Needs Debian's nginx (`apt-get install -y nginx`); every process is started here and stopped
by pid at the end.
"""

import concurrent.futures
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request

import openai
import pytest

from deploy.nginx import render_nginx_conf
from tests.serving.server_fixtures import (
    free_port,
    http_status,
    start_server,
    stop_server,
    write_tiny_workdir,
)

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
MAX_TOKENS = 12
KEYS_ENV, KEY = "CIRRUS_API_KEYS", "lb-secret"
# Small slots and context: two replicas compile at once on a shared CPU.
FLAGS = [
    "--model_name=cirrus",
    "--gin_bindings=serve.num_slots=4",
    "--gin_bindings=serve.max_len=64",
    "--gin_bindings=serve.prefill_chunk=32",
]

pytestmark = [
    pytest.mark.slow,
    # nginx is a system package, not a pip one: `make test` installs it with apt-get, which
    # needs root and a Debian package mirror. Only a machine where that cannot run skips.
    pytest.mark.skipif(
        NGINX is None,
        reason="nginx is not installed and make test could not apt-get it (needs root and a "
        "Debian mirror): apt-get install -y nginx",
    ),
]


def _start_nginx(prefix, upstreams, port) -> subprocess.Popen:
    """nginx in the foreground with its own prefix (pid, logs, temp files under tmp_path)."""
    os.makedirs(prefix, exist_ok=True)
    conf = os.path.join(prefix, "nginx.conf")
    with open(conf, "w") as f:
        # As root, nginx's workers would run as `nobody`, which cannot enter pytest's 0700 tmp.
        user = "root" if os.geteuid() == 0 else None
        f.write(render_nginx_conf(upstreams, f"127.0.0.1:{port}", prefix, user=user))
    error_log = os.path.join(prefix, "error.log")
    command = [NGINX, "-p", prefix, "-c", conf, "-e", error_log, "-g", "daemon off;"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    for _ in range(100):
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited with {process.returncode}: {_read(error_log)}")
        if http_status(f"http://127.0.0.1:{port}/nginx_health") == 200:
            return process
        time.sleep(0.1)
    _stop(process)
    raise RuntimeError(f"nginx did not answer on {port}: {_read(error_log)}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


def _read(path) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-4000:]
    except OSError:
        return "(no log)"


def _finished_requests(url: str) -> float:
    """vllm:request_success_total of a replica, summed over finish reasons."""
    request = urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    pattern = r"^vllm:request_success_total\{[^}]*\}\s+(\S+)$"
    return sum(float(value) for value in re.findall(pattern, text, flags=re.MULTILINE))


def _stream_chat(client: openai.OpenAI, index: int) -> dict:
    """One streamed chat completion; its text, chunk count, finish reason and usage."""
    stream = client.chat.completions.create(
        model="cirrus",
        messages=[{"role": "user", "content": f"Request {index}: speak, Horatio."}],
        max_tokens=MAX_TOKENS,
        temperature=0.8,
        seed=index,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    text, chunks, finish, usage = [], 0, None, None
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return {"text": "".join(text), "chunks": chunks, "finish": finish, "usage": usage}


def _send_concurrently(client, indices) -> list[dict]:
    with concurrent.futures.ThreadPoolExecutor(len(indices)) as pool:
        return list(pool.map(lambda i: _stream_chat(client, i), indices))


def _check(results, count):
    assert len(results) == count
    for result in results:
        assert result["finish"] == "length", result
        assert result["usage"].completion_tokens == MAX_TOKENS, result
        assert result["chunks"] >= 2, result  # SSE events, not one JSON body


def test_nginx_balances_streams_and_skips_a_dead_replica(tmp_path):
    workdir = write_tiny_workdir(tmp_path / "run")
    replicas, nginx = [], None
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # both compile at once
            starts = [
                pool.submit(start_server, ["--workdir", workdir, *FLAGS], env={KEYS_ENV: KEY})
                for _ in "ab"
            ]
            errors = []
            for start in starts:
                try:
                    replicas.append(start.result())
                except RuntimeError as error:  # the other one is still stopped below
                    errors.append(str(error))
        assert not errors, errors[0][-4000:]
        port = free_port()
        upstreams = [f"127.0.0.1:{r.port}" for r in replicas]
        nginx = _start_nginx(str(tmp_path / "nginx"), upstreams, port)
        # max_retries=0: a failed request must fail here, not be retried by the client.
        base_url = f"http://127.0.0.1:{port}/v1"
        client = openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["cirrus"]
        # The Authorization header crosses nginx: a wrong key is the replica's 401.
        stranger = openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
            stranger.models.list()

        results = _send_concurrently(client, range(8))
        _check(results, 8)
        served = [_finished_requests(r.url) for r in replicas]
        assert sum(served) == 8, served
        assert all(count > 0 for count in served), f"least_conn left a replica idle: {served}"

        dead, alive = replicas
        os.kill(dead.pid, signal.SIGKILL)
        dead.process.wait()
        before = _finished_requests(alive.url)
        results = _send_concurrently(client, range(100, 108))  # new requests after the kill
        _check(results, 8)
        for index in range(200, 204):  # and one at a time: each may hit the dead one first
            _check([_stream_chat(client, index)], 1)
        assert _finished_requests(alive.url) == before + 12
        assert "connect() failed" in _read(tmp_path / "nginx" / "error.log")
    finally:
        if nginx is not None:
            _stop(nginx)
        for replica in replicas:
            stop_server(replica)
