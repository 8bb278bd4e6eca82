"""The soft prompt a model prepends to its input embeddings: prompt tuning's rows, or a P-tuning encoder's output."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from jpeft.methods import prompt, ptuning


def present(params: Mapping[str, Any]) -> bool:
    """Whether the tree holds a soft prompt (a `prompt_embeddings` leaf or a P-tuning `prompt_encoder`)."""
    return prompt.LEAF in params or ptuning.ENCODER in params


def rows_of(params: Mapping[str, Any], ctx: Any = None) -> jax.Array | None:
    """The (N, D) rows prepended to the input embeddings, or None; a P-tuning encoder runs here (dropout when `ctx` has an rng)."""
    if prompt.LEAF in params:
        return params[prompt.LEAF]
    if ptuning.ENCODER not in params:
        return None
    encoder = params[ptuning.ENCODER]
    rng = ctx.next_key() if ctx is not None and not ctx.deterministic and ptuning.DROPOUT in encoder else None
    table = ptuning.prompt_embeddings(encoder, rng)
    return table[: table.shape[0] // prompt.transformer_submodules(params)]  # PEFT feeds only the first submodule's block


def num_tokens(params: Mapping[str, Any]) -> int:
    """How many soft-prompt rows the models prepend (0 without a soft prompt)."""
    if prompt.LEAF in params:
        return params[prompt.LEAF].shape[0]
    if ptuning.ENCODER in params:
        return params[ptuning.ENCODER]["embedding"].shape[0] // prompt.transformer_submodules(params)
    return 0


def _token_text(tokenizer: Any, token_id: int) -> str:
    """A vocabulary entry as a word: decoded (SentencePiece's "\u2581" and byte-level BPE's "\u0120" become spaces), trimmed."""
    text = tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False).strip()
    return text or tokenizer.convert_ids_to_tokens(token_id)


def nearest_tokens(params: Mapping[str, Any], tokenizer: Any, k: int = 5) -> list[list[tuple[str, float]]]:
    """For each virtual token, the `k` vocabulary tokens of highest cosine similarity to it, as (text, cosine).

    Compared with the model's input embedding table; cosine ignores scale, so Gemma's sqrt(d_model) embedding factor
    (applied to tokens, not to the soft prompt) changes nothing. Table rows past the tokenizer's vocabulary (padding
    rows, as in T5's 32128-row table for 32100 tokens) are left out.
    """
    rows = rows_of(params)
    if rows is None:
        raise ValueError("nearest_tokens: the tree has no soft prompt (no prompt_embeddings leaf or prompt_encoder)")
    vocab = min(len(tokenizer), prompt.embedding_table(params).shape[0])
    if not 0 < k <= vocab:
        raise ValueError(f"nearest_tokens: k must be in 1..{vocab} (the vocabulary size), got {k}")
    table = np.asarray(prompt.embedding_table(params)[:vocab], np.float64)
    rows = np.asarray(rows, np.float64)
    unit = lambda m: m / np.maximum(np.linalg.norm(m, axis=-1, keepdims=True), 1e-30)  # noqa: E731
    cosine = unit(rows) @ unit(table).T
    top = np.argsort(-cosine, axis=1, kind="stable")[:, :k]
    return [[(_token_text(tokenizer, int(i)), float(c[i])) for i in ids] for ids, c in zip(top, cosine)]
