"""Workdirs may be local paths or gs:// / s3:// URLs: file I/O goes through etils.epath."""

import os
import tempfile

from etils import epath


def is_remote(path) -> bool:
    return "://" in str(path)


def upload_dir(local_dir: str, destination) -> None:
    """Copies a local directory tree (small files: tokenizers, configs) to any path."""
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
    local = tempfile.mkdtemp(prefix="cirrus-")
    source = epath.Path(path)
    for item in source.rglob("*"):
        if item.is_file():
            target = os.path.join(local, str(item.relative_to(source)))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(item.read_bytes())
    return local
