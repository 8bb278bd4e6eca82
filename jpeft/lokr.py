"""LoKr (HF PEFT's `LoKrConfig`): the update is a Kronecker product, ΔW = kron(W1, W2) * alpha / r, with leaves
beside the kernel that `jpeft.nn.dense` applies without ever forming the product.

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
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jpeft import lycoris, nn

LEAVES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_scale")
TRAINABLE = LEAVES[:-1]


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


def target_names(params: Mapping[str, Any], cfg: LoKrConfig) -> list[str]:
    """Dotted names of the modules `cfg` targets."""
    return lycoris.target_names(params, cfg)


def _new_leaves(cfg: LoKrConfig):
    def make(name, weight_shape, dtype, key):
        r, scale = cfg.rank_and_scale(name)
        zeros = _ZEROS[cfg.init_weights]
        out = {leaf: jnp.zeros(shape, dtype) if leaf in zeros else lycoris.kaiming(jax.random.fold_in(key, i), shape, dtype)
               for i, (leaf, shape) in enumerate(shapes(*weight_shape, r, cfg).items())}
        return {**out, "lokr_scale": jnp.asarray(scale, jnp.float32)}
    return make


def inject(params: Mapping[str, Any], cfg: LoKrConfig, key: jax.Array) -> dict:
    """A new tree with LoKr's leaves beside each targeted kernel (float or quantized)."""
    return lycoris.inject(params, cfg, key, _new_leaves(cfg))


def merge(params: Mapping[str, Any]) -> dict:
    """W + ΔW accumulated in float32, LoKr leaves removed; a quantized W becomes a float32 kernel."""
    return lycoris.merge(params, "lokr_scale", LEAVES, nn.lokr_weight, "LoKr")


def unmerge(merged: Mapping[str, Any], adapter: Mapping[str, Any]) -> dict:
    """The inverse of `merge`: subtract ΔW and put the adapter's LoKr leaves back."""
    return lycoris.unmerge(merged, adapter, "lokr_scale", LEAVES, nn.lokr_weight, "LoKr")
