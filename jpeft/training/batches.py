"""Training batches from token ids, in the layouts `training.seq2seq_loss` and `training.causal_lm_loss` read.

Lengths are padded up to multiples of `bucket`, so a run compiles its step for only a few shapes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jpeft.training import packing

IGNORE = -100  # label of a position the loss skips (padding)
BUCKET = 64

Ids = Sequence[Sequence[int]]


def pad(rows: Ids, value: int, length: int | None = None, left: bool = False, bucket: int = BUCKET) -> np.ndarray:
    """(len(rows), length) int32 array of the rows padded with `value`; length defaults to the longest, bucketed."""
    if not rows:
        raise ValueError("cannot build a batch from no sequences")
    longest = max(map(len, rows))
    length = length or packing.round_up(max(longest, 1), bucket)
    if longest > length:
        raise ValueError(f"a sequence of {longest} tokens does not fit a padded length of {length}")
    out = np.full((len(rows), length), value, np.int32)
    for i, r in enumerate(rows):
        if left:
            out[i, length - len(r):] = r
        else:
            out[i, : len(r)] = r
    return out


def _with_eos(targets: Ids, eos_id: int | None) -> list[list[int]]:
    return [list(t) + ([eos_id] if eos_id is not None and (not len(t) or t[-1] != eos_id) else []) for t in targets]


def seq2seq_batch(sources: Ids, targets: Ids, pad_id: int, eos_id: int | None = None, max_target: int | None = None,
                  bucket: int = BUCKET) -> dict[str, np.ndarray]:
    """{input_ids, attention_mask, labels} for an encoder-decoder: sources right-padded, labels padded with -100.

    `eos_id` is appended to each target that lacks it; `max_target` fixes the label length (so the
    loss has one shape across batches).
    """
    targets = _with_eos(targets, eos_id)
    ids = pad(sources, pad_id, bucket=bucket)
    mask = pad([[1] * len(s) for s in sources], 0, ids.shape[1])
    return {"input_ids": ids, "attention_mask": mask, "labels": pad(targets, IGNORE, max_target, bucket=bucket)}


def causal_lm_batch(prompts: Ids, targets: Ids, pad_id: int, eos_id: int | None = None, max_target: int | None = None,
                    pack: bool = False, row_len: int | None = None, bucket: int = BUCKET) -> dict[str, np.ndarray]:
    """{input_ids, attention_mask or segment_ids, targets, target_index} for a decoder-only LM.

    Each example is its prompt followed by its target; the loss is taken on the target tokens only.
    Without `pack` each example has its own right-padded row (`attention_mask`); with it, examples
    share rows of `row_len` tokens (default: the cheapest for this batch) kept apart by `segment_ids`.
    `targets` (E, T) holds each target padded with -100 and `target_index` (E,) where its first token
    sits in the flattened (rows * length) batch. `eos_id` is appended to each target that lacks it.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets: one target per prompt")
    targets = _with_eos(targets, eos_id)
    if not all(len(t) for t in targets):
        raise ValueError("an empty target: each example needs at least one target token to learn from")
    seqs = [list(p) + t for p, t in zip(prompts, targets)]
    if not pack:
        row_len = packing.round_up(max(map(len, seqs)), bucket)
    elif row_len is None:
        row_len = packing.row_length([len(s) for s in seqs], bucket)
    packed = packing.pack(seqs, row_len, pad_id, rows=None if pack else [[i] for i in range(len(seqs))])
    batch = {"input_ids": packed["input_ids"], "targets": pad(targets, IGNORE, max_target, bucket=bucket),
             "target_index": packed["start"] + np.array([len(p) for p in prompts], np.int32)}
    if pack:
        batch["segment_ids"] = packed["segment_ids"]
    else:
        batch["attention_mask"] = (packed["segment_ids"] > 0).astype(np.int32)
    return batch


def preference_batch(prompts: Ids, chosen: Ids, rejected: Ids, pad_id: int, eos_id: int | None = None, *, max_length: int | None = None,
                     max_target: int | None = None, pack: bool = False, row_len: int | None = None, bucket: int = BUCKET,
                     score_prompt: bool = False, ref_chosen_logps: Sequence[float] | None = None,
                     ref_rejected_logps: Sequence[float] | None = None) -> dict[str, np.ndarray]:
    """`causal_lm_batch`'s layout for E preference pairs: 2E sequences, prompt + chosen for pairs 0..E-1, then prompt +
    rejected (TRL's order), padded or packed; read by `jpeft.preference.preference_loss`.

    `eos_id` is appended to each completion that lacks it; `max_length` cuts each prompt + completion to that many
    tokens (TRL's keep_start truncation). `score_prompt` also scores the prompt's tokens after the first (ORPO's SFT
    term covers them) and records where each completion starts among its targets (`completion_start` (2E,)).
    `ref_chosen_logps` / `ref_rejected_logps` (E,) are precomputed reference log-probabilities (`ref_logps` (2E,)).
    """
    if not len(chosen) == len(rejected) == len(prompts):
        raise ValueError(f"{len(prompts)} prompts, {len(chosen)} chosen and {len(rejected)} rejected completions: one of each per pair")
    for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
        empty = [name for name, seq in (("prompt", p), ("chosen completion", c), ("rejected completion", r)) if not len(seq)]
        if empty:
            raise ValueError(f"pair {i} has an empty {' and an empty '.join(empty)}: each pair needs a prompt token (BOS at least) "
                             "and both completions; drop the pair or fill it in")
        if max_length is not None and len(p) >= max_length:
            raise ValueError(f"pair {i}: its prompt of {len(p)} tokens leaves no room for a completion within max_length {max_length}; "
                             "cut the prompt or raise max_length")
    completions = _with_eos(chosen, eos_id) + _with_eos(rejected, eos_id)
    prompts = [list(p) for p in prompts] * 2
    if max_length is not None:
        completions = [c[: max_length - len(p)] for p, c in zip(prompts, completions)]
    if score_prompt:  # the first prompt token alone is the "prompt"; the rest of it joins the targets
        batch = causal_lm_batch([p[:1] for p in prompts], [p[1:] + c for p, c in zip(prompts, completions)], pad_id,
                                max_target=max_target, pack=pack, row_len=row_len, bucket=bucket)
        batch["completion_start"] = np.array([len(p) - 1 for p in prompts], np.int32)
    else:
        batch = causal_lm_batch(prompts, completions, pad_id, max_target=max_target, pack=pack, row_len=row_len, bucket=bucket)
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
    if ref_chosen_logps is not None:
        ref = [np.asarray(r, np.float32).reshape(-1) for r in (ref_chosen_logps, ref_rejected_logps)]
        if any(r.shape != (len(chosen),) for r in ref):
            raise ValueError(f"ref_chosen_logps and ref_rejected_logps need one value per pair ({len(chosen)}), got {[len(r) for r in ref]}")
        batch["ref_logps"] = np.concatenate(ref)
    return batch
