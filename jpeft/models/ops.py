"""Model operations the families share: RMS norm, activations by their transformers names, positions of packed segments."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

def rms_norm(weight: jax.Array, x: jax.Array, eps: float, dtype: Any) -> jax.Array:
    """RMS norm with the statistics in float32 (T5LayerNorm / LlamaRMSNorm)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(dtype) * x32.astype(dtype)


def gelu_new(x: jax.Array) -> jax.Array:
    """The tanh approximation of GELU (transformers' `gelu_new` / `gelu_pytorch_tanh`)."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": gelu_new,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Look up an activation by its transformers name."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; jpeft knows {sorted(ACTIVATIONS)}") from None


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """(B, T) segment ids (0 = padding) -> (B, T) int32 positions counted from each segment's first token."""
    index = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
    new = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start = jax.lax.cummax(jnp.where(new, index, 0), axis=1)
    return jnp.where(segment_ids > 0, index - start, 0)
