"""s3:// checkpoints: Orbax arrays through TensorStore's s3 driver; the endpoint from AWS env.

Why an adapter at all. Orbax 0.12.8 builds every TensorStore key-value store spec in one
function, `orbax.checkpoint._src.serialization.tensorstore_utils.build_kvstore_tspec`, and it
knows only gs:// (TensorStore's gcs driver) and local paths: an s3:// directory is normalized
to "s3:/bucket/..." and refused as a relative local path. Orbax offers no hook for a custom
kvstore spec (its `ts_context` carries context resources only, and the endpoint of TensorStore's
s3 driver is a spec member, not a context resource; TensorStore does not read AWS_ENDPOINT_URL
either). So `install()` wraps that one function, idempotently: for an s3:// directory it asks
Orbax for the spec of the same path under gs:// (the remote object-store choices: no file
locking, read coalescing, OCDBT layout) and replaces each gcs driver spec of that bucket with an
s3 one. Local and gs:// paths go through unchanged. Remove this module once Orbax builds s3
specs itself.

Everything that is not an array (step metadata, commit_success.txt, the JSON meta item, the
grain iterator state, tokenizer and metrics files) goes through etils.epath -> fsspec -> s3fs,
i.e. botocore, which reads the same environment natively.

Environment (the standard AWS names):
  AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL   an S3-compatible endpoint (MinIO, moto, R2...);
                                            unset: AWS itself
  AWS_REGION or AWS_DEFAULT_REGION          the signing region (us-east-1 when an endpoint is
                                            set without one)
  AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY credentials; unset: the default AWS chain
                                            (profile, instance role...)

Orbax commits a step by renaming its temporary directory, which S3 cannot do atomically (nor
cheaply); s3:// checkpoints use Orbax's COMMIT_FILE atomicity instead: a step directory counts
only once its commit_success.txt exists (`atomicity_options()`).
"""

import copy
import os
import threading
from urllib import parse

import orbax.checkpoint as ocp
from orbax.checkpoint._src.serialization import tensorstore_utils

from research import storage

_GCS_DRIVERS = ("gcs", "gcs_grpc")
_lock = threading.Lock()
_original_build_kvstore_tspec = None


def is_s3(path) -> bool:
    return str(path).startswith("s3://")


def endpoint() -> str | None:
    """The S3 endpoint URL from the environment (None: AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def region() -> str | None:
    found = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return found or ("us-east-1" if endpoint() else None)


def split(path) -> tuple[str, str]:
    """s3://bucket/a/b -> ("bucket", "a/b")."""
    parsed = parse.urlparse(str(path))
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3://bucket/... path: {path}")
    return parsed.netloc, parsed.path.lstrip("/")


def kvstore_spec(bucket: str, key_prefix: str) -> dict:
    """TensorStore's s3 driver for `bucket`/`key_prefix`, configured from the environment."""
    spec = {"driver": "s3", "bucket": bucket, "path": key_prefix}
    if endpoint():
        spec["endpoint"] = endpoint()
    if region():
        spec["aws_region"] = region()
    # With explicit keys, read them from the environment only: the default chain also parses
    # ~/.aws/config and logs an error for each missing file.
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        spec["aws_credentials"] = {"type": "environment"}
    return spec


def _to_s3(spec, bucket: str):
    """Replaces each gcs kvstore spec of `bucket` inside `spec` (any nesting) by an s3 one."""
    if isinstance(spec, dict):
        if spec.get("driver") in _GCS_DRIVERS and spec.get("bucket") == bucket:
            extra = {k: v for k, v in spec.items() if k not in ("driver", "bucket", "path")}
            return {**kvstore_spec(bucket, spec.get("path", "")), **extra}
        return {key: _to_s3(value, bucket) for key, value in spec.items()}
    if isinstance(spec, list):
        return [_to_s3(item, bucket) for item in spec]
    if isinstance(spec, str) and spec.startswith(f"gs://{bucket}/"):
        return kvstore_spec(bucket, spec[len(f"gs://{bucket}/") :])
    return spec


def _build_kvstore_tspec(directory, *args, **kwargs):
    if not is_s3(directory):
        return _original_build_kvstore_tspec(directory, *args, **kwargs)
    bucket, _ = split(directory)
    gcs_spec = _original_build_kvstore_tspec("gs://" + str(directory)[5:], *args, **kwargs)
    return _to_s3(copy.deepcopy(gcs_spec), bucket)


def install() -> None:
    """Teaches Orbax's TensorStore spec builder s3:// paths (idempotent; see the docstring)."""
    global _original_build_kvstore_tspec
    with _lock:
        storage.configure_s3()
        if _original_build_kvstore_tspec is not None:
            return
        _original_build_kvstore_tspec = tensorstore_utils.build_kvstore_tspec
        tensorstore_utils.build_kvstore_tspec = _build_kvstore_tspec


def atomicity_options():
    """A step is committed by its commit_success.txt (S3 has no atomic directory rename)."""
    return ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE)
