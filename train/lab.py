"""The study on any model: base, full fine-tuning and the PEFT methods on the same data and budget.

    python -m train.lab --model smollm2-135m-instruct --steps 16 --ranks 4,8,16,32,64 --out runs/lab

Every option of `train.summarize` but --method is accepted and shared by all runs (--export-gguf by each run it
fits: the adapter file by LoRA runs, the merged model by methods that merge); each method writes its own run directory
under --out (resumed like `train.summarize`'s), and the lab adds `table.md` (ROUGE, trainable parameters, adapter
size, train time, peak memory), `rouge.png` (ROUGE-1 against trainable parameters), `lab.json`, `prompt_tokens.md`
(each soft prompt's first virtual tokens and their nearest vocabulary tokens), and with --ranks the LoRA rank study
(`ranks.md`, `ranks.png`). Each method trains at its own learning rate (listed under --lr below, and in table.md's
lr column) unless --lr sets one for all. Every run's options are checked before the first one starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from train import options, summarize
from train.errors import UsageError

LAST_LOSSES = 4  # the rank study's loss: the mean over the last steps (one batch's loss is noisy)


def table(rows: list[dict]) -> str:
    """A markdown table: ROUGE, trainable parameters and share, adapter size, train time, peak memory."""
    lines = ["| method | lr | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum | trainable params | trainable % | adapter | train time | peak memory |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        s = _scores(r)
        name = "base (no training)" if r["method"] == "none" else r["name"]
        trainable = r.get("trainable_params", 0)
        share = f"{100 * trainable / r['total_params']:.2f}%" if r.get("total_params") else "-"
        size = f"{r['adapter_bytes'] / 2**20:.2f} MiB" if r.get("adapter_bytes") else "-"
        secs = f"{r['train_seconds']:.0f} s" if r.get("train_seconds") else "-"
        lr = f"{r['lr']:g}" if r["method"] != "none" else "-"
        lines.append(f"| {name} | {lr} | {s['rouge1']:.4f} | {s['rouge2']:.4f} | {s['rougeL']:.4f} | {s['rougeLsum']:.4f} | "
                     f"{trainable:,} | {share} | {size} | {secs} | {r['peak_memory_bytes'] / 2**30:.2f} GiB |")
    return "\n".join(lines)


def rank_table(rows: list[dict]) -> str:
    """The LoRA rank study: trainable parameters, the loss at the end of training and ROUGE per rank."""
    lines = [f"| rank | alpha | trainable params | loss (mean of last {LAST_LOSSES} steps) | ROUGE-1 | ROUGE-L |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        s = _scores(r)
        lines.append(f"| {r['rank']} | {r['alpha']:g} | {r['trainable_params']:,} | {r['end_loss']:.4f} | {s['rouge1']:.4f} | {s['rougeL']:.4f} |")
    return "\n".join(lines)


def token_table(rows: list[dict], shown: int = 5) -> str:
    """The first learned virtual tokens of each soft-prompt run with their nearest vocabulary tokens (cosine)."""
    lines = ["| method | virtual token | nearest vocabulary tokens (cosine) |", "| --- | ---: | --- |"]
    for r in rows:
        for i, near in enumerate(r.get("nearest_tokens", [])[:shown]):
            words = ", ".join(f"`{t.strip() or repr(t)}` {c:.3f}" for t, c in near)
            lines.append(f"| {r['name']} | {i} | {words} |")
    return "\n".join(lines)


def _scores(row: dict) -> dict:
    return row["tuned"] if "tuned" in row else row["base"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rouge_chart(rows: list[dict], file: Path, title: str) -> None:
    """ROUGE-1 against trainable parameters (log x), one labelled point per method; the base as a line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in rows:
        if r["method"] == "none":
            ax.axhline(_scores(r)["rouge1"], color="gray", linestyle="--", label="base (no training)")
        elif "rank" not in r:
            ax.scatter(r["trainable_params"], _scores(r)["rouge1"], zorder=3)
            ax.annotate(r["name"], (r["trainable_params"], _scores(r)["rouge1"]), textcoords="offset points", xytext=(5, 4), fontsize=9)
    ranked = sorted((r for r in rows if "rank" in r), key=lambda r: r["rank"])
    if ranked:
        ax.plot([r["trainable_params"] for r in ranked], [_scores(r)["rouge1"] for r in ranked], "o-", color="tab:purple",
                alpha=0.6, label="LoRA, r = " + ", ".join(str(r["rank"]) for r in ranked), zorder=2)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("ROUGE-1 (F-measure)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def rank_chart(rows: list[dict], file: Path, title: str) -> None:
    """End-of-training loss and ROUGE-1 against LoRA rank (log x)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    ranks = [r["rank"] for r in rows]
    left.plot(ranks, [r["end_loss"] for r in rows], "o-")
    left.set_ylabel(f"training loss (mean of last {LAST_LOSSES} steps)")
    right.plot(ranks, [_scores(r)["rouge1"] for r in rows], "o-", color="tab:green")
    right.set_ylabel("ROUGE-1")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("LoRA rank r")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    """`train.summarize`'s options with `--methods` for `--method`, `--ranks`, and runs/lab as the default `--out`."""
    return options.parser("jpeft-lab", __doc__, lab=True)


def _ranks(text: str) -> list[int]:
    try:
        ranks = [int(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise UsageError(f"--ranks {text!r} must be comma-separated whole numbers, e.g. 4,8,16,32,64") from None
    if any(r < 1 for r in ranks) or len(set(ranks)) < len(ranks):
        raise UsageError(f"--ranks {text!r} must be distinct positive ranks")
    return ranks


def plan(args: argparse.Namespace) -> list[tuple[str, argparse.Namespace]]:
    """(name, `train.summarize` namespace) per run, each under --out/<name>; the base is scored only by `none`.

    A rank study run is LoRA at that rank with alpha scaled to keep alpha/r; the `lora` run stands for its own rank.
    """
    shared = {k: v for k, v in vars(args).items() if k not in ("methods", "ranks")}
    entries = [(m, {**options.LAB_VARIANTS.get(m, {"method": m})}) for m in options.method_list(args.methods)]
    have_lora = any(name == "lora" for name, _ in entries)
    entries += [(f"lora-r{r}", {"method": "lora", "lora_r": r, "lora_alpha": args.lora_alpha * r / args.lora_r})
                for r in _ranks(args.ranks) if not (have_lora and r == args.lora_r)]
    runs = []
    for name, changes in entries:
        if changes.get("quantize") and args.quantize:
            changes["quantize"] = args.quantize
        changes["export_gguf"] = [e for e in args.export_gguf if summarize.gguf_export_fits(e, changes["method"])]
        lr = args.lr if args.lr is not None else options.LEARNING_RATES.get(name.split("-r")[0], 2e-4)
        runs.append((name, argparse.Namespace(**{**shared, "lr": lr, **changes, "out": str(Path(args.out) / name),
                                                 "skip_base_eval": args.skip_base_eval or changes["method"] != "none"})))
    if args.export_gguf and not any(r.export_gguf for _, r in runs):
        raise UsageError(f"--export-gguf {','.join(args.export_gguf)}: no run of --methods {args.methods} can be exported so "
                         "(the adapter file takes LoRA, the merged model a method that merges)")
    return runs


def _end_loss(out: Path) -> float:
    losses = [r["loss"] for r in summarize.all_history(out)]
    return sum(losses[-LAST_LOSSES:]) / len(losses[-LAST_LOSSES:])


def run(args: argparse.Namespace) -> list[dict]:
    """Check every run, then run the ones not already complete; each run's results (with its name and lr) in order."""
    runs = plan(args)
    prepared = [summarize.prepare(r) for _, r in runs]
    rows = []
    for (name, r), p in zip(runs, prepared):
        print(f"== {name}" + (" (already complete)" if p.finished is not None else ""), flush=True)
        row = p.finished if p.finished is not None else summarize.execute(r, p)
        rows.append({**row, "name": name, "lr": r.lr})
    if args.ranks:
        for (name, r), row in zip(runs, rows):
            if name == "lora" or name.startswith("lora-r"):
                row.update(rank=r.lora_r, alpha=r.lora_alpha, end_loss=_end_loss(Path(r.out)))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Run each method with the shared options, then write the tables and charts."""
    args = parser().parse_args(argv)
    code, rows = summarize.guarded(run, args)
    if code:
        return code
    out = Path(args.out)
    model = Path(str(rows[0]["model"])).name
    markdown = table(rows)
    (out / "table.md").write_text(markdown + "\n")
    (out / "lab.json").write_text(json.dumps(rows, indent=2) + "\n")
    rouge_chart(rows, out / "rouge.png", f"ROUGE-1 against trainable parameters ({model})")
    print(markdown)
    written = ["table.md", "lab.json", "rouge.png"]
    if any("nearest_tokens" in r for r in rows):
        tokens = token_table(rows)
        (out / "prompt_tokens.md").write_text(tokens + "\n")
        print(tokens)
        written.append("prompt_tokens.md")
    ranked = sorted((r for r in rows if "rank" in r), key=lambda r: r["rank"])
    if ranked:
        ranks = rank_table(ranked)
        (out / "ranks.md").write_text(ranks + "\n")
        rank_chart(ranked, out / "ranks.png", f"LoRA rank study ({model})")
        print(ranks)
        written += ["ranks.md", "ranks.png"]
    print(f"wrote {out}/: {', '.join(written)}, and one run directory per method")
    return 0


if __name__ == "__main__":
    sys.exit(main())
