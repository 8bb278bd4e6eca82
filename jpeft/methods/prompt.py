"""Prompt tuning: a (num_virtual_tokens, d_model) `prompt_embeddings` leaf that models prepend to their input embeddings.

`soft_prompt` is the one place the models read a soft prompt from: the `prompt_embeddings` leaf, or the output of a
P-tuning `prompt_encoder` (`jpeft.ptuning`) computed in the same forward pass. `soft_prompt.nearest_tokens` reads a learned prompt
back as the vocabulary tokens it lies closest to.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jpeft import leaves


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


METHOD = leaves.declare(leaves.Module("prompt", top_level=(LEAF,)))
