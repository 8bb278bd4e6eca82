"""P-tuning (HF PEFT's P_TUNING): a soft prompt computed by a small encoder from a trainable embedding table.

The encoder lives under a top-level `prompt_encoder` subtree in PyTorch's module names, with (in, out) kernels:

    prompt_encoder/embedding                      (N * submodules, D)   PEFT's `embedding.weight`
    prompt_encoder/mlp_head/{0,2,4}/{kernel,bias} MLP: D -> H -> H -> D, ReLU between
    prompt_encoder/lstm_head/l{k}[_reverse]/{kernel_ih (in, 4H), kernel_hh (H, 4H), bias_ih, bias_hh}
    prompt_encoder/mlp_head/{0,2}/{kernel,bias}   after the LSTM: 2H -> 2H -> D, ReLU between
    prompt_encoder/encoder_dropout                LSTM only: the dropout between LSTM layers (a constant, never trained)

LSTM gates are in torch's order (input, forget, cell, output) with torch's two bias vectors, so weights copy over
as transposes. A seq2seq tree keeps 2N embedding rows as PEFT does (one block per transformer submodule): the
bidirectional LSTM reads all of them, but only the first N outputs are fed to the encoder. `soft_prompt.rows_of`
runs the encoder inside the model's forward pass, so gradients reach these leaves; `fold` replaces the encoder by
its output for inference. PEFT's adapter files hold only that output, so a P_TUNING file loads as a folded prompt.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jpeft import leaves, nn
from jpeft.methods import prompt

ENCODER = "prompt_encoder"
DROPOUT = "encoder_dropout"
TYPES = ("MLP", "LSTM")
_HIGHEST = jax.lax.Precision.HIGHEST  # the encoder is tiny; full float32 keeps it at torch's numbers on any backend


@dataclasses.dataclass(frozen=True)
class PromptEncoderConfig:
    """HF PEFT's PromptEncoderConfig: `encoder_hidden_size` None means the model's d_model, as PEFT sets it."""

    num_virtual_tokens: int = 20
    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2  # LSTM layers; PEFT's MLP always has 3 Linear layers and ignores it
    encoder_dropout: float = 0.0  # between LSTM layers, in training only; PEFT's MLP has no dropout

    def __post_init__(self):
        if self.num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be positive, got {self.num_virtual_tokens}")
        if self.encoder_reparameterization_type not in TYPES:
            raise ValueError(f"unknown encoder_reparameterization_type {self.encoder_reparameterization_type!r}; choose 'MLP' or 'LSTM'")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise ValueError(f"encoder_hidden_size must be positive, got {self.encoder_hidden_size}")
        if self.encoder_num_layers <= 0:
            raise ValueError(f"encoder_num_layers must be positive, got {self.encoder_num_layers}")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout}")


def _linear(key: jax.Array, d_in: int, d_out: int) -> dict:
    """torch.nn.Linear's default init: kernel and bias uniform in +-1/sqrt(fan_in)."""
    k1, k2 = jax.random.split(key)
    return {"kernel": nn.torch_uniform(k1, (d_in, d_out), d_in), "bias": nn.torch_uniform(k2, (d_out,), d_in)}


def _lstm_cell(key: jax.Array, d_in: int, hidden: int) -> dict:
    """torch.nn.LSTM's default init: every weight and bias uniform in +-1/sqrt(hidden)."""
    keys = jax.random.split(key, 4)
    shapes = {"kernel_ih": (d_in, 4 * hidden), "kernel_hh": (hidden, 4 * hidden), "bias_ih": (4 * hidden,), "bias_hh": (4 * hidden,)}
    return {name: nn.torch_uniform(k, shape, hidden) for k, (name, shape) in zip(keys, shapes.items())}


def init_encoder(key: jax.Array, cfg: PromptEncoderConfig, token_dim: int, submodules: int = 1) -> dict:
    """A fresh `prompt_encoder` subtree (float32, as PEFT builds it whatever the base dtype), torch's default inits."""
    hidden = cfg.encoder_hidden_size or token_dim
    k_embed, k_head, k_lstm = jax.random.split(key, 3)
    enc: dict[str, Any] = {"embedding": jax.random.normal(k_embed, (cfg.num_virtual_tokens * submodules, token_dim), jnp.float32)}
    if cfg.encoder_reparameterization_type == "MLP":
        sizes = [(token_dim, hidden), (hidden, hidden), (hidden, token_dim)]
    else:
        names = [f"l{i}{suffix}" for i in range(cfg.encoder_num_layers) for suffix in ("", "_reverse")]
        keys = jax.random.split(k_lstm, len(names))
        enc["lstm_head"] = {n: _lstm_cell(k, token_dim if n.startswith("l0") else 2 * hidden, hidden) for n, k in zip(names, keys)}
        enc[DROPOUT] = jnp.float32(cfg.encoder_dropout)
        sizes = [(2 * hidden, 2 * hidden), (2 * hidden, token_dim)]
    keys = jax.random.split(k_head, len(sizes))
    enc["mlp_head"] = {str(2 * i): _linear(k, *s) for i, (k, s) in enumerate(zip(keys, sizes))}
    return enc


def inject(params: Mapping[str, Any], cfg: PromptEncoderConfig, key: jax.Array) -> dict:
    """A new tree with a trainable `prompt_encoder` subtree (see the module docstring)."""
    if prompt.LEAF in params or ENCODER in params:
        raise ValueError("this tree already has a soft prompt (prompt_embeddings or prompt_encoder): split the old adapter off first")
    d = prompt.embedding_table(params).shape[1]
    return {**params, ENCODER: init_encoder(key, cfg, d, prompt.transformer_submodules(params))}


def _dense(p: Mapping[str, Any], x: jax.Array) -> jax.Array:
    return jnp.dot(x, p["kernel"], precision=_HIGHEST) + p["bias"]


def lstm_direction(p: Mapping[str, Any], x: jax.Array, reverse: bool = False) -> jax.Array:
    """One direction of one torch LSTM layer over x (T, in) -> hidden states (T, H), zero initial state."""
    hidden = p["kernel_hh"].shape[0]
    inputs = jnp.dot(x, p["kernel_ih"], precision=_HIGHEST) + p["bias_ih"] + p["bias_hh"]

    def step(carry, gates_x):
        h, c = carry
        i, f, g, o = jnp.split(gates_x + jnp.dot(h, p["kernel_hh"], precision=_HIGHEST), 4)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((hidden,), inputs.dtype)
    return jax.lax.scan(step, (zeros, zeros), inputs, reverse=reverse)[1]


def _dropout(x: jax.Array, rate: jax.Array, key: jax.Array) -> jax.Array:
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


@jax.jit  # eager, the LSTM's scans and small ops would dispatch one by one (seconds); inside a model's jit it inlines
def prompt_embeddings(encoder: Mapping[str, Any], rng: jax.Array | None = None) -> jax.Array:
    """The encoder's output (N * submodules, D), float32; `rng` turns on the LSTM's between-layer dropout (training)."""
    x = encoder["embedding"].astype(jnp.float32)
    if "lstm_head" in encoder:
        lstm = encoder["lstm_head"]
        layers = sum(1 for name in lstm if not name.endswith("_reverse"))
        for i in range(layers):
            if i and rng is not None:  # torch's LSTM drops the outputs of every layer but the last
                x = _dropout(x, encoder[DROPOUT], jax.random.fold_in(rng, i))
            x = jnp.concatenate([lstm_direction(lstm[f"l{i}"], x), lstm_direction(lstm[f"l{i}_reverse"], x, reverse=True)], axis=-1)
    head = encoder["mlp_head"]
    keys = sorted(head, key=int)
    for k in keys[:-1]:
        x = jax.nn.relu(_dense(head[k], x))
    return _dense(head[keys[-1]], x)


def fold(params: Mapping[str, Any]) -> dict:
    """The tree with its `prompt_encoder` replaced by the `prompt_embeddings` (N, D) it computes (PEFT's inference mode)."""
    if ENCODER not in params:
        raise ValueError("fold: the tree has no prompt_encoder (inject one with ptuning.inject)")
    table = prompt_embeddings(params[ENCODER])
    rows = table[: table.shape[0] // prompt.transformer_submodules(params)]  # the block the models read
    return {**{k: v for k, v in params.items() if k != ENCODER}, prompt.LEAF: rows}


def encoder_config(encoder: Mapping[str, Any], num_virtual_tokens: int) -> PromptEncoderConfig:
    """The PromptEncoderConfig an encoder subtree was built with (its shapes; the dropout leaf for an LSTM)."""
    head = encoder["mlp_head"]
    if "lstm_head" in encoder:
        lstm = encoder["lstm_head"]
        return PromptEncoderConfig(num_virtual_tokens, "LSTM", int(lstm["l0"]["kernel_hh"].shape[0]),
                                   sum(1 for n in lstm if not n.endswith("_reverse")), round(float(encoder[DROPOUT]), 7))
    return PromptEncoderConfig(num_virtual_tokens, "MLP", int(head["0"]["kernel"].shape[1]))


METHOD = leaves.declare(leaves.Module("ptuning", top_level=(ENCODER,), constants=(DROPOUT,)))
