"""The study's table on any model: base, full fine-tuning, LoRA, prompt tuning and IA3 on the same data and budget.

    python -m train.lab --model smollm2-135m-instruct --steps 32 --out runs/lab

Every option of `train.summarize` except --method is accepted and shared by all runs; each method writes its
own run directory under --out (resumed like `train.summarize`'s), and the lab adds `table.md`, `lab.json` and
`rouge.png`. Every run's options are checked before the first one starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from train import options, summarize


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


def parser() -> argparse.ArgumentParser:
    """`train.summarize`'s options with `--methods` for `--method` and runs/lab as the default `--out`."""
    return options.parser("jpeft-lab", __doc__, lab=True)


def plan(args: argparse.Namespace) -> list[argparse.Namespace]:
    """One `train.summarize` namespace per method, under --out/<method>; the base is scored only by `none`."""
    shared = {k: v for k, v in vars(args).items() if k != "methods"}
    return [argparse.Namespace(**{**shared, "method": m, "out": str(Path(args.out) / m),
                                  "skip_base_eval": args.skip_base_eval or m != "none"})
            for m in options.method_list(args.methods)]


def run(args: argparse.Namespace) -> list[dict]:
    """Check every run, then run the ones not already complete; each run's results in order."""
    runs = plan(args)
    prepared = [summarize.prepare(r) for r in runs]
    rows = []
    for r, (train_rows, eval_rows, finished) in zip(runs, prepared):
        print(f"== {r.method}" + (" (already complete)" if finished is not None else ""))
        rows.append(finished if finished is not None else summarize.execute(r, train_rows, eval_rows))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run each method with the shared options, then write the table and the chart."""
    args = parser().parse_args(argv)
    code, rows = summarize.guarded(run, args)
    if code:
        return code
    out = Path(args.out)
    markdown = table(rows)
    (out / "table.md").write_text(markdown + "\n")
    (out / "lab.json").write_text(json.dumps(rows, indent=2) + "\n")
    bar_chart(rows, out / "rouge.png", f"ROUGE by method ({rows[0]['model']})")
    print(markdown)
    print(f"wrote {out}/: table.md, lab.json, rouge.png, and one run directory per method")
    return 0


if __name__ == "__main__":
    sys.exit(main())
