"""LoHa (HF PEFT's `LoHaConfig`, FedPara): the update is the elementwise product of two rank-r products,
ΔW = ((B1 A1) * (B2 A2)) * alpha / r, with leaves beside the weight; its forward, merge and init side by side.

Leaves (each PEFT's `hada_*` tensor transposed): `loha_w1_b`, `loha_w2_b` (in, r), `loha_w1_a`, `loha_w2_a`
(r, out), `loha_scale` (). PEFT's initialisation: all Kaiming-uniform except `w2_b`, which is zero, so an
untrained adapter is the identity (`init_weights=False`: Kaiming throughout).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jpeft import leaves, nn, quant
from jpeft.methods import lycoris, weights

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LoHaConfig(lycoris.LycorisConfig):
    """HF PEFT's LoHaConfig, for the parts that shape the parameters (see `lycoris.LycorisConfig`)."""


def shapes(d_in: int, d_out: int, r: int) -> dict[str, tuple[int, int]]:
    """The trainable leaves' shapes on an (in, out) weight at rank r."""
    return {"loha_w1_a": (r, d_out), "loha_w1_b": (d_in, r), "loha_w2_a": (r, d_out), "loha_w2_b": (d_in, r)}


def _new_leaves(cfg: LoHaConfig, name: str, module: Params, key: jax.Array) -> dict:
    """PEFT's init: Kaiming-uniform throughout, but w2_b zero unless init_weights=False (an untrained adapter is the identity)."""
    r, scale = cfg.rank_and_scale(name)
    out = {leaf: lycoris.kaiming(jax.random.fold_in(key, i), shape, quant.weight_dtype(module)) for i, (leaf, shape) in enumerate(shapes(*quant.weight_shape(module), r).items())}
    if cfg.init_weights:
        out["loha_w2_b"] = jnp.zeros_like(out["loha_w2_b"])
    return {**out, "loha_scale": jnp.asarray(scale, jnp.float32)}


def target_names(params: Mapping[str, Any], cfg: LoHaConfig) -> list[str]:
    """Dotted names of the modules `cfg` targets."""
    return weights.target_names(params, cfg.target_modules)


def inject(params: Mapping[str, Any], cfg: LoHaConfig, key: jax.Array) -> dict:
    """A new tree with LoHa's leaves beside each targeted weight (float or quantized)."""
    names = target_names(params, cfg)
    return weights.inject(params, names, functools.partial(_new_leaves, cfg), key)


def merge(params: Mapping[str, Any]) -> dict:
    """W + dW accumulated in float32, LoHa leaves removed; a quantized W becomes a float32 kernel."""
    return weights.merge(params, METHOD)


def unmerge(merged: Mapping[str, Any], adapter: Mapping[str, Any]) -> dict:
    """The inverse of `merge`: subtract dW and put the adapter's LoHa leaves back."""
    return weights.unmerge(merged, adapter, METHOD)


# ----------------------------------------------------------------------------------------------
# The layer


def _hadamard_factors(b1: jax.Array, a1: jax.Array, b2: jax.Array, a2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(in, r1 r2), (r1 r2, out) whose product is (b1 a1) * (b2 a2): the rows' and the columns' Khatri-Rao products."""
    (d_in, r1), (r2, d_out) = b1.shape, a2.shape
    left = (b1[:, :, None] * b2[:, None, :]).reshape(d_in, r1 * r2)
    right = (a1[:, None, :] * a2[None, :, :]).reshape(r1 * r2, d_out)
    return left, right


def weight(p: Params, dtype: Any = jnp.float32) -> jax.Array:
    """LoHa's update as an (in, out) matrix: ((B1 A1) * (B2 A2)) * scale, HF PEFT's `make_weight` transposed."""
    b1, a1, b2, a2 = (p[k].astype(dtype) for k in ("loha_w1_b", "loha_w1_a", "loha_w2_b", "loha_w2_a"))
    return (nn.matmul(b1, a1) * nn.matmul(b2, a2)) * p["loha_scale"].astype(dtype)


def delta(p: Params, x: jax.Array, ctx: nn.Ctx) -> jax.Array:
    """x times LoHa's update, through its rank-r^2 factors when they are smaller than the (in, out) matrix.

    (B1 A1) * (B2 A2) = KR(B1, B2) KR(A1, A2) exactly, so per token the factored form costs r^2 (in + out)
    multiply-adds against in * out for the matrix PEFT builds (r = 8 on 576 x 576: 74k against 332k).
    """
    b1, a1, b2, a2 = (p[k].astype(ctx.dtype) for k in ("loha_w1_b", "loha_w1_a", "loha_w2_b", "loha_w2_a"))
    scale = p["loha_scale"].astype(ctx.dtype)
    (d_in, r1), (r2, d_out) = b1.shape, a2.shape
    if r1 * r2 * (d_in + d_out) >= d_in * d_out:
        return nn.matmul(x, weight(p, ctx.dtype))
    left, right = _hadamard_factors(b1, a1, b2, a2)
    return nn.matmul(nn.matmul(x, left), right) * scale


def _product(p: Params, x: jax.Array, inner: Any, ctx: nn.Ctx) -> jax.Array:
    return inner(x) + delta(p, x, ctx)


METHOD = leaves.declare(leaves.Method(
    name="loha", label="LoHa", peft_type="LOHA", markers=("loha_scale",), config=LoHaConfig, init=_new_leaves,
    leaves=(leaves.Leaf("loha_w1_a", (None, leaves.OUT), peft="hada_w1_a"), leaves.Leaf("loha_w1_b", (leaves.IN, None), peft="hada_w1_b"),
            leaves.Leaf("loha_w2_a", (None, leaves.OUT), peft="hada_w2_a"), leaves.Leaf("loha_w2_b", (leaves.IN, None), peft="hada_w2_b"),
            leaves.Leaf("loha_scale", (), trainable=False)),
    product=_product, merge=lambda p, w: w + weight(p), unmerge=lambda p, w, extra: w - weight(p)))
TRAINABLE = tuple(leaf.name for leaf in METHOD.leaves if leaf.trainable)
LEAVES = METHOD.names
