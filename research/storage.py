"""Workdirs may be local paths or gs:// / s3:// URLs: file I/O goes through etils.epath.

gs:// goes through gcsfs, s3:// through s3fs (botocore): an S3-compatible endpoint comes from
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, credentials from the usual AWS chain.
"""

import os
import tempfile

from etils import epath

from research.errors import UserError


def is_remote(path) -> bool:
    return "://" in str(path)


def bucket_of(path) -> str | None:
    """gs://bucket/a/b -> gs://bucket; None for a local path."""
    if not is_remote(path):
        return None
    scheme, rest = str(path).split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}"


def configure_s3() -> None:
    """s3fs without its directory-listing cache: TensorStore (Orbax's arrays), other hosts and
    other processes write the same prefixes, and a stale cached listing would hide a committed
    step or show a deleted one. Idempotent; affects s3:// only."""
    import fsspec.config

    fsspec.config.conf.setdefault("s3", {})["use_listings_cache"] = False


def _configure(path) -> None:
    if str(path).startswith("s3://"):
        configure_s3()


def _endpoint_hint(bucket: str) -> str:
    if not bucket.startswith("s3://"):
        return ""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    where = f"the endpoint {endpoint}" if endpoint else "AWS itself (AWS_ENDPOINT_URL is unset)"
    return f" S3 requests go to {where}."


def check_bucket(path, purpose: str = "the workdir") -> None:
    """A missing or unreachable bucket is a clear UserError before any work is done (and before
    anything creates it: s3fs and gcsfs create a missing bucket on mkdir)."""
    bucket = bucket_of(path)
    if bucket is None:
        return
    if bucket.startswith("s3://"):
        configure_s3()
        _check_s3_bucket(bucket, path, purpose)
        return
    try:
        exists = epath.Path(bucket).exists()
    except Exception as error:  # Network down, permission denied: shown to the user.
        raise UserError(
            f"cannot reach {bucket} for {purpose} ({type(error).__name__}: {error}); check "
            f"the credentials, the network and the bucket name in --workdir."
        ) from error
    if not exists:
        raise UserError(
            f"the bucket {bucket} does not exist ({purpose}: {path}); create it or fix --workdir."
        )


def _check_s3_bucket(bucket: str, path, purpose: str) -> None:
    """One HeadBucket with short timeouts: s3fs would retry an unreachable endpoint for a while
    and then report the bucket as missing."""
    import botocore.config
    import botocore.exceptions
    import botocore.session

    config = botocore.config.Config(
        connect_timeout=5, read_timeout=20, retries={"max_attempts": 2, "mode": "standard"}
    )
    client = botocore.session.get_session().create_client("s3", config=config)
    where = _endpoint_hint(bucket)
    try:
        client.head_bucket(Bucket=bucket[len("s3://") :])
    except botocore.exceptions.ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise UserError(
                f"the bucket {bucket} does not exist ({purpose}: {path}).{where} Create it "
                f"(e.g. `aws s3 mb {bucket}`) or fix --workdir."
            ) from None
        raise UserError(
            f"cannot use {bucket} for {purpose}: {error}.{where} Check the credentials "
            f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an AWS profile) and the bucket's "
            f"permissions."
        ) from None
    except botocore.exceptions.NoCredentialsError:
        raise UserError(
            f"no AWS credentials for {bucket} ({purpose}); set AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)."
        ) from None
    except Exception as error:  # Connection refused, DNS, timeouts: the endpoint is wrong.
        raise UserError(
            f"cannot reach {bucket} for {purpose} ({type(error).__name__}: {error}).{where} "
            f"Check AWS_ENDPOINT_URL (an S3-compatible server must be running there), the "
            f"network and the bucket name in --workdir."
        ) from error


def upload_dir(local_dir: str, destination) -> None:
    """Copies a local directory tree (small files: tokenizers, configs) to any path."""
    _configure(destination)
    destination = epath.Path(destination)
    for root, _, files in os.walk(local_dir):
        target = destination / os.path.relpath(root, local_dir)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                (target / name).write_bytes(f.read())


def local_copy(path) -> str:
    """A local directory with the contents of `path` (itself when it is already local)."""
    if not is_remote(path):
        return str(path)
    _configure(path)
    local = tempfile.mkdtemp(prefix="cirrus-")
    _download_tree(epath.Path(path), local)
    return local


def _download_tree(source: epath.Path, target: str) -> None:
    # Not rglob: epath refuses recursive patterns on gs:// and s3://.
    os.makedirs(target, exist_ok=True)
    for item in source.iterdir():
        if item.is_dir():
            _download_tree(item, os.path.join(target, item.name))
        else:
            with open(os.path.join(target, item.name), "wb") as f:
                f.write(item.read_bytes())


def move_tree(source, target) -> None:
    """Renames the directory `source` to `target` (which must not exist). Local paths: one
    os.rename. gs:// and s3:// have no rename: every object is copied, then the originals are
    removed (a crash in between leaves both copies, never neither)."""
    if not is_remote(source):
        os.rename(source, target)
        return
    _configure(source)
    source, target = epath.Path(source), epath.Path(target)
    _copy_tree(source, target)
    source.rmtree()


def _copy_tree(source: epath.Path, target: epath.Path) -> None:
    # Object by object: s3fs's recursive copy also tries to copy the directory prefixes.
    for item in source.iterdir():
        if item.is_dir():
            _copy_tree(item, target / item.name)
        else:
            item.copy(target / item.name)
