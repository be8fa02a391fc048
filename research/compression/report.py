"""compress_report.json / .md / .png: every stage and baseline against the original."""

import json
import os

# Columns of the Markdown table: (key, header, format).
_COLUMNS = (
    ("bits_per_weight", "bits/weight", "{:.2f}"),
    ("weight_mb", "weights MB", "{:.1f}"),
    ("weight_ratio", "x fp32 size", "{:.3f}"),
    ("ppl", "perplexity", "{:.4f}"),
    ("dppl_pct", "ppl change %", "{:+.3f}"),
    ("kl", "mean KL", "{:.5f}"),
    ("top1", "top-1 agree", "{:.4f}"),
    ("decode_tokens_per_s", "decode tok/s (b=1)", "{:.1f}"),
    ("speedup", "x original speed", "{:.2f}"),
)


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "n/a" if value is None else fmt.format(value)


def write_report(workdir: str, report: dict) -> list[str]:
    """Writes the three files under `workdir` (local); returns their paths."""
    os.makedirs(workdir, exist_ok=True)
    paths = [os.path.join(workdir, f"compress_report.{ext}") for ext in ("json", "md", "png")]
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    rows = report["models"]
    lines = [
        f"# Compression report: {report['source']}",
        "",
        f"Held-out text: {report['eval']['tokens']:,} tokens ({report['eval']['text']}), windows "
        f"of {report['eval']['window']}, the second half of each scored "
        f"({report['eval']['scored_tokens']:,} tokens). KL is KL(original || model) per token.",
        "",
        "| model | " + " | ".join(header for _, header, _ in _COLUMNS) + " |",
        "|---" * (len(_COLUMNS) + 1) + "|",
    ]
    for name, row in rows.items():
        cells = [_cell(row, key, fmt) for key, _, fmt in _COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Stages: " + " -> ".join(report["stages"]) + f". Took {report['seconds']:.0f} s."]
    for note in report.get("notes", []):
        lines.append(f"- {note}")
    with open(paths[1], "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    _plot(rows, paths[2], report["source"])
    return paths


def _plot(rows: dict, path: str, title: str) -> None:
    """Size vs perplexity, one point per model, labelled with its decode speed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, row in rows.items():
        ax.scatter(row["weight_mb"], row["ppl"], s=60, marker="o" if row.get("ours") else "s")
        speed = row.get("decode_tokens_per_s")
        label = name + (f"\n{speed:.0f} tok/s" if speed else "")
        ax.annotate(label, (row["weight_mb"], row["ppl"]), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)  # fmt: skip
    ax.set_xlabel("weight memory (MB)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"size vs perplexity vs decode speed\n{os.path.basename(title)}", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
