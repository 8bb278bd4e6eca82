"""The study's table on any model: base, full fine-tuning, LoRA, prompt tuning and IA3 on the same data and budget.

    python -m train.lab --model smollm2-135m-instruct --steps 32 --out runs/lab

Every option of `train.summarize` is accepted and shared by all runs; each method writes its own
run directory under --out, and the lab adds `table.md`, `lab.json` and `rouge.png`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from train import summarize
from train.errors import UsageError

LAB_METHODS = ("none", "full", "lora", "prompt", "ia3")


def table(rows: list[dict]) -> str:
    """A markdown table: ROUGE, trainable parameters and share, adapter size, train time, peak memory."""
    lines = ["| method | ROUGE-1 | ROUGE-2 | ROUGE-L | trainable params | trainable % | adapter | train time | peak memory |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        s = r["tuned"] if "tuned" in r else r["base"]
        name = "base (no training)" if r["method"] == "none" else r["method"]
        trainable = r.get("trainable_params", 0)
        share = f"{100 * trainable / r['total_params']:.2f}%" if r.get("total_params") else "-"
        size = f"{r['adapter_bytes'] / 2**20:.2f} MiB" if r.get("adapter_bytes") else "-"
        secs = f"{r['train_seconds']:.0f} s" if r.get("train_seconds") else "-"
        lines.append(f"| {name} | {s['rouge1']:.4f} | {s['rouge2']:.4f} | {s['rougeL']:.4f} | {trainable:,} | {share} | {size} | {secs} | "
                     f"{r['peak_memory_bytes'] / 2**30:.2f} GiB |")
    return "\n".join(lines)


def bar_chart(rows: list[dict], file: Path, title: str) -> None:
    """Grouped bars of ROUGE-1/2/L per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = ("rouge1", "rouge2", "rougeL")
    names = ["base" if r["method"] == "none" else r["method"] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(1.4 * len(rows) + 2, 3.8))
    for k, m in enumerate(metrics):
        values = [(r["tuned"] if "tuned" in r else r["base"])[m] for r in rows]
        ax.bar(x + (k - 1) * 0.27, values, 0.27, label=m)
    ax.set_xticks(x, names)
    ax.set_ylabel("F-measure")
    ax.set_title(title)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Run each method with the shared options, then write the table and the chart."""
    lab = argparse.ArgumentParser(add_help=False)
    lab.add_argument("--methods", default=",".join(LAB_METHODS))
    lab.add_argument("--out", default="runs/lab")
    own, rest = lab.parse_known_args(argv)
    rows = []
    try:
        for method in own.methods.split(","):
            args = summarize.parser().parse_args([*rest, "--method", method, "--out", str(Path(own.out) / method),
                                                  *([] if method == "none" else ["--skip-base-eval"])])
            print(f"== {method}")
            rows.append(summarize.run(args))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(own.out)
    markdown = table(rows)
    (out / "table.md").write_text(markdown + "\n")
    (out / "lab.json").write_text(json.dumps(rows, indent=2) + "\n")
    bar_chart(rows, out / "rouge.png", f"ROUGE by method ({rows[0]['model']})")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
