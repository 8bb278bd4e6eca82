"""LoHa (HF PEFT's `LoHaConfig`, FedPara): the update is the elementwise product of two rank-r products,
ΔW = ((B1 A1) * (B2 A2)) * alpha / r, with leaves beside the kernel that `jpeft.nn.dense` applies.

Leaves (each PEFT's `hada_*` tensor transposed): `loha_w1_b`, `loha_w2_b` (in, r), `loha_w1_a`, `loha_w2_a`
(r, out), `loha_scale` (). PEFT's initialisation: all Kaiming-uniform except `w2_b`, which is zero, so an
untrained adapter is the identity (`init_weights=False`: Kaiming throughout).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jpeft import lycoris, nn

LEAVES = ("loha_w1_a", "loha_w1_b", "loha_w2_a", "loha_w2_b", "loha_scale")
TRAINABLE = LEAVES[:-1]


@dataclasses.dataclass(frozen=True)
class LoHaConfig(lycoris.LycorisConfig):
    """HF PEFT's LoHaConfig, for the parts that shape the parameters (see `lycoris.LycorisConfig`)."""


def shapes(d_in: int, d_out: int, r: int) -> dict[str, tuple[int, int]]:
    """The trainable leaves' shapes on an (in, out) weight at rank r."""
    return {"loha_w1_a": (r, d_out), "loha_w1_b": (d_in, r), "loha_w2_a": (r, d_out), "loha_w2_b": (d_in, r)}


def target_names(params: Mapping[str, Any], cfg: LoHaConfig) -> list[str]:
    """Dotted names of the modules `cfg` targets."""
    return lycoris.target_names(params, cfg)


def _new_leaves(cfg: LoHaConfig):
    def make(name, weight_shape, dtype, key):
        r, scale = cfg.rank_and_scale(name)
        out = {leaf: lycoris.kaiming(jax.random.fold_in(key, i), shape, dtype) for i, (leaf, shape) in enumerate(shapes(*weight_shape, r).items())}
        if cfg.init_weights:
            out["loha_w2_b"] = jnp.zeros_like(out["loha_w2_b"])
        return {**out, "loha_scale": jnp.asarray(scale, jnp.float32)}
    return make


def inject(params: Mapping[str, Any], cfg: LoHaConfig, key: jax.Array) -> dict:
    """A new tree with LoHa's leaves beside each targeted kernel (float or quantized)."""
    return lycoris.inject(params, cfg, key, _new_leaves(cfg))


def merge(params: Mapping[str, Any]) -> dict:
    """W + ΔW accumulated in float32, LoHa leaves removed; a quantized W becomes a float32 kernel."""
    return lycoris.merge(params, "loha_scale", LEAVES, nn.loha_weight, "LoHa")


def unmerge(merged: Mapping[str, Any], adapter: Mapping[str, Any]) -> dict:
    """The inverse of `merge`: subtract ΔW and put the adapter's LoHa leaves back."""
    return lycoris.unmerge(merged, adapter, "loha_scale", LEAVES, nn.loha_weight, "LoHa")
