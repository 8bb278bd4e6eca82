"""LoKr (HF PEFT's `LoKrConfig`): the update is a Kronecker product, ΔW = kron(W1, W2) * alpha / r, with leaves
beside the weight that the layer applies without ever forming the product; its forward, merge and init side by side.

The weight's (in, out) = (c d, a b) are split by PEFT's `factorization` (in -> (c, d), out -> (a, b), the
first factor the smaller), W1 is (c, a) and W2 (d, b). W2 is stored whole (`lokr_w2`) unless
r < max(b, d) / 2, when it is the pair `lokr_w2_b` (d, r) `lokr_w2_a` (r, b); W1 likewise (`lokr_w1`, or
`lokr_w1_b` (c, r) `lokr_w1_a` (r, a) when `decompose_both` and r < max(a, c) / 2). Each leaf is PEFT's tensor
of the same name transposed. The scale is alpha / r even when both factors are whole, as in PEFT.

Initialisation as PEFT's: `init_weights=True` zeros W1 (or `w1_a`) and draws the rest Kaiming-uniform, so an
untrained adapter is the identity; `"lycoris"` zeros W2 (or `w2_b`) instead; `False` draws everything.
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
class LoKrConfig(lycoris.LycorisConfig):
    """HF PEFT's LoKrConfig, for the parts that shape the parameters (see `lycoris.LycorisConfig`).

    `rank_dropout_scale` only matters with rank dropout, which jpeft does not implement.
    """

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    _INITS = (True, False, "lycoris")

    def __post_init__(self):
        super().__post_init__()
        if self.decompose_factor != -1 and self.decompose_factor <= 0:
            raise ValueError(f"LoKrConfig: decompose_factor must be -1 (near the square root) or positive, got {self.decompose_factor}")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """HF PEFT's (LyCORIS's) `factorization`: (m, n), m <= n, m * n = dimension, m near `factor` or the square root."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def shapes(d_in: int, d_out: int, r: int, cfg: LoKrConfig) -> dict[str, tuple[int, int]]:
    """The trainable leaves of one (in, out) weight at rank r, and their shapes, as PEFT's `update_layer` decides."""
    c, d = factorization(d_in, cfg.decompose_factor)
    a, b = factorization(d_out, cfg.decompose_factor)
    out = {}
    if cfg.decompose_both and r < max(a, c) / 2:
        out.update(lokr_w1_a=(r, a), lokr_w1_b=(c, r))
    else:
        out["lokr_w1"] = (c, a)
    if r < max(b, d) / 2:
        out.update(lokr_w2_a=(r, b), lokr_w2_b=(d, r))
    else:
        out["lokr_w2"] = (d, b)
    return out


# Which leaf starts at zero, per init_weights (the others are Kaiming-uniform).
_ZEROS = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b"), False: ()}


def _new_leaves(cfg: LoKrConfig, name: str, module: Params, key: jax.Array) -> dict:
    """PEFT's init: the factor `_ZEROS` names zero, the rest Kaiming-uniform."""
    r, scale = cfg.rank_and_scale(name)
    zeros = _ZEROS[cfg.init_weights]
    out = {leaf: jnp.zeros(shape, quant.weight_dtype(module)) if leaf in zeros else lycoris.kaiming(jax.random.fold_in(key, i), shape, quant.weight_dtype(module))
           for i, (leaf, shape) in enumerate(shapes(*quant.weight_shape(module), r, cfg).items())}
    return {**out, "lokr_scale": jnp.asarray(scale, jnp.float32)}


def target_names(params: Mapping[str, Any], cfg: LoKrConfig) -> list[str]:
    """Dotted names of the modules `cfg` targets."""
    return weights.target_names(params, cfg.target_modules)


def inject(params: Mapping[str, Any], cfg: LoKrConfig, key: jax.Array) -> dict:
    """A new tree with LoKr's leaves beside each targeted weight (float or quantized)."""
    names = target_names(params, cfg)
    return weights.inject(params, names, functools.partial(_new_leaves, cfg), key)


def merge(params: Mapping[str, Any]) -> dict:
    """W + dW accumulated in float32, LoKr leaves removed; a quantized W becomes a float32 kernel."""
    return weights.merge(params, METHOD)


def unmerge(merged: Mapping[str, Any], adapter: Mapping[str, Any]) -> dict:
    """The inverse of `merge`: subtract dW and put the adapter's LoKr leaves back."""
    return weights.unmerge(merged, adapter, METHOD)


# ----------------------------------------------------------------------------------------------
# The layer


def _lokr_factor(p: Params, name: str, dtype: Any) -> jax.Array:
    """One Kronecker factor (rows from the input side): stored whole, or as its low-rank pair b @ a."""
    if f"lokr_{name}" in p:
        return p[f"lokr_{name}"].astype(dtype)
    return nn.matmul(p[f"lokr_{name}_b"].astype(dtype), p[f"lokr_{name}_a"].astype(dtype))


def weight(p: Params, dtype: Any = jnp.float32) -> jax.Array:
    """LoKr's update as an (in, out) matrix: kron(W1, W2) * scale, HF PEFT's `make_kron` transposed."""
    return jnp.kron(_lokr_factor(p, "w1", dtype), _lokr_factor(p, "w2", dtype)) * p["lokr_scale"].astype(dtype)


def delta(p: Params, x: jax.Array, ctx: nn.Ctx) -> jax.Array:
    """x kron(W1, W2) * scale without the Kronecker product: x as (..., c, d) meets W1 (c, a) and W2 (d, b) in turn.

    Per token that is in * b + c * out (or in * a + d * out, whichever order is cheaper) multiply-adds
    instead of in * out: 576 x 576 factored 24 x 24 costs 28k against 332k.
    """
    w1, w2 = _lokr_factor(p, "w1", ctx.dtype), _lokr_factor(p, "w2", ctx.dtype)
    (c, a), (d, b) = w1.shape, w2.shape
    xs = x.reshape(*x.shape[:-1], c, d)
    if c * d * b + c * b * a <= c * d * a + a * d * b:  # contract the input's fast axis (d) first
        y = nn.einsum("...kj,ki->...ij", nn.einsum("...kl,lj->...kj", xs, w2), w1)
    else:
        y = nn.einsum("...il,lj->...ij", nn.einsum("...kl,ki->...il", xs, w1), w2)
    return y.reshape(*x.shape[:-1], a * b) * p["lokr_scale"].astype(ctx.dtype)


def _product(p: Params, x: jax.Array, inner: Any, ctx: nn.Ctx) -> jax.Array:
    return inner(x) + delta(p, x, ctx)


# The Kronecker factors' dims are factors of in and out, not in or out themselves: no dim spans the weight's.
METHOD = leaves.declare(leaves.Method(
    name="lokr", label="LoKr", peft_type="LOKR", markers=("lokr_scale",), config=LoKrConfig, init=_new_leaves,
    leaves=tuple(leaves.Leaf(f"lokr_{n}", (None, None), peft=f"lokr_{n}") for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b"))
    + (leaves.Leaf("lokr_scale", (), trainable=False),),
    product=_product, merge=lambda p, w: w + weight(p), unmerge=lambda p, w, extra: w - weight(p)))
TRAINABLE = tuple(leaf.name for leaf in METHOD.leaves if leaf.trainable)
LEAVES = METHOD.names
