"""Sequence packing: several examples share a row, kept apart by segment ids, so a batch is mostly real tokens.

A packed batch is `input_ids` and `segment_ids` (R, L), where segment k > 0 marks the k-th sequence of a
row and 0 marks padding. Attention never crosses segments and rotary positions restart at each segment,
so every sequence is computed exactly as if it had a row of its own (`ops.segment_positions`,
`llama.decoder(segment_ids=...)`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices grouped into rows of total length <= capacity, longest first (first-fit decreasing)."""
    if lengths and max(lengths) > capacity:
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit rows of {capacity}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties keep input order
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple


def row_length(lengths: Sequence[int], multiple: int = 64, attention_tokens: float = 3072.0) -> int:
    """The row length (a multiple of `multiple`, up to twice the longest sequence) that packs cheapest.

    Cost is rows x length x (1 + length / attention_tokens): the per-token matmul work plus attention,
    which grows with the row; `attention_tokens` is the length at which the two are equal (about
    matmul parameters per layer / (2 * heads * head_dim): ~3000 for SmolLM2).
    """
    shortest = round_up(max(lengths), multiple)
    candidates = range(shortest, 2 * shortest + 1, multiple)
    return min(candidates, key=lambda L: len(first_fit(lengths, L)) * L * (1 + L / attention_tokens))


def pack(sequences: Sequence[Sequence[int]], row_len: int, pad_id: int, rows: list[list[int]] | None = None) -> dict[str, np.ndarray]:
    """Pack sequences into rows of `row_len`: `input_ids`, `segment_ids` (R, row_len) and `start` (E,).

    `start[e]` is where sequence e begins in the flattened (R * row_len) batch. `rows` says which
    sequences share a row (default `first_fit`); `[[0], [1], ...]` gives a plain right-padded batch.
    """
    rows = first_fit([len(s) for s in sequences], row_len) if rows is None else rows
    ids = np.full((len(rows), row_len), pad_id, np.int32)
    segments = np.zeros((len(rows), row_len), np.int32)
    start = np.zeros(len(sequences), np.int32)
    for r, members in enumerate(rows):
        offset = 0
        for k, e in enumerate(members, start=1):
            n = len(sequences[e])
            if offset + n > row_len:
                raise ValueError(f"row {r} holds {offset + n} tokens, more than row_len {row_len}")
            ids[r, offset:offset + n] = sequences[e]
            segments[r, offset:offset + n] = k
            start[e] = r * row_len + offset
            offset += n
    return {"input_ids": ids, "segment_ids": segments, "start": start}
