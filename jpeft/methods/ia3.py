"""(IA)^3: learned vectors that rescale activations, beside the weights they act on: forward, merge and init.

Feed-forward modules scale their input (`ia3_in`, shape (in,)); the others scale their output (`ia3_out`, shape
(out,), bias included, as HF PEFT's layer scales its whole output). Initialised to ones, so an untrained IA3 model
equals the base.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jpeft import leaves, quant
from jpeft import targets as tg
from jpeft.methods import weights

LEAVES = ("ia3_in", "ia3_out")
Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class IA3Config:
    """HF PEFT's IA3Config; the defaults are its T5 defaults (k, v and the feed-forward wo)."""

    target_modules: tg.Targets = ("k", "v", "wo")
    feedforward_modules: tg.Targets = ("wo",)
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # HF PEFT's check: with both given as name lists, a feed-forward name that is no target (a typo) is an error,
        # not a layer silently given ia3_out.
        if not isinstance(self.target_modules, str) and not isinstance(self.feedforward_modules, str):
            stray = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if stray:
                raise ValueError(f"feedforward_modules should be a subset of target_modules (as in HF PEFT); {stray} are not "
                                 f"in target_modules={list(self.target_modules)}")


def _new_leaves(cfg: IA3Config, name: str, module: Params, key: Any = None) -> Params:
    """Ones: an input vector on feed-forward modules, else an output vector."""
    (d_in, d_out), dtype = quant.weight_shape(module), quant.weight_dtype(module)
    if tg.matches(cfg.feedforward_modules, name):
        return {"ia3_in": jnp.ones((d_in,), dtype)}
    return {"ia3_out": jnp.ones((d_out,), dtype)}


def target_names(params: Mapping[str, Any], cfg: IA3Config) -> list[str]:
    """Dotted names of the dense modules `cfg` targets (modules_to_save are excluded, as in HF PEFT)."""
    return choose(tg.dense_modules(params), cfg)


def choose(candidates: list[str], cfg: IA3Config) -> list[str]:
    """The candidates `cfg` targets, checked as `targets.select` does; so is each feed-forward name, against them."""
    chosen = tg.select(candidates, cfg.target_modules, "target_modules", cfg.modules_to_save)
    if cfg.feedforward_modules:
        tg.select(chosen, cfg.feedforward_modules, "feedforward_modules")
    return chosen


def inject(params: Mapping[str, Any], cfg: IA3Config, key: Any = None) -> dict:
    """A new tree with ones-initialised scaling vectors beside each targeted weight (float or quantized)."""
    names = target_names(params, cfg)
    return weights.inject(params, names, functools.partial(_new_leaves, cfg), jax.random.key(0) if key is None else key)


def merge(params: Mapping[str, Any]) -> dict:
    """Fold the vectors into the weights (W * l per row or column; an output vector scales the bias too, as the layer
    scales its whole output) and drop them; a quantized W becomes a float32 kernel."""
    return weights.merge(params, METHOD)


def unmerge(merged: Mapping[str, Any], adapter: Mapping[str, Any]) -> dict:
    """The inverse of `merge`: divide the vectors back out and put them beside the weights."""
    return weights.unmerge(merged, adapter, METHOD)


# ----------------------------------------------------------------------------------------------
# The layer


def _scale_input(p: Params, x: jax.Array, ctx: Any) -> jax.Array:
    return x * p["ia3_in"].astype(ctx.dtype) if "ia3_in" in p else x


def _scale_output(p: Params, y: jax.Array, ctx: Any) -> jax.Array:
    return y * p["ia3_out"].astype(ctx.dtype) if "ia3_out" in p else y


def _merged(p: Params, w: jax.Array) -> jax.Array:
    """diag(l_in) W or W diag(l_out) (float32)."""
    if "ia3_in" in p:
        w = w * p["ia3_in"].astype(jnp.float32)[:, None]
    if "ia3_out" in p:
        w = w * p["ia3_out"].astype(jnp.float32)[None, :]
    return w


def _unmerged(p: Params, w: jax.Array, extra: Any = None) -> jax.Array:
    if "ia3_in" in p:
        w = w / p["ia3_in"].astype(jnp.float32)[:, None]
    if "ia3_out" in p:
        w = w / p["ia3_out"].astype(jnp.float32)[None, :]
    return w


def _merged_bias(p: Params, bias: jax.Array, sign: float) -> jax.Array:
    if "ia3_out" not in p:
        return bias
    v = p["ia3_out"].astype(jnp.float32)
    return (bias.astype(jnp.float32) * v if sign > 0 else bias.astype(jnp.float32) / v).astype(bias.dtype)


METHOD = leaves.declare(leaves.Method(
    name="ia3", label="(IA)^3", peft_type="IA3", markers=LEAVES, config=IA3Config, init=_new_leaves,
    leaves=(leaves.Leaf("ia3_in", (leaves.IN,), peft="ia3_l"), leaves.Leaf("ia3_out", (leaves.OUT,), peft="ia3_l")),
    scale_input=_scale_input, scale_output=_scale_output, merge=_merged, unmerge=_unmerged, merge_bias=_merged_bias))
