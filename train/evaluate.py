"""Batched generation and ROUGE (rouge-score, stemming on)."""

from __future__ import annotations

import sys
from typing import Any, TextIO

import numpy as np
from rouge_score import rouge_scorer
from tqdm.auto import tqdm

from train import tasks

METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
FEW = 20  # below this many examples, one summary moves a ROUGE mean by several points


def report_count(scored: int, available: int, origin: str, flag: str, asked: int | None, more: str, file: TextIO | None = None) -> None:
    """Say how many examples are scored and why (`flag` `asked` caps them, else all of `origin`); warn when ROUGE rests
    on fewer than FEW, saying how to score more (`flag`, or `more` when the data ran out)."""
    plural = lambda n: f"{n} example{'' if n == 1 else 's'}"  # noqa: E731
    capped = asked is not None and asked < available
    if capped:
        why = f"the first {plural(scored)} of the {available} in {origin} ({flag} {asked})"
    else:
        why = f"all there are in {origin}" + (f"; {flag} {asked} asked for more" if asked is not None and asked > available else "")
    print(f"scoring {plural(scored)}: {why}", file=file, flush=True)
    if scored < FEW:
        print(f"warning: ROUGE over {plural(scored)} is a noisy figure (one summary moves it by points); score {FEW} or more: "
              f"{f'raise {flag}' if capped else more}", file=sys.stderr)


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean F-measure of each ROUGE variant over the pairs."""
    scorer = rouge_scorer.RougeScorer(list(METRICS), use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    return {m: float(np.mean([s[m].fmeasure for s in scores])) for m in METRICS}


def summarize_all(task: tasks.Task, params: dict, rows: list[dict], max_new_tokens: int, batch_size: int, dtype: Any, desc: str,
                  prompt_lookup: int = 0, adapter_ids: list[int] | None = None) -> list[str]:
    """Greedy summaries for all rows, in batches (sorted by length so each batch pads little); see `tasks.generate`.
    `adapter_ids` picks each row's adapter among those `jpeft.multi.stack_lora` stacked into `params`."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["source"]))
    out: list[str] = [""] * len(rows)
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", dynamic_ncols=True):
        chunk = order[start : start + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))  # a full last batch: no extra compile
        ids = None if adapter_ids is None else [adapter_ids[i] for i in padded]
        for i, text in zip(chunk, tasks.generate(task, params, [rows[i] for i in padded], max_new_tokens, dtype, prompt_lookup, ids)):
            out[i] = text
    return out
