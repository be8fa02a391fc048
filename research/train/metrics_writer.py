"""Where training metrics go: metrics.jsonl, TensorBoard event files, the console, a PNG plot.

The workdir may be local or remote (gs://, s3://): files go through etils.epath. Remote
TensorBoard events are staged in a local directory and copied up on flush and close.
"""

import contextlib
import hashlib
import io
import json
import os
import tempfile
import time

import numpy as np
from absl import logging
from etils import epath

from research.errors import UserError
from research.storage import is_remote, upload_dir


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors it to TensorBoard.

    Only process 0 writes; other processes get a writer that does nothing.
    """

    def __init__(self, workdir: str, *, enabled: bool = True, flush_every_s: float = 30.0):
        self.enabled = enabled
        self.workdir = epath.Path(workdir)
        self.jsonl_path = self.workdir / "metrics.jsonl"
        self.tensorboard_dir = self.workdir / "tensorboard"
        self._summary = None
        self._records = []  # Remote workdirs: the whole log, rewritten on flush.
        self._last_flush = time.time()
        self._flush_every_s = flush_every_s
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if is_remote(workdir):
            self._records = read_metrics(self.jsonl_path)
            digest = hashlib.sha1(str(workdir).encode()).hexdigest()[:12]
            self._local_tensorboard = os.path.join(tempfile.gettempdir(), f"cirrus-tb-{digest}")
        else:
            self._local_tensorboard = str(self.tensorboard_dir)
        self._summary = _summary_writer()(self._local_tensorboard, flush_secs=10)

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in metrics.items()})
        for name, value in record.items():
            if name not in ("step", "time") and isinstance(value, (int, float)):
                self._summary.add_scalar(name, value, int(step))
        if is_remote(self.workdir):
            self._records.append(record)
            if time.time() - self._last_flush > self._flush_every_s:
                self.flush()
        else:
            with open(self.jsonl_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def flush(self):
        if not self.enabled:
            return
        self._summary.flush()
        if is_remote(self.workdir):
            write_records(self.jsonl_path, self._records)
            upload_dir(self._local_tensorboard, self.tensorboard_dir)
        self._last_flush = time.time()

    def close(self):
        if self._summary is not None:
            self.flush()
            self._summary.close()
            self._summary = None


def _summary_writer():
    """tensorboardX's SummaryWriter, imported here (slow, and only process 0 writes) without
    PyTorch: tensorboardX imports torch whenever it is installed (1-2 s) only to accept torch
    tensors, and this writer is given Python floats. A torch already imported is left alone."""
    import sys

    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError: tensorboardX skips it.
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter


def _plain(value):
    value = np.asarray(value).item() if np.ndim(value) == 0 else value
    return round(value, 6) if isinstance(value, float) else value


def read_metrics(jsonl_path) -> list[dict]:
    """The records of metrics.jsonl. A torn last line (a run killed mid-write) is dropped with a
    warning; a bad line before it is a UserError naming the file and the line."""
    path = epath.Path(jsonl_path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for index, line in enumerate(lines[: last + 1]):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as error:
            if index == last:
                logging.warning(
                    "%s: dropping its torn last line %d (%s): %r",
                    path,
                    index + 1,
                    error,
                    line[:200],
                )
                break
            raise UserError(
                f"{path} line {index + 1} is not valid JSON ({error}); it is not the last line, so "
                f"it is not a write cut short. Fix or delete that line (or move the file aside) "
                f"and run again."
            ) from None
    return records


def truncate_metrics(jsonl_path, step: int) -> None:
    """Drops records after `step` (all of them when step == 0), and a torn last line: a resumed
    run appends from its checkpoint, so the log matches an uninterrupted run step for step."""
    path = epath.Path(jsonl_path)
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    write_records(path, kept)


def write_records(jsonl_path, records: list[dict]) -> None:
    """Replaces the file with `records` atomically: readers and a crash see the old file or the
    new one, never half of one. Local files: a temporary file in the same directory, then
    os.replace. gs:// and s3://: one object upload, which the store commits whole."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    if is_remote(jsonl_path):
        epath.Path(jsonl_path).write_text(text)
        return
    directory, name = os.path.split(os.path.abspath(jsonl_path))
    mode = os.stat(jsonl_path).st_mode & 0o777 if os.path.exists(jsonl_path) else 0o644
    handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        os.chmod(temporary, mode)  # mkstemp's file is 0600; keep the file's own mode.
        with os.fdopen(handle, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, jsonl_path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def plot_loss_curve(jsonl_path, png_path) -> str | None:
    """Training (and validation, where computed) loss against step, as a PNG."""
    records = read_metrics(jsonl_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    png_path = epath.Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    png_path.write_bytes(buffer.getvalue())
    return str(png_path)


def format_duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
