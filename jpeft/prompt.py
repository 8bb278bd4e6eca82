"""Prompt tuning: a (num_virtual_tokens, d_model) `prompt_embeddings` leaf that models prepend to their input embeddings.

`soft_prompt` is the one place the models read a soft prompt from: the `prompt_embeddings` leaf, or the output of a
P-tuning `prompt_encoder` (`jpeft.ptuning`) computed in the same forward pass. `nearest_tokens` reads a learned prompt
back as the vocabulary tokens it lies closest to.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import ptuning

LEAF = "prompt_embeddings"


@dataclasses.dataclass(frozen=True)
class PromptTuningConfig:
    """HF PEFT's PromptTuningConfig: "random", "vocab" (rows of tokens drawn from the whole vocabulary,
    as PEFT 0.21 draws them) or "text" init (the text's token ids, special tokens included, as PEFT tokenizes it)."""

    num_virtual_tokens: int = 20
    init: str = "random"
    text: str | None = None
    tokenizer: Any = None

    def __post_init__(self):
        if self.num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be positive, got {self.num_virtual_tokens}")
        if self.init not in ("random", "vocab", "text"):
            raise ValueError(f"unknown prompt init {self.init!r}; choose 'random', 'vocab' or 'text'")
        if self.init == "text" and (not self.text or self.tokenizer is None):
            raise ValueError("init='text' needs both `text` and `tokenizer`")


def embedding_table(params: Mapping[str, Any]) -> jax.Array:
    """The model's input embedding matrix (T5's `shared`, Llama's `model/embed_tokens`)."""
    if "shared" in params:
        return params["shared"]["embedding"]
    if "model" in params and "embed_tokens" in params["model"]:
        return params["model"]["embed_tokens"]["embedding"]
    raise ValueError("no input embedding found (expected shared/embedding or model/embed_tokens/embedding)")


def inject(params: Mapping[str, Any], cfg: PromptTuningConfig, key: jax.Array, embed_scale: float = 1.0) -> dict:
    """A new tree with a trainable `prompt_embeddings` leaf (num_virtual_tokens, d_model).

    `embed_scale` is the factor the model multiplies token embeddings by (Gemma: sqrt(d_model)): the vocab and
    text inits start from embedded tokens, as HF PEFT's do (it runs the ids through the embedding layer).
    """
    if LEAF in params:
        raise ValueError("this tree already has prompt_embeddings: split the old adapter off before injecting another")
    table = embedding_table(params)
    n = cfg.num_virtual_tokens
    if cfg.init == "random":  # torch.nn.Embedding's default init, as HF PEFT's RANDOM init uses
        prompt = jax.random.normal(key, (n, table.shape[1]), jnp.float32).astype(table.dtype)
    elif cfg.init == "vocab":
        rows = jax.random.randint(key, (n,), 0, table.shape[0])
        prompt = table[rows]
    else:
        ids = cfg.tokenizer(cfg.text)["input_ids"]  # with the tokenizer's special tokens (T5's </s>), as PEFT's
        if not ids:
            raise ValueError(f"prompt text {cfg.text!r} tokenizes to nothing")
        ids = (ids * (n // len(ids) + 1))[:n]  # HF PEFT repeats or truncates the phrase to length
        prompt = table[jnp.asarray(ids)]
    if cfg.init != "random" and embed_scale != 1.0:
        prompt = (prompt.astype(jnp.float32) * embed_scale).astype(table.dtype)
    return {**params, LEAF: prompt}


def transformer_submodules(params: Mapping[str, Any]) -> int:
    """PEFT's num_transformer_submodules for a tree: 2 for an encoder-decoder (one prompt block each), else 1."""
    return 2 if "encoder" in params and "decoder" in params else 1


def has_soft_prompt(params: Mapping[str, Any]) -> bool:
    """Whether the tree holds a soft prompt (a `prompt_embeddings` leaf or a P-tuning `prompt_encoder`)."""
    return LEAF in params or ptuning.ENCODER in params


def soft_prompt(params: Mapping[str, Any], ctx: Any = None) -> jax.Array | None:
    """The (N, D) rows prepended to the input embeddings, or None; a P-tuning encoder runs here (dropout when `ctx` has an rng)."""
    if LEAF in params:
        return params[LEAF]
    if ptuning.ENCODER not in params:
        return None
    encoder = params[ptuning.ENCODER]
    rng = ctx.next_key() if ctx is not None and not ctx.deterministic and ptuning.DROPOUT in encoder else None
    rows = ptuning.prompt_embeddings(encoder, rng)
    return rows[: rows.shape[0] // transformer_submodules(params)]  # PEFT feeds only the first submodule's block


def num_virtual_tokens(params: Mapping[str, Any]) -> int:
    """How many soft-prompt rows the models prepend (0 without a soft prompt)."""
    if LEAF in params:
        return params[LEAF].shape[0]
    if ptuning.ENCODER in params:
        return params[ptuning.ENCODER]["embedding"].shape[0] // transformer_submodules(params)
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
    rows = soft_prompt(params)
    if rows is None:
        raise ValueError("nearest_tokens: the tree has no soft prompt (no prompt_embeddings leaf or prompt_encoder)")
    vocab = min(len(tokenizer), embedding_table(params).shape[0])
    if not 0 < k <= vocab:
        raise ValueError(f"nearest_tokens: k must be in 1..{vocab} (the vocabulary size), got {k}")
    table = np.asarray(embedding_table(params)[:vocab], np.float64)
    rows = np.asarray(rows, np.float64)
    unit = lambda m: m / np.maximum(np.linalg.norm(m, axis=-1, keepdims=True), 1e-30)  # noqa: E731
    cosine = unit(rows) @ unit(table).T
    top = np.argsort(-cosine, axis=1, kind="stable")[:, :k]
    return [[(_token_text(tokenizer, int(i)), float(c[i])) for i in ids] for ids, c in zip(top, cosine)]
