"""Where training metrics go: metrics.jsonl, TensorBoard event files, the console, a PNG plot."""

import json
import os
import time

import numpy as np


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors it to TensorBoard.

    Only process 0 writes; other processes get a writer that does nothing.
    """

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self.tensorboard_dir = os.path.join(workdir, "tensorboard")
        self._summary = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            from tensorboardX import SummaryWriter  # Imported here: slow, and only process 0.

            self._summary = SummaryWriter(self.tensorboard_dir, flush_secs=10)

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in metrics.items()})
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in record.items():
            if name not in ("step", "time") and isinstance(value, (int, float)):
                self._summary.add_scalar(name, value, int(step))

    def close(self):
        if self._summary is not None:
            self._summary.flush()
            self._summary.close()


def _plain(value):
    value = np.asarray(value).item() if np.ndim(value) == 0 else value
    return round(value, 6) if isinstance(value, float) else value


def read_metrics(jsonl_path: str) -> list[dict]:
    if not os.path.exists(jsonl_path):
        return []
    with open(jsonl_path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curve(jsonl_path: str, png_path: str) -> str | None:
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
    os.makedirs(os.path.dirname(png_path), exist_ok=True)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


def format_duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
