"""Batched generation and ROUGE (rouge-score, stemming on)."""

from __future__ import annotations

from typing import Any

import numpy as np
from rouge_score import rouge_scorer
from tqdm.auto import tqdm

from train import tasks

METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean F-measure of each ROUGE variant over the pairs."""
    scorer = rouge_scorer.RougeScorer(list(METRICS), use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    return {m: float(np.mean([s[m].fmeasure for s in scores])) for m in METRICS}


def summarize_all(task: tasks.Task, params: dict, rows: list[dict], max_new_tokens: int, batch_size: int, dtype: Any, desc: str,
                  prompt_lookup: int = 0) -> list[str]:
    """Greedy summaries for all rows, in batches (sorted by length so each batch pads little); see `tasks.generate`."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["source"]))
    out: list[str] = [""] * len(rows)
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", dynamic_ncols=True):
        chunk = order[start : start + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))  # a full last batch: no extra compile
        for i, text in zip(chunk, tasks.generate(task, params, [rows[i] for i in padded], max_new_tokens, dtype, prompt_lookup)):
            out[i] = text
    return out
