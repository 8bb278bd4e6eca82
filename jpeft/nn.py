"""Layer primitives shared by the models: every PEFT method plugs in here.

A layer's parameters are a plain dict. A dense layer is `{"kernel": (in, out)}`, and PEFT methods
add leaves beside the kernel that `dense` picks up when present:

- `lora_a` (in, r), `lora_b` (r, out), `lora_scale` ()  ->  x W + (dropout(x) A) B * scale
- `ia3_in` (in,)                                        ->  (x * l) W          (feed-forward modules)
- `ia3_out` (out,)                                      ->  (x W) * l
- `bias` (out,)                                         ->  x W + b

so the low-rank path is fused into the same jitted computation as the frozen matmul and
`W + BA` is never materialised during training.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

Params = dict[str, Any]


@dataclasses.dataclass
class Ctx:
    """Per-call settings threaded through a forward pass: compute dtype and dropout randomness.

    `rng=None` means deterministic (no dropout anywhere). Keys are drawn in call order, which is
    fixed by the model's code, so a traced forward pass always uses the same key for the same site.
    """

    dtype: Any = jnp.float32
    rng: jax.Array | None = None
    dropout_rate: float = 0.0
    lora_dropout: float = 0.0
    adapter_ids: jax.Array | None = None  # (batch,) row -> adapter index for stacked LoRA leaves
    remat: bool = False  # recompute each layer's activations in the backward pass instead of storing them
    _count: int = 0

    @property
    def deterministic(self) -> bool:
        return self.rng is None

    def next_key(self) -> jax.Array:
        self._count += 1
        return jax.random.fold_in(self.rng, self._count)


def run_layers(layer: Callable[[Params, jax.Array, Ctx], jax.Array], x: jax.Array, layers: list[Params], ctx: Ctx) -> jax.Array:
    """x through `layer(params_i, x, ctx_i)` for each layer in order.

    With `ctx.remat`, layers of identical parameter shapes run as one `lax.scan` over their stacked
    parameters with the body rematerialised: the backward pass recomputes one layer at a time, so the
    stored activations shrink from every intermediate of every layer to each layer's input, and one
    body compiles instead of N. Otherwise (or when layers differ, e.g. under a LoRA rank_pattern) a
    plain loop runs.
    """
    signature = lambda p: jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), p)  # noqa: E731
    if not ctx.remat or any(signature(p) != signature(layers[0]) for p in layers[1:]):
        for i, p in enumerate(layers):
            x = layer(p, x, _layer_ctx(ctx, i))
        return x

    def body(x, inputs):
        p, i = inputs
        return layer(p, x, _layer_ctx(ctx, i)), None

    body = jax.checkpoint(body, prevent_cse=False)  # inside scan, CSE cannot undo the recomputation
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *layers)
    return jax.lax.scan(body, x, (stacked, jnp.arange(len(layers))))[0]


def _layer_ctx(ctx: Ctx, i) -> Ctx:
    """The context for layer i: its own dropout key stream (the same whether the layers loop or scan)."""
    return dataclasses.replace(ctx, rng=None if ctx.rng is None else jax.random.fold_in(ctx.rng, i), _count=0)


def dropout(ctx: Ctx, x: jax.Array, rate: float | None = None) -> jax.Array:
    """Inverted dropout; identity when deterministic or the rate is zero."""
    rate = ctx.dropout_rate if rate is None else rate
    if ctx.deterministic or rate == 0.0:
        return x
    keep = jax.random.bernoulli(ctx.next_key(), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _lora_delta(p: Params, x: jax.Array, ctx: Ctx) -> jax.Array:
    a, b = p["lora_a"].astype(ctx.dtype), p["lora_b"].astype(ctx.dtype)
    scale = p["lora_scale"]
    h = dropout(ctx, x, ctx.lora_dropout)
    if a.ndim == 3:
        # Stacked adapters (n, in, r): each batch row gathers its own A, B and scale.
        ids = ctx.adapter_ids
        if ids is None:
            raise ValueError(f"stacked LoRA leaves ({a.shape[0]} adapters) need adapter_ids (batch,) choosing each row's adapter")
        a, b, scale = a[ids], b[ids], scale[ids]
        lead = (slice(None),) + (None,) * (x.ndim - 2)
        # (h A) B in two contractions, the order of the single-adapter path, so a row's result matches it.
        hr = jnp.einsum("b...i,bir->b...r", h, a)
        return jnp.einsum("b...r,bro->b...o", hr, b) * scale[lead + (None,)].astype(ctx.dtype)
    return (h @ a) @ b * scale.astype(ctx.dtype)


def dense(p: Params, x: jax.Array, ctx: Ctx) -> jax.Array:
    """x @ kernel, plus whichever PEFT leaves sit beside the kernel (see module docstring)."""
    x = x.astype(ctx.dtype)
    if "ia3_in" in p:
        x = x * p["ia3_in"].astype(ctx.dtype)
    y = x @ p["kernel"].astype(ctx.dtype)
    if "bias" in p:
        y = y + p["bias"].astype(ctx.dtype)
    if "lora_a" in p:
        y = y + _lora_delta(p, x, ctx)
    if "ia3_out" in p:
        y = y * p["ia3_out"].astype(ctx.dtype)
    return y


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


def adapter(p: Params | None, h: jax.Array, ctx: Ctx) -> jax.Array:
    """Bottleneck adapter on a sub-layer's output: h + up(act(down(h))); identity when absent."""
    if p is None:
        return h
    return h + dense(p["up"], jax.nn.relu(dense(p["down"], h, ctx)), ctx)


def attention_bias_from_mask(mask: jax.Array) -> jax.Array:
    """(batch, ..., keys) of 0/1 -> additive float32 bias: 0 where attended, finfo.min where not."""
    return jnp.where(mask.astype(bool), 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
